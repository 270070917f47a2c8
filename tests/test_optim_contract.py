"""The contract every optimizer method keeps, run for each registered one (and its modes) on the
tiny random Llama with full fine-tuning, with clipping on and a checkpoint in the middle: the
weights move, the loss stays finite, the state loads with weights_only=True, and a run killed
after its checkpoint and resumed ends bitwise equal to a straight run."""

from __future__ import annotations

import pytest
import torch

from slimtune import config, registry
from slimtune.loop import train

from .conftest import assert_resume_exact, tiny_recipe

VARIANTS = {name: {} for name in registry.names("optimizer")}
VARIANTS.update(
    {
        "galore": {"rank": 4, "update_gap": 2},
        "galore-layerwise": {"rank": 4, "update_gap": 2, "layerwise": True},
        "galore-8bit": {"rank": 4, "state_bits": 8},
        "galore-layerwise-8bit": {"rank": 4, "update_gap": 3, "layerwise": True, "state_bits": 8},
        "natural-galore": {"rank": 4, "update_gap": 2, "history": 3},
        "natural-galore-layerwise": {"rank": 4, "history": 3, "layerwise": True},
        "gradnorm-lorp": {"rank": 4, "update_gap": 2},
        "gradnorm-lorp-layerwise-8bit": {"rank": 4, "layerwise": True, "state_bits": 8},
        "mezo": {"eps": 1e-2},
        "mezo-counter-noise": {"eps": 1e-2, "pool_bits": 0},
        "mezo-n2-one-sided-rademacher": {
            "eps": 1e-2,
            "samples": 2,
            "estimator": "one-sided",
            "noise": "rademacher",
        },
        "mezo-blockwise-masked": {"eps": 1e-2, "blockwise": True, "mask_ratio": 0.5},
        "zo-sgd-momentum": {"eps": 1e-2},
        "zo-sign": {"lr": 1e-3, "eps": 1e-2},
        "zo-cons": {"eps": 1e-2},
        "zo-adam": {"lr": 1e-3, "eps": 1e-2},
        "sparse-mezo": {"eps": 1e-2},
    }
)


def method_of(variant: str) -> str:
    names = sorted(registry.names("optimizer"), key=len, reverse=True)
    return next(n for n in names if variant == n or variant.startswith(n + "-"))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_optimizer_contract(tmp_path, cls_data, variant):
    optim = {"name": method_of(variant), "lr": 1e-2, **VARIANTS[variant]}
    steps = {"steps": 4, "batch_size": 2, "grad_accum": 2, "max_grad_norm": 1.0}
    cpu = {"name": "tiny-llama", "device": "cpu"}
    before = {}

    def snap(step, model, row):
        if row is None:
            before.update({n: p.detach().clone() for n, p in model.named_parameters()})

    straight = train(
        config.from_dict(
            tiny_recipe(cls_data, tmp_path / "a", model=cpu, optimizer=optim, train=steps)
        ),
        on_step=snap,
    )
    assert torch.isfinite(torch.tensor(straight.summary["train_loss"]))
    after = dict(straight.model.named_parameters())
    moved = [n for n, w in before.items() if not torch.equal(after[n], w)]
    assert len(moved) == len(before), set(before) - set(moved)
    stateless = registry.get("optimizer", optim["name"]).stateless
    assert straight.summary["optimizer_state_bytes"] > 0 or stateless

    ckpt = assert_resume_exact(
        straight, cls_data, tmp_path / "b", 2, model=cpu, optimizer=optim, train=steps
    )
    torch.load(ckpt / "optimizer.pt", weights_only=True)
