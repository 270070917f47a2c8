"""train.sharding: fsdp (issue 23): FSDP2 over 2 CPU processes (gloo) trains the same weights as
one process with the same global batch, for full fine-tuning and LoRA; each rank holds half of
every sharded weight; the artefact is the one a single process writes; what is not supported
yet is refused in one line before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimtune import config
from slimtune.cli import main
from slimtune.loop import train

from .conftest import tiny_recipe
from .test_ddp import launch


def _single(recipe: dict) -> dict[str, torch.Tensor]:
    result = train(config.from_dict(recipe))
    return {n: p.detach().clone() for n, p in result.model.named_parameters() if p.requires_grad}


@pytest.mark.slow
@pytest.mark.parametrize(
    "params,optimizer",
    [
        ({"name": "full"}, {"name": "sgd", "lr": 0.1, "momentum": 0.9}),
        (
            {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
            {"name": "adamw", "lr": 1e-2},
        ),
    ],
    ids=["full-sgd", "lora-adamw"],
)
def test_fsdp_two_processes_equal_one_process(tmp_path, text_data, params, optimizer):
    """2 ranks x micro-batch 2 with FSDP against 1 process x 4: the same weights.

    Tolerance 1e-5 (absolute and relative), argued as in test_ddp.py: the sides sum the same
    per-token gradient terms in another order (each rank's half, then reduce-scatter over
    gloo, against one batch), ~1e-7 relative, through 3 steps that barely amplify it (SGD is
    linear in the gradient; AdamW's first steps move each weight by ~lr whatever the scale, so
    they amplify nothing). A wrong gradient scale or a missing reduction moves weights by a
    fraction of their 1e-3+ movement."""
    common = {"data": {"format": "text", "eval_size": 2}, "params": params, "optimizer": optimizer}
    train_cfg = {"steps": 3, "grad_accum": 2, "max_grad_norm": 100.0, "progress": False}
    # LoRA with train.trim_memory (heap trimmed after each block): numerically a no-op
    trim = params["name"] == "lora"
    ranks = launch(
        tiny_recipe(
            text_data,
            tmp_path / "fsdp",
            train={**train_cfg, "batch_size": 2, "sharding": "fsdp", "trim_memory": trim},
            **common,
        ),
        tmp_path,
    )
    ref = train(
        config.from_dict(
            tiny_recipe(text_data, tmp_path / "ref", train={**train_cfg, "batch_size": 4}, **common)
        )
    )
    ref_w = {n: p.detach() for n, p in ref.model.named_parameters() if p.requires_grad}
    # really sharded: the ranks' pieces add up to the model, each holds about half
    total = sum(p.numel() for p in ref.model.parameters())
    assert sum(r["local_numel"] for r in ranks) == total
    assert all(r["local_numel"] <= 0.51 * total for r in ranks)
    for rank in ranks:
        assert rank["summary"]["processes"] == 2
        w = rank["weights"]
        assert w.keys() == ref_w.keys() and w
        for name, value in ref_w.items():
            torch.testing.assert_close(w[name], value, atol=1e-5, rtol=1e-5, msg=name)
        assert rank["summary"]["train_loss"] == pytest.approx(ref.summary["train_loss"], rel=1e-5)
    # the evaluation before and after ran (on every rank), the main process logged it
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["eval_after"]["loss"] == pytest.approx(
        ref.summary["eval_after"]["loss"], rel=1e-5
    )
    # the artefact is what one process writes: same files, same tensors
    from safetensors.torch import load_file

    final = sorted(p.name for p in (tmp_path / "fsdp").iterdir() if p.suffix == ".safetensors")
    assert final == sorted(
        p.name for p in (tmp_path / "ref").iterdir() if p.suffix == ".safetensors"
    )
    assert final
    for name in final:
        a, b = load_file(tmp_path / "fsdp" / name), load_file(tmp_path / "ref" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"params": {"name": "lisa", "layers": 1}}, "params: lisa changes which blocks train"),
        ({"optimizer": {"name": "mezo"}}, "optimizer: mezo perturbs whole weight tensors"),
        ({"optimizer": {"name": "galore"}}, "optimizer: galore projects each gradient matrix"),
        ({"params": {"name": "hft"}}, "params: hft selects and masks parts of whole tensors"),
        (
            {"optimizer": {"name": "adamw", "state_bits": 8}},
            "state_bits=8 or paged=true quantises whole tensors",
        ),
        ({"params": {"name": "lora", "ggpo": True}}, "ggpo=true perturbs with whole momentum"),
        ({"train": {"gradient_checkpointing": True}}, "gradient_checkpointing is not tested"),
        ({"base": "nf4", "params": {"name": "lora"}}, "FSDP cannot split"),
    ],
)
def test_unsupported_combinations_are_refused_in_one_line(
    tmp_path, cls_data, capsys, change, message
):
    recipe = tiny_recipe(cls_data, tmp_path / "run", params={"name": "full"})
    recipe["train"]["sharding"] = "fsdp"
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict) and key == "train":
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "train.sharding: none" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fsdp_kill_and_resume_is_exact(tmp_path, text_data, monkeypatch, capsys):
    """2 processes with FSDP, a checkpoint every 2 steps, killed after step 2, resumed: the
    same weights, bit for bit, as the uninterrupted 2-process run (the trainable tensors come
    back whole and are sharded again, each process's optimizer shards from its own file).
    A checkpoint written sharded refuses to resume without sharding, in one line."""
    sections = {
        "data": {"format": "text", "eval_size": 0},
        "params": {"name": "full"},
        "optimizer": {"name": "adamw", "lr": 1e-2},
    }
    train_cfg = {"steps": 4, "batch_size": 2, "progress": False, "sharding": "fsdp"}
    for d in "abc":
        (tmp_path / d).mkdir()
    # launched through the README's accelerate config (its 4 GPUs overridden: 2 CPU processes)
    config_file = Path(__file__).parents[1] / "examples/accelerate/one-machine-4-gpus.yaml"
    straight = launch(
        tiny_recipe(text_data, tmp_path / "straight", train=train_cfg, **sections),
        tmp_path / "a",
        config_file=config_file,
    )
    resumable = tiny_recipe(
        text_data, tmp_path / "killed", train={**train_cfg, "save_every": 2}, **sections
    )
    monkeypatch.setenv("SLIMTUNE_TEST_KILL_AT", "2")
    killed = launch(resumable, tmp_path / "b")
    assert all(r.get("killed") for r in killed)
    ckpts = sorted((tmp_path / "killed" / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-0000002"]
    files = sorted(p.name for p in ckpts[0].iterdir())
    assert "optimizer-rank0.pt" in files and "optimizer-rank1.pt" in files
    assert "optimizer.pt" not in files
    monkeypatch.delenv("SLIMTUNE_TEST_KILL_AT")
    resumed = launch({**resumable, "resume": True}, tmp_path / "c")
    for a, b in zip(straight, resumed):
        assert a["summary"]["train_loss"] == b["summary"]["train_loss"]
        assert a["weights"].keys() == b["weights"].keys()
        for name in a["weights"]:
            assert torch.equal(a["weights"][name], b["weights"][name]), name
    # the sharded checkpoint cannot resume in one unsharded process
    plain = {
        **resumable,
        "resume": True,
        "resume_changes": ["train.sharding"],
        "train": {**resumable["train"], "sharding": "none"},
    }
    path = tmp_path / "plain.json"
    path.write_text(json.dumps(plain))
    # the run directory holds a finished run now; the refusal comes before it is touched
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "holds sharded optimizer state" in err and len(err.strip().splitlines()) == 1
