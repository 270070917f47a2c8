"""One process of the multi-process test (tests/test_ddp.py), started by ``accelerate launch``.

Usage: ``ddp_worker.py RECIPE.json OUT_DIR``. Runs ``slimtune.loop.train`` on the recipe and
writes ``OUT_DIR/rank{N}.pt``: the rank and world size (as torch.distributed and the run summary
see them), the final trainable weights and the examples this process trained on.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from slimtune import config, data, loop


@contextmanager
def recording_batches():
    """Record the examples of every micro-batch the loop collates on this process, in order
    (its data order, `data.Batches`, collates through `data.collate`)."""
    seen: list[list[tuple[int, ...]]] = []
    original = data.collate

    def collate(examples, pad_id):
        seen.append([tuple(ex.input_ids) for ex in examples])
        return original(examples, pad_id)

    data.collate = collate
    try:
        yield seen
    finally:
        data.collate = original


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _local(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


def whole_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``trainable`` of the whole weights (gathered from every rank when sharded: every rank
    must call it)."""
    from slimtune.sharding import full_weights

    with full_weights(model):
        return trainable(model)


class Killed(Exception):
    """Raised from the step callback: a run killed after a step (SLIMTUNE_TEST_KILL_AT)."""


def main(recipe_path: str, out_dir: str) -> None:
    cfg = config.from_dict(json.loads(Path(recipe_path).read_text()))
    kill_at = int(os.environ.get("SLIMTUNE_TEST_KILL_AT", "0"))

    def on_step(step, model, row):
        if kill_at and step == kill_at:
            raise Killed

    with recording_batches() as seen:
        try:
            result = loop.train(cfg, on_step=on_step)
        except Killed:
            rank = dist.get_rank() if dist.is_initialized() else 0
            torch.save({"killed": True}, Path(out_dir) / f"rank{rank}.pt")
            return
    record = {
        "dist_initialized": dist.is_available() and dist.is_initialized(),
        "dist_rank": dist.get_rank() if dist.is_initialized() else -1,
        "dist_world": dist.get_world_size() if dist.is_initialized() else 1,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "env_rank": int(os.environ.get("RANK", -1)),
        "env_world": int(os.environ.get("WORLD_SIZE", -1)),
        "summary": {k: v for k, v in result.summary.items() if not k.startswith("eval")},
        "batches": seen,
        "weights": whole_trainable(result.model),
        # elements this process holds (under FSDP: its shards)
        "local_numel": sum(_local(p).numel() for p in result.model.parameters()),
    }
    rank = record["dist_rank"] if record["dist_initialized"] else 0
    torch.save(record, Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:3])
