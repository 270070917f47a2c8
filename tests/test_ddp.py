"""The same loop under ``accelerate launch`` with 2 CPU processes (gloo) really synchronises.

Guards against the silent traps of CPU multi-processing: ``accelerate launch --cpu`` starting one
process, and processes that each believe they are alone (duplicate, unsynchronised training, no
error). Two ranks with micro-batch b must see different shards, end with identical weights, and
those weights must equal one process with micro-batch 2b on the same data and seed: DDP averages
gradients, and the loop normalises the loss by the target tokens of the whole step on all
processes, times the world size.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimtune import config
from slimtune.loop import train

from .conftest import tiny_recipe
from .ddp_worker import recording_batches, trainable

WORKER = Path(__file__).with_name("ddp_worker.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")
# Variables of an enclosing launcher that would confuse the one we start.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")
LAUNCHER_VARS += ("MASTER_PORT", "TORCHELASTIC_RUN_ID", "CUDA_VISIBLE_DEVICES")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    recipe: dict, tmp_path: Path, processes: int = 2, config_file: Path | None = None
) -> list[dict]:
    """Run tests/ddp_worker.py on ``processes`` CPU processes (gloo) with ``accelerate launch``
    (``config_file``: an accelerate config the flags below override); each rank's record."""
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps(recipe))
    out = tmp_path / "ranks"
    out.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCHER_VARS and not k.startswith("ACCELERATE_")
    }
    env.update(
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        # nothing may reach the network; HF_HOME also hides any user accelerate config
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HOME=str(tmp_path / "hf_home"),
        CUDA_VISIBLE_DEVICES="",
    )
    cmd = [
        str(ACCELERATE),
        "launch",
        *(["--config_file", str(config_file)] if config_file else []),
        "--multi_gpu",
        f"--num_processes={processes}",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",
        str(WORKER),
        str(recipe_file),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    log = f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"
    assert proc.returncode == 0, log
    files = sorted(out.glob("rank*.pt"))
    # One file per rank: a launcher that silently starts one process leaves only rank0.pt.
    assert [f.name for f in files] == [f"rank{r}.pt" for r in range(processes)], log
    return [torch.load(f, weights_only=True) for f in files]


@pytest.mark.slow
def test_two_cpu_processes_equal_one_process_with_double_batch(tmp_path, text_data):
    # Sequences of different lengths, so the per-step token normalisation matters; accumulation
    # 2, so no_sync on the first micro-batch is exercised. SGD and a clipping threshold above the
    # gradient norms (~2.5; the norm is still computed, globally), so that the final weights
    # depend on the scale of the gradient: AdamW or active clipping would hide a wrong scale.
    common = {
        "data": {"format": "text", "eval_size": 0},
        "params": {"name": "full"},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    }
    train_cfg = {"steps": 3, "grad_accum": 2, "max_grad_norm": 100.0, "progress": False}
    ddp_dir = tmp_path / "ddp"
    ranks = launch(
        tiny_recipe(text_data, ddp_dir, train={**train_cfg, "batch_size": 2}, **common),
        tmp_path,
    )

    # Really two processes, of one process group, over gloo.
    for r, rec in enumerate(ranks):
        assert rec["dist_initialized"], f"rank file {r}: torch.distributed not initialised"
        assert (rec["dist_rank"], rec["dist_world"]) == (r, 2)
        assert (rec["env_rank"], rec["env_world"]) == (r, 2)
        assert rec["backend"] == "gloo"
        assert rec["summary"]["processes"] == 2

    # Different shards: at every micro-batch the two ranks trained on disjoint examples.
    b0, b1 = ranks[0]["batches"], ranks[1]["batches"]
    assert len(b0) == len(b1) == 3 * 2  # steps x grad_accum micro-batches each
    for k, (x, y) in enumerate(zip(b0, b1, strict=True)):
        assert len(x) == len(y) == 2
        assert not set(x) & set(y), f"micro-batch {k}: both ranks saw the same example"

    # Synchronised: identical weights on both ranks, bit for bit.
    w0, w1 = ranks[0]["weights"], ranks[1]["weights"]
    assert w0.keys() == w1.keys() and w0
    for name in w0:
        assert torch.equal(w0[name], w1[name]), f"{name} differs between ranks"

    # ... and equal to one process with the doubled micro-batch on the same data and seed.
    untrained: dict[str, torch.Tensor] = {}

    def keep_untrained(step, model, row):
        if row is None:
            untrained.update(trainable(model))

    with recording_batches() as ref_batches:
        ref = train(
            config.from_dict(
                tiny_recipe(
                    text_data, tmp_path / "ref", train={**train_cfg, "batch_size": 4}, **common
                )
            ),
            on_step=keep_untrained,
        )
    # The global micro-batch is split between ranks in order: rank 0 first, then rank 1.
    assert ref_batches == [x + y for x, y in zip(b0, b1, strict=True)]
    ref_w = trainable(ref.model)
    assert ref_w.keys() == w0.keys()
    # Tolerance 1e-5 (absolute and relative, here and on loss and gradient norm below): the two
    # sides sum the same per-token terms in another order (two shard sums all-reduced over gloo,
    # one thread each, vs one batch), ~1e-7 relative in the gradients, and SGD is linear in them:
    # 3 steps of lr 0.1, momentum 0.9, barely amplify it (seen: 1.2e-7 on weights, 2e-7 on loss,
    # with the reference on one or two threads, MKL's AVX-512 or AVX2 path). A wrong gradient
    # scale (the thing this guards) moves the weights by a fraction of their 1e-3+ movement.
    for name, w in ref_w.items():
        torch.testing.assert_close(w0[name], w, atol=1e-5, rtol=1e-5, msg=name)
    moved = max(float((ref_w[n] - untrained[n]).abs().max()) for n in ref_w)
    assert moved > 1e-3, "training did not move the weights: the comparison would prove nothing"
    for rec in ranks:
        assert rec["summary"]["train_loss"] == pytest.approx(ref.summary["train_loss"], rel=1e-5)
        assert rec["summary"]["tokens"] == ref.summary["tokens"]

    # The shared run directory was written once, by the main process, and its per-step loss and
    # (pre-clipping, global) gradient norm are those of the single process.
    summary = json.loads((ddp_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3
    rows = [json.loads(x) for x in (ddp_dir / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [
        json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [1, 2, 3]
    for row, ref_row in zip(rows, ref_rows, strict=True):
        for key in ("loss", "grad_norm"):
            assert row[key] == pytest.approx(ref_row[key], rel=1e-5), (row["step"], key)
        assert row["tokens"] == ref_row["tokens"]


@pytest.mark.slow
def test_zeroth_order_two_processes_equal_one_process_with_double_batch(tmp_path, text_data):
    """MeZO under DDP: each rank runs its shard through the stacked +-eps forward, the loss sums
    are all-reduced, so both ranks draw the same z, compute the same projected gradient and end
    with identical weights, equal to one process with the doubled batch."""
    common = {
        "data": {"format": "text", "eval_size": 0},
        "params": {"name": "full"},
        # eps 0.1, not 1e-2: the projected gradient divides a loss difference by 2 eps, so a
        # larger eps keeps the rounding of the loss from dominating the tolerance (below).
        "optimizer": {"name": "mezo", "lr": 1e-2, "eps": 1e-1},
    }
    train_cfg = {"steps": 3, "grad_accum": 2, "progress": False}
    ranks = launch(
        tiny_recipe(text_data, tmp_path / "ddp", train={**train_cfg, "batch_size": 2}, **common),
        tmp_path,
    )
    w0, w1 = ranks[0]["weights"], ranks[1]["weights"]
    for name in w0:
        assert torch.equal(w0[name], w1[name]), f"{name} differs between ranks"
    untrained: dict[str, torch.Tensor] = {}

    def keep_untrained(step, model, row):
        if row is None:
            untrained.update(trainable(model))

    ref = train(
        config.from_dict(
            tiny_recipe(text_data, tmp_path / "ref", train={**train_cfg, "batch_size": 4}, **common)
        ),
        on_step=keep_untrained,
    )
    ref_w = trainable(ref.model)
    # Both draw the same z; only the two losses differ, summed over shards and processes in
    # another order: by at most ~log2(tokens) u ~ 4e-7 of a loss of ~6, 2.4e-6. The projected
    # gradient divides the difference of the two by 2 eps = 0.2, and each step moves a weight
    # by lr g z (|z| <= ~5): <= 1e-2 * 2.4e-5 * 5 = 1.2e-6 per step, 3.6e-6 over the 3
    # steps (the weights' own feedback through the loss is second order here). With eps 1e-2
    # that bound was 3.6e-5, above this 1e-5 tolerance (seen then 2.4e-6, now 2.4e-7, with one
    # or two threads and MKL's AVX-512 or AVX2 path).
    moved = max(float((ref_w[n] - untrained[n]).abs().max()) for n in ref_w)
    assert moved > 1e-3, "training did not move the weights: the comparison would prove nothing"
    for name, w in ref_w.items():
        torch.testing.assert_close(w0[name], w, atol=1e-5, rtol=0, msg=name)
    for rec in ranks:
        assert rec["summary"]["train_loss"] == pytest.approx(ref.summary["train_loss"], rel=1e-5)
