"""Issue 15: non-finite updates never reach the weights or a checkpoint; one run owns its
directory; resume housekeeping (metrics, temporaries, changed recipes); overrides in any order;
a full disk during a checkpoint write."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from slimtune import checkpoint, config, rundir
from slimtune.cli import main
from slimtune.errors import SlimtuneError, TrainingDiverged
from slimtune.loop import train

from .conftest import Kill, tiny_recipe


def _all_finite(ckpt_root: Path) -> None:
    for ckpt in checkpoint.list_checkpoints(ckpt_root):
        for name, t in load_file(str(ckpt / "trainable.safetensors")).items():
            assert torch.isfinite(t).all(), (ckpt, name)


# --------------------------------------------------------------------------------------------
# Item 3: the NaN guard
# --------------------------------------------------------------------------------------------


def test_non_finite_gradient_with_clipping_off_never_reaches_the_weights(tmp_path, cls_data):
    """A finite loss over an inf gradient (a hook poisons one gradient at step 3)."""
    recipe = tiny_recipe(
        cls_data,
        tmp_path / "run",
        optimizer={"name": "sgd", "lr": 0.1},
        train={"steps": 5, "save_every": 1, "max_grad_norm": 0, "progress": False},
    )
    seen = {}

    def poison(step, model, row):
        seen["model"] = model
        if step == 2:
            p = next(p for p in model.parameters() if p.requires_grad)
            p.register_hook(lambda g: g * float("inf"))
        seen[step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    with pytest.raises(TrainingDiverged, match=r"at step 3: loss is [0-9.]+, grad norm (inf|nan)"):
        train(config.from_dict(recipe), on_step=poison)
    for n, p in seen["model"].named_parameters():  # the step was not applied
        assert torch.equal(p, seen[2][n]), n
    _all_finite(tmp_path / "run" / "checkpoints")
    assert [c.name for c in checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "step-0000001",
        "step-0000002",
    ]
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_overflowing_update_is_never_saved(tmp_path, cls_data, clip):
    """Finite loss and gradients, but lr 1e38 overflows the weights in the update itself."""
    recipe = tiny_recipe(
        cls_data,
        tmp_path / "run",
        optimizer={"name": "sgd", "lr": 1e38},
        train={"steps": 4, "save_every": 1, "max_grad_norm": clip, "progress": False},
    )
    with pytest.raises(TrainingDiverged, match="training stopped"):
        train(config.from_dict(recipe))
    _all_finite(tmp_path / "run" / "checkpoints")
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert not (tmp_path / "run" / ".work").exists()


def test_non_finite_weights_never_become_the_final_artefact(tmp_path, cls_data):
    recipe = tiny_recipe(cls_data, tmp_path / "run", train={"steps": 2, "progress": False})

    def spoil(step, model, row):
        if step == 2:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="weight .* is no longer finite"):
        train(config.from_dict(recipe), on_step=spoil)
    assert not (tmp_path / "run" / "model.safetensors").exists()


# --------------------------------------------------------------------------------------------
# Item 4: one run owns its directory
# --------------------------------------------------------------------------------------------


def test_locked_directory_is_refused_in_process(tmp_path, cls_data, capsys):
    recipe = tiny_recipe(cls_data, tmp_path / "run", train={"steps": 1, "progress": False})
    holder = rundir.RunDir.acquire(config.from_dict(recipe))
    try:
        (tmp_path / "run" / "theirs.txt").write_text("a live run's file")
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        assert main(["train", str(path), "overwrite=true"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "in use by another running slimtune" in err, err
        assert [p.name for p in (tmp_path / "run").iterdir()] == ["theirs.txt"]
    finally:
        holder.release()


# The first run, in its own process, holds the directory from step 1 until the test says so.
FIRST_RUN = """
import sys, time
from pathlib import Path
from slimtune import config
from slimtune.loop import train

started, release = Path(sys.argv[2]), Path(sys.argv[3])

def hold(step, model, row):
    if step == 1:
        started.touch()
        deadline = time.time() + 240
        while not release.exists():  # bounded: a broken test fails instead of hanging
            assert time.time() < deadline, "never released"
            time.sleep(0.05)

