"""Shared fixtures: small data files and recipes for the tiny random Llama."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REVIEWS = [
    ("a wonderful, moving film with a great cast", 1),
    ("dull, slow and far too long", 0),
    ("i loved every minute of it", 1),
    ("the worst script i have seen in years", 0),
    ("charming and funny from start to finish", 1),
    ("a tedious mess that goes nowhere", 0),
    ("brilliant acting and a clever story", 1),
    ("boring characters and a silly plot", 0),
    ("an absolute delight for the whole family", 1),
    ("i wanted to leave after ten minutes", 0),
    ("beautifully shot and deeply felt", 1),
    ("flat jokes and wooden acting", 0),
    ("a joy to watch", 1),
    ("painfully predictable", 0),
    ("smart, warm and surprising", 1),
    ("a waste of a good cast", 0),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def cls_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "reviews.jsonl", [{"text": t, "label": y} for t, y in REVIEWS])


@pytest.fixture
def text_data(tmp_path: Path) -> Path:
    rows = [{"text": f"{t}. " * (1 + i % 4)} for i, (t, _) in enumerate(REVIEWS)]
    return write_jsonl(tmp_path / "text.jsonl", rows)


def tiny_recipe(data_path: Path, out: Path, **sections) -> dict:
    """A recipe for the tiny random Llama; keyword sections are merged over the defaults."""
    recipe = {
        "model": {"name": "tiny-llama"},
        "data": {
            "path": str(data_path),
            "format": "classification",
            "label_words": ["negative", "positive"],
            "eval_size": 4,
        },
        "params": {"name": "full"},
        "optimizer": {"name": "adamw", "lr": 1e-2},
        "train": {"steps": 4, "batch_size": 4, "progress": False, "eval_before": False},
        "output_dir": str(out),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


class Kill(Exception):
    """Raised from a step callback to simulate a killed run."""


def assert_resume_exact(straight, data_path: Path, out: Path, kill_at: int, **sections) -> Path:
    """Run ``tiny_recipe(data_path, out, **sections)`` with a checkpoint every ``kill_at`` steps,
    kill it after that checkpoint, resume, and check it ends bitwise equal to ``straight`` (a
    finished RunResult of the same recipe): loss, parameters and buffers. Returns the killed
    run's checkpoint directory."""
    import torch

    from slimtune import checkpoint, config
    from slimtune.loop import train

    sections["train"] = {**sections.get("train", {}), "save_every": kill_at}
    resumable = tiny_recipe(data_path, out, **sections)

    def kill(step, model, row):
        if step == kill_at:
            raise Kill

    try:
        train(config.from_dict(resumable), on_step=kill)
        raise AssertionError("the run was not killed")
    except Kill:
        pass
    (ckpt,) = checkpoint.list_checkpoints(out / "checkpoints")
    resumed = train(config.from_dict({**resumable, "resume": True}))
    assert resumed.summary["train_loss"] == straight.summary["train_loss"]
    for (n, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    for (n, a), b in zip(straight.model.named_buffers(), resumed.model.buffers()):
        assert torch.equal(a, b), n
    return ckpt


def autograd_saved_bytes(model, batch: dict) -> int:
    """Bytes autograd keeps for backward over one training forward of the loop's loss on
    ``batch`` (distinct storages, parameters excluded)."""
    import torch

    from slimtune.loss import causal_lm_loss, find_head

    head = find_head(model)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model, head, batch, 256)
    return sum(seen.values())
