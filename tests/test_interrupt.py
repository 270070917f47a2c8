"""Ctrl-C / SIGTERM during training: the first signal stops the run after the step it is in,
with a checkpoint that ``resume=true`` continues exactly; a second one stops at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from slimtune import checkpoint, config
from slimtune.errors import Interrupted
from slimtune.loop import train

from .conftest import tiny_recipe


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_leaves_a_checkpoint_that_resumes_exactly(tmp_path, cls_data, sig):
    lora = {"params": {"name": "lora", "r": 2}, "train": {"steps": 4}}
    straight = train(config.from_dict(tiny_recipe(cls_data, tmp_path / "straight", **lora)))
    recipe = tiny_recipe(cls_data, tmp_path / "run", **lora)

    def send(step, model, row):
        if step == 2:
            os.kill(os.getpid(), sig)  # delivered to this (main) thread, as a Ctrl-C is

    with pytest.raises(Interrupted, match="stopped after step 2 of 4; last good checkpoint"):
        train(config.from_dict(recipe), on_step=send)
    assert signal.getsignal(sig) is not None  # the run's handler is gone again
    (ckpt,) = checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert ckpt.name.endswith("2")
    resumed = train(config.from_dict({**recipe, "resume": True}))
    assert resumed.summary["train_loss"] == straight.summary["train_loss"]
    for (n, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n


def test_a_signal_on_a_checkpoint_step_writes_no_second_checkpoint(tmp_path, cls_data):
    recipe = tiny_recipe(cls_data, tmp_path / "run", train={"steps": 4, "save_every": 2})

    def send(step, model, row):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        train(config.from_dict(recipe), on_step=send)
    assert len(checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")) == 1


def test_a_second_signal_stops_at_once(tmp_path, cls_data):
    recipe = tiny_recipe(cls_data, tmp_path / "run", train={"steps": 4})

    def send(step, model, row):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # raises KeyboardInterrupt right here

    with pytest.raises(KeyboardInterrupt) as caught:
        train(config.from_dict(recipe), on_step=send)
    assert not isinstance(caught.value, Interrupted)
    assert checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints") == []


def test_the_cli_says_how_to_resume_and_exits_130(tmp_path, cls_data):
    """A real process, a real SIGINT: one line naming the checkpoint and resume=true."""
    recipe = tiny_recipe(cls_data, tmp_path / "run", train={"steps": 100000})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.Popen(
        [sys.executable, "-m", "slimtune", "train", str(path)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and any("lr" in x for x in metrics.read_text().splitlines())):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("slimtune: interrupted: stopped after step "), err
    assert "continue with resume=true" in last and "Traceback" not in err
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    step = max(r["step"] for r in rows if "lr" in r)
    (ckpt,) = checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert str(ckpt) in last and ckpt.name.endswith(str(step))