train(config.load(sys.argv[1]), on_step=hold)
"""


@pytest.mark.slow
def test_second_run_on_a_live_directory_exits_2_and_the_first_finishes(tmp_path, cls_data):
    out = tmp_path / "run"
    recipe = tiny_recipe(cls_data, out, train={"steps": 6, "save_every": 1, "progress": False})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    started, release = tmp_path / "started", tmp_path / "release"
    (tmp_path / "first.py").write_text(FIRST_RUN)
    first = subprocess.Popen(
        [sys.executable, str(tmp_path / "first.py"), str(path), str(started), str(release)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 240
        while not started.exists():
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline, "the first run did not start"
            time.sleep(0.1)
        for extra in (["overwrite=true"], ["resume=true"], []):
            second = subprocess.run(
                [sys.executable, "-m", "slimtune", "train", str(path), *extra],
                capture_output=True,
                text=True,
                timeout=240,
            )
            assert second.returncode == 2, (extra, second.stderr)
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1, second.stderr
            # overwrite and resume (step 1 is checkpointed): the lock; neither: not empty
            want = "is not empty" if not extra else "in use by another running slimtune"
            assert want in lines[0], lines
        release.touch()
        _, err = first.communicate(timeout=240)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "lr" in r] == list(range(1, 7))
    assert (out / "model.safetensors").is_file()


def test_failed_setup_leaves_no_directory_and_overwrite_keeps_the_old_run(tmp_path, cls_data):
    bad = tiny_recipe(cls_data, tmp_path / "new" / "run", params={"name": "freeze", "layers": [9]})
    with pytest.raises(SlimtuneError, match="out of range"):
        train(config.from_dict(bad))
    assert not (tmp_path / "new").exists()  # not even the parent it created
    old = tiny_recipe(cls_data, tmp_path / "old", train={"steps": 1, "progress": False})
    train(config.from_dict(old))
    before = sorted(p.name for p in (tmp_path / "old").iterdir())
    again = {**old, "overwrite": True, "params": {"name": "freeze", "layers": [9]}}
    with pytest.raises(SlimtuneError, match="out of range"):
        train(config.from_dict(again))
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == before


# --------------------------------------------------------------------------------------------
# Item 5: resume housekeeping
# --------------------------------------------------------------------------------------------


def test_three_kills_and_resumes_leave_each_step_once_and_no_temporaries(tmp_path, cls_data):
    sections = {"train": {"steps": 8, "progress": False, "eval_every": 2}}
    straight = train(config.from_dict(tiny_recipe(cls_data, tmp_path / "a", **sections)))
    out = tmp_path / "b"
    recipe = tiny_recipe(
        cls_data, out, train={**sections["train"], "save_every": 2, "keep_checkpoints": 5}
    )
    for i, kill_at in enumerate((3, 5, 7)):  # each kill one step after a checkpoint

        def kill(step, model, row, kill_at=kill_at):
            if step == kill_at:
                # What a SIGKILL during the next checkpoint and a metrics write leaves behind.
                (out / "checkpoints" / f".tmp-step-{step:07d}-x").mkdir()
                (out / ".tmp-final-y").mkdir()
                with (out / "metrics.jsonl").open("a") as f:
                    f.write('{"step": 99, "lo')
                raise Kill

        with pytest.raises(Kill):
            train(config.from_dict({**recipe, "resume": i > 0}), on_step=kill)
    resumed = train(config.from_dict({**recipe, "resume": True}))
    for (n, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "lr" in r]
    assert steps == list(range(1, 9))
    evals = [(r["step"], r["eval"]) for r in rows if "eval" in r]
    rows_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    want = [(r["step"], r["eval"]) for r in rows_a if "eval" in r]
    assert evals == want
    assert not list(out.rglob(".tmp-*"))


def test_changed_recipe_on_resume_is_refused_or_allowed_and_recorded(tmp_path, cls_data, capsys):
    out = tmp_path / "run"
    recipe = tiny_recipe(cls_data, out, train={"steps": 4, "save_every": 2, "progress": False})

    def kill(step, model, row):
        if step == 3:
            raise Kill

    with pytest.raises(Kill):
        train(config.from_dict(recipe), on_step=kill)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**recipe, "resume": True}))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["train", str(path), "optimizer.lr=0.02", "train.steps=6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "optimizer.lr (0.01 -> 0.02)" in err and "train.steps (4 -> 6)" in err, err
    assert "resume_changes=[optimizer.lr,train.steps]" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(["train", str(path), "resume_changes=[train.stepz]"]) == 2
    assert "resume_changes[0]" in capsys.readouterr().err

    allowed = ["optimizer.lr=0.02", "train.steps=6", "resume_changes=[optimizer.lr,train.steps]"]
    assert main(["train", str(path), *allowed]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    (event,) = [r for r in rows if r.get("event") == "resume"]
    assert event["from_step"] == 2
    assert event["changes"] == {"optimizer.lr": [0.01, 0.02], "train.steps": [4, 6]}
    # The new peak learning rate is the one in use, on the new schedule (cosine over 6 steps).
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    import math

    # Both sides are float64 arithmetic on the same few numbers (transformers' cosine schedule
    # and this formula): they agree to a few ulps; pytest.approx's 1e-6 relative is far above.
    for step in (3, 4, 5, 6):
        assert lrs[step] == pytest.approx(0.02 * 0.5 * (1 + math.cos(math.pi * step / 6)))
    assert [r["step"] for r in rows if "lr" in r] == [1, 2, 3, 4, 5, 6]
    assert yaml.safe_load((out / "config.yaml").read_text())["optimizer"]["lr"] == 0.02


def test_checkpoint_write_on_a_full_disk_is_one_line(tmp_path, cls_data, capsys, monkeypatch):
    recipe = tiny_recipe(cls_data, tmp_path / "run", train={"steps": 3, "save_every": 1})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] > 4:  # the first checkpoint (4 files) fits, the second does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    assert main(["train", str(path), "train.progress=false"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err, err
    assert "the last good checkpoint is" in err and "step-0000001" in err
    ckpts = tmp_path / "run" / "checkpoints"
    assert [c.name for c in checkpoint.list_checkpoints(ckpts)] == ["step-0000001"]
    assert not list((tmp_path / "run").rglob(".tmp-*"))


# --------------------------------------------------------------------------------------------
# Item 6: overrides in any order; an option the method lacks is named
# --------------------------------------------------------------------------------------------

ORDERS = [
    (["params=lora", "params.r=4"], ["params.r=4", "params=lora"]),
    (["optimizer=galore", "optimizer.rank=2"], ["optimizer.rank=2", "optimizer=galore"]),
    (["params.name=lora", "params.alpha=4"], ["params.alpha=4", "params.name=lora"]),
    (
        ["params=lisa", "params.layers=1", "optimizer=sgd"],
        ["optimizer=sgd", "params.layers=1", "params=lisa"],
    ),
]


@pytest.mark.parametrize("first, second", ORDERS)
def test_overrides_in_either_order_give_the_same_recipe(tmp_path, cls_data, first, second):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(cls_data, tmp_path / "run")))
    a, b = config.load(path, first), config.load(path, second)
    assert config.dump(a) == config.dump(b)
    assert config.dump(a) != config.dump(config.load(path))  # the overrides did something


def test_switching_method_drops_the_old_methods_options(tmp_path, cls_data):
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(tiny_recipe(cls_data, tmp_path / "run", params={"name": "lora", "r": 4}))
    )
    assert config.load(path, ["params=full"]).params.name == "full"
    assert config.load(path, ["params=lora"]).params.r == 4
    with pytest.raises(SlimtuneError, match=r"config: params: unknown key 'r'"):
        config.load(path, ["params=full", "params.r=4"])
    with pytest.raises(
        SlimtuneError, match=r"config: top level of the recipe: unknown key 'trian'"
    ):
        config.load(path, ["trian.steps=4"])
