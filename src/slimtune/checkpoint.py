"""Atomic, exactly resumable checkpoints.

A checkpoint directory holds the trainable tensors (safetensors), the optimizer and scheduler
state and the RNG states (``torch.save`` of tensors and primitives only, read back with
``weights_only=True``), and ``state.json`` (step, data position, counters). It is written under a
temporary name and renamed into place, so a crash never leaves a half-written checkpoint, and
older checkpoints are pruned only after the new one exists.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PREFIX = "step-"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_dir(final: Path) -> Path:
    """A fresh temporary directory next to ``final`` (same filesystem, so rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))


def publish(run_dir: Path, save: Callable[[Path], None]) -> None:
    """Write final artefacts with ``save(tmp_dir)`` beside ``run_dir``, then move them into it
    one file at a time (each rename atomic): a failed save leaves no half-written artefact."""
    tmp = atomic_dir(run_dir / "final")
    try:
        save(tmp)
        for item in tmp.iterdir():
            target = run_dir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def commit_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def save(
    ckpt_root: Path,
    step: int,
    *,
    save_trainable,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int,
) -> Path:
    final = ckpt_root / f"{PREFIX}{step:07d}"
    tmp = atomic_dir(final)
    try:
        save_trainable(tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        commit_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    done = [p for p in ckpt_root.glob(f"{PREFIX}*") if (p / "state.json").is_file()]
    return sorted(done)


def load_file(path: Path) -> Any:
    return torch.load(path, weights_only=True, map_location="cpu")


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "state.json").read_text())
