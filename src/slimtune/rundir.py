"""One run owns its directory: a lock for the run's life, nothing left behind by a failed
set-up, and the housekeeping of a resume (temporaries of a killed run, metrics rows of steps
that will be run again, a recipe that changed since the checkpoint).

The lock is an ``fcntl.flock`` on the directory itself (no lock file to leave behind or to
race on): the kernel drops it when the process dies, however it dies. ``overwrite`` empties the
directory in place instead of replacing it, so the lock stays on the directory a second run
opens.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import checkpoint, config
from .config import RunConfig
from .errors import SlimtuneError

WORK = ".work"  # methods' scratch space (prepare()), removed when the run ends
TMP_PREFIX = ".tmp-"  # checkpoint.atomic_dir's temporaries

# Fields a resumed run may change without breaking its equality with an uninterrupted run:
# they decide what is reported or kept, not what is computed.
NEUTRAL = (
    "output_dir",
    "overwrite",
    "resume",
    "resume_changes",
    "eval",
    "federated",
    "train.eval_every",
    "train.eval_before",
    "train.save_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.report_to",
    "train.progress",
    "train.trim_memory",
)


def check(cfg: RunConfig) -> Path:
    """What every process checks before anything is loaded (reads only)."""
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise SlimtuneError(f"config: output_dir: {str(run_dir)!r} exists and is not a directory")
    busy = run_dir.is_dir() and any(p.name != WORK for p in run_dir.iterdir())
    if busy and not (cfg.overwrite or cfg.resume):
        raise SlimtuneError(
            f"config: output_dir: {str(run_dir)!r} is not empty; set resume=true to continue "
            "or overwrite=true to replace it"
        )
    if cfg.resume:
        if not checkpoint.list_checkpoints(run_dir / "checkpoints"):
            raise SlimtuneError(
                f"config: resume: no checkpoint in {str(run_dir / 'checkpoints')!r}"
            )
        check_resume_changes(cfg, run_dir)
    return run_dir


class RunDir:
    """The main process's hold on ``output_dir`` (see the module docstring)."""

    def __init__(self, path: Path, created: list[Path], fd: int):
        self.path, self._created, self._fd = path, created, fd
        self._cleared = False

    @classmethod
    def acquire(cls, cfg: RunConfig) -> RunDir:
        path = Path(cfg.output_dir)
        missing = []  # directories this run creates, outermost last
        p = path.absolute()
        while not p.exists():
            missing.append(p)
            p = p.parent
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _remove_empty(missing)
            raise SlimtuneError(
                f"config: output_dir: cannot create {str(path)!r}: {e.strerror}"
            ) from None
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            _remove_empty(missing)
            raise SlimtuneError(
                f"config: output_dir: {str(path)!r} is in use by another running slimtune "
                "process; wait for it or choose another output_dir"
            ) from None
        try:  # writable (a read-only mount or missing permission shows only on writing)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as e:
            os.close(fd)
            _remove_empty(missing)
            raise SlimtuneError(
                f"config: output_dir: cannot write in {str(path)!r}: {e.strerror}"
            ) from None
        return cls(path, missing, fd)

    def tidy(self) -> None:
        """Remove temporaries a killed run left (safe: this process holds the lock)."""
        for root in (self.path, self.path / "checkpoints"):
            if root.is_dir():
                for p in root.glob(f"{TMP_PREFIX}*"):
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)

    def open(self, cfg: RunConfig, step: int, changes: dict[str, list[Any]]) -> Any:
        """Make the directory the run's: empty it (overwrite), remove a killed run's
        temporaries, cut the metrics back to the resumed step, write the resolved recipe.
        Returns ``metrics.jsonl`` open for appending (with the resume's changes recorded)."""
        if cfg.overwrite and not cfg.resume:
            self.clear()
        self.tidy()
        if cfg.resume:
            truncate_metrics(self.path, step)
        (self.path / "config.yaml").write_text(config.dump(cfg))
        metrics = (self.path / "metrics.jsonl").open("a")
        if changes:
            event = {"event": "resume", "from_step": step, "changes": changes}
            metrics.write(json.dumps(event) + "\n")
        return metrics

    def clear(self) -> None:
        """overwrite=true: empty the directory in place (keeping the lock and ``.work``)."""
        self._cleared = True
        for p in self.path.iterdir():
            if p.name == WORK:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def abandon(self) -> None:
        """A failed set-up: remove what this run created (the directory itself if it made it;
        what it wrote into a directory it had emptied for overwrite), release the lock."""
        shutil.rmtree(self.path / WORK, ignore_errors=True)
        if self._created:
            shutil.rmtree(self.path, ignore_errors=True)
            _remove_empty(self._created)
        elif self._cleared:
            self.clear()
        self.release()

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # innermost first
        with contextlib.suppress(OSError):
            d.rmdir()


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def _covered(key: str, paths: list[str] | tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in paths)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def resume_changes(cfg: RunConfig, run_dir: Path) -> dict[str, list[Any]]:
    """``{field: [checkpointed value, new value]}`` for every field that changed and matters."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return {}
    old = _flatten(config.read_yaml(saved))
    new = _flatten(yaml_roundtrip(cfg.to_dict()))
    changed = {}
    for key in sorted(old):  # a field the checkpointed recipe lacks came with a newer slimtune
        if _covered(key, NEUTRAL):
            continue
        a, b = old.get(key), new.get(key)
        if not _same(a, b):
            changed[key] = [a, b]
    return changed


def yaml_roundtrip(data: dict[str, Any]) -> dict[str, Any]:
    """The recipe as config.yaml stores it (tuples become lists, and so on)."""
    import yaml

    return yaml.safe_load(yaml.safe_dump(data))


def check_resume_changes(cfg: RunConfig, run_dir: Path) -> dict[str, list[Any]]:
    """Refuse a changed recipe unless ``resume_changes`` allows every change."""
    changed = resume_changes(cfg, run_dir)
    flat = _flatten(yaml_roundtrip(cfg.to_dict()))
    for i, p in enumerate(cfg.resume_changes):
        if not any(_covered(k, [p]) for k in flat):
            raise SlimtuneError(f"config: resume_changes[{i}]: {p!r} is not a recipe field")
    refused = {k: v for k, v in changed.items() if not _covered(k, cfg.resume_changes)}
    if refused:
        listing = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in refused.items())
        names = ",".join(refused)
        raise SlimtuneError(
            f"config: resume: the recipe differs from the checkpointed run in {listing}; a "
            f"resumed run would not equal an uninterrupted one: restore the values or allow "
            f"them with resume_changes=[{names}]"
        )
    return changed


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep the metrics rows up to the checkpoint's step: the steps after it run again."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if not isinstance(row, dict):
            continue
        if row.get("step", 0) <= step and row.get("eval") != "after":
            keep.append(line + "\n")
    tmp = path.with_name(f"{TMP_PREFIX}metrics.jsonl")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)
