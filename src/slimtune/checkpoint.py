"""Atomic, exactly resumable checkpoints.

A checkpoint directory holds the trainable tensors (safetensors), the optimizer and scheduler
state and the RNG states (``torch.save`` of tensors and primitives only, read back with
``weights_only=True``), and ``state.json`` (step, data position, counters). It is written under a
temporary name and renamed into place, so a crash never leaves a half-written checkpoint, and
older checkpoints are pruned only after the new one exists.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import SlimtuneError, TrainingDiverged

PREFIX = "step-"

log = logging.getLogger(__name__)


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
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    state: dict[str, Any],
    keep: int,
    shards: Path | None = None,
) -> Path:
    """``optimizer`` None and ``shards`` a directory: a sharded run, whose processes each wrote
    their optimizer state there (``optimizer-rank{N}.pt``); the files move into the checkpoint."""
    final = ckpt_root / f"{PREFIX}{step:07d}"
    try:
        tmp = atomic_dir(final)
    except OSError as e:
        raise _write_error(final, e) from None
    try:
        save_trainable(tmp / "trainable.safetensors")
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if shards is not None:
            for f in sorted(shards.glob("optimizer-rank*.pt")):
                os.replace(f, tmp / f.name)
            shutil.rmtree(shards, ignore_errors=True)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        commit_dir(tmp, final)
    except OSError as e:  # a full disk, a quota, a vanished mount: the old checkpoints stand
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(final, e) from None
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


def _write_error(final: Path, e: OSError) -> SlimtuneError:
    good = list_checkpoints(final.parent)
    where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written"
    return SlimtuneError(f"checkpoint {str(final)!r}: cannot write: {e.strerror or e}; {where}")


def load_file(path: Path) -> Any:
    """A ``torch.save`` file of tensors and primitives; anything else is refused unread."""
    return torch.load(path, weights_only=True, map_location="cpu")


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "state.json").read_text())


STATE_KEYS = ("step", "position", "tokens", "train_seconds")


def restore(
    ckpt: Path,
    *,
    load_trainable,
    optimizer: Any,
    scheduler: Any,
    shard: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint into the run; returns its ``state.json``. A damaged or foreign file
    (truncated, corrupted, a pickle that is more than tensors) is one clear error naming it.
    ``shard`` (rank, world) of a sharded run: this process's optimizer state file."""

    def bad(name: str, why: str) -> SlimtuneError:
        return SlimtuneError(
            f"resume: checkpoint file {str(ckpt / name)!r}: {why}; remove {str(ckpt)!r} to resume "
            "from the checkpoint before it"
        )

    try:
        state = read_state(ckpt)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad("state.json", f"unreadable ({_first_line(e)})") from None
    if not isinstance(state, dict) or any(
        not isinstance(state.get(k), (int, float)) or isinstance(state.get(k), bool)
        for k in STATE_KEYS
    ):
        raise bad("state.json", f"expected numbers {', '.join(STATE_KEYS)}")
    optim: tuple[str, Any] = ("optimizer.pt", lambda p: optimizer.load_state_dict(load_file(p)))
    if shard is not None:
        from .sharding import load_local_optimizer_state

        rank, world = shard
        written = len(list(ckpt.glob("optimizer-rank*.pt")))
        if written != world:
            what = f"{written} processes" if written else "one process, unsharded"
            raise SlimtuneError(
                f"resume: checkpoint {str(ckpt)!r} was written by {what}; resume a sharded run "
                f"with as many processes as wrote it ({world} now)"
            )
        optim = (
            f"optimizer-rank{rank}.pt",
            lambda p: load_local_optimizer_state(optimizer, load_file(p)),
        )
    elif (ckpt / "optimizer-rank0.pt").is_file():
        raise SlimtuneError(
            f"resume: checkpoint {str(ckpt)!r} holds sharded optimizer state "
            "(train.sharding: fsdp); resume with the same train.sharding and processes"
        )
    steps = [
        ("trainable.safetensors", lambda p: load_trainable(p)),
        optim,
        ("scheduler.pt", lambda p: scheduler.load_state_dict(load_file(p))),
        ("rng.pt", lambda p: set_rng_state(load_file(p))),
    ]
    for name, load in steps:
        path = ckpt / name
        if not path.is_file():
            raise bad(name, "missing")
        try:
            load(path)
        except pickle.UnpicklingError as e:
            raise bad(name, f"refused: not a plain tensor file ({_first_line(e)})") from None
        except Exception as e:  # any library's way of saying the bytes are damaged
            raise bad(name, f"unreadable ({_first_line(e)})") from None
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return first[:200]


def last_good(ckpt_root: Path) -> str:
    good = list_checkpoints(ckpt_root)
    return f"last good checkpoint: {good[-1]}" if good else "no checkpoint was written"


def check_finite(state: dict[str, torch.Tensor], step: int, ckpt_root: Path) -> None:
    """No checkpoint and no final artefact may hold a non-finite weight. A finite loss and
    gradient can still give one (an update that overflows, e.g. a huge learning rate); the run
    then stops here, before writing, and the last checkpoint stays the last good one."""
    bad = next((n for n, t in state.items() if not bool(torch.isfinite(t).all())), None)
    if bad is None:
        return
    raise TrainingDiverged(
        f"training stopped after step {step}: weight {bad!r} is no longer finite (the update "
        f"overflowed; lower optimizer.lr or set train.max_grad_norm); {last_good(ckpt_root)}"
    )


def apply_hyperparameters(
    optimizer: torch.optim.Optimizer, scheduler: Any, fresh: list[dict[str, Any]]
) -> None:
    """A resume allowed to change optimizer fields (``resume_changes``): the checkpoint's state
    dict brought back the old hyperparameters; put the recipe's back, and its learning rate
    where the schedule now stands."""
    for group, new in zip(optimizer.param_groups, fresh):
        group.update(new)
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def resume(parts: Any, cfg: Any) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Load the newest checkpoint of ``cfg.output_dir`` into a run's assembled parts
    (``assemble.Parts``): trainable tensors, optimizer, schedule, RNG, data position. Returns its
    ``state.json`` and the recipe changes ``resume_changes`` allowed (applied here)."""
    from . import rundir

    run_dir = Path(cfg.output_dir)
    last = list_checkpoints(run_dir / "checkpoints")[-1]
    changes = rundir.resume_changes(cfg, run_dir)
    # The freshly built hyperparameters, before the checkpoint's replace them.
    opt = parts.optimizer
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    from .sharding import is_sharded

    shard = None
    if is_sharded(parts.plain):
        import torch.distributed as dist

        shard = (dist.get_rank(), dist.get_world_size())
    state = restore(
        last,
        load_trainable=lambda p: parts.method.load_trainable(parts.plain, p),
        optimizer=opt,
        scheduler=parts.scheduler,
        shard=shard,
    )
    if any(k.startswith("optimizer.") for k in changes):
        apply_hyperparameters(opt, parts.scheduler, fresh)
    parts.batches.seek(state["position"])
    log.warning("resumed from %s (step %d)", last, state["step"])
    return state, changes
