"""The contract every params method keeps, run for each registered method (and LoRA variant)
on the tiny random Llama: trainable parameters change and frozen ones do not; save -> load
gives identical logits; merge gives the same outputs as the unmerged model."""

from __future__ import annotations

import copy

import pytest
import torch

from slimtune import config, registry
from slimtune.errors import SlimtuneError
from slimtune.loop import train
from slimtune.models import load_model

from .conftest import tiny_recipe

# Extra settings for a method beyond its defaults, and the LoRA variants peft offers.
VARIANTS = {name: {} for name in registry.names("params")}
VARIANTS.update(
    {
        "lora": {"target_modules": ["all-linear"]},
        "lora-dora": {"target_modules": ["q_proj", "v_proj"], "dora": True},
        "lora-rslora": {"rslora": True, "dropout": 0.1},
        "lora-pissa": {"init": "pissa", "pissa_niter": 0},
        "lora-olora": {"init": "olora"},
        "lora-corda": {"init": "corda", "calibration_examples": 8},
        "lora-loftq": {"init": "loftq", "target_modules": ["q_proj", "v_proj"]},
        "lora-head": {"modules_to_save": ["lm_head"]},
        "lora-ggpo": {"ggpo": True, "target_modules": ["q_proj", "v_proj"]},
        "freeze": {"layers": [0], "patterns": ["*.norm.weight"]},
        "owlore": {"layers": 1, "calibration_examples": 4, "threshold": 3.0},
        "prompt-tuning": {"num_virtual_tokens": 4},
        "prompt-tuning-vocab": {"num_virtual_tokens": 4, "init": "vocab"},
        "prefix-tuning": {"num_virtual_tokens": 4},
        "prefix-tuning-projection": {"num_virtual_tokens": 4, "projection": True},
        # peft's tuners: the generic entry (peft's LoRA by default) over several types
        "peft-ia3": {"type": "ia3"},
        "peft-loha": {"type": "loha", "target_modules": ["q_proj", "v_proj"], "r": 4},
        "peft-lokr": {"type": "lokr", "target_modules": ["q_proj", "v_proj"], "r": 4},
        "peft-oft": {"type": "oft", "target_modules": ["q_proj"], "r": 4, "oft_block_size": 0},
        "peft-prompt-tuning": {"type": "prompt-tuning", "num_virtual_tokens": 4},
        "peft-hra": {"type": "hra", "target_modules": ["q_proj", "v_proj"], "r": 4},
        "vera": {"r": 16},
        "p-tuning": {"num_virtual_tokens": 4},
        "llama-adapter": {"adapter_len": 4, "adapter_layers": 1},
        "adalora": {"init_r": 4, "target_r": 2},
        "kasa": {"r": 4},
        "cpt": {"context_examples": 2, "max_context_tokens": 24},
        "nola": {"bases_a": 16, "bases_b": 16},
        "loldu": {"r": 8},
        "ba-lora": {"pissa_niter": 0, "consistency": 0.1, "diversity": 0.1, "svd": 0.1},
        "mam": {"num_virtual_tokens": 4, "bottleneck": 8},
        "nlora": {"r": 4},
        # phase 1 (scales) only in the 4-step run; test_adapters.py runs both phases
        "lofit": {"select_at": 0.9},
        # no growth in the 4-step run (a grown block was frozen at step 0); test_triadapt.py
        # grows ranks
        "triadapt-lora": {"warmup": 10},
        "nlora-slora": {"r": 4, "init": "slora"},
        "nlora-inttune": {"r": 4, "train": "middle"},
        "series-adapter-both": {"placement": ["attention", "mlp"], "bottleneck": 8},
        "parallel-adapter-both": {"placement": ["attention", "mlp"], "bottleneck": 8},
    }
)


def method_of(variant: str) -> str:
    names = sorted(registry.names("params"), key=len, reverse=True)
    return next(n for n in names if variant == n or variant.startswith(n + "-"))


def run(tmp_path, cls_data, variant):
    name = method_of(variant)
    recipe = tiny_recipe(cls_data, tmp_path / "run", params={"name": name, **VARIANTS[variant]})
    snapshots = {}

    def on_step(step, model, row):
        if step == 0:
            snapshots.update({n: p.detach().clone() for n, p in model.named_parameters()})
            snapshots["_trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}

    result = train(config.from_dict(recipe), on_step=on_step)
    return result, snapshots


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits


IDS = torch.tensor([[1, 40, 50, 60, 70, 80, 90, 100]])


NEEDS_CUDA = {"lora-loftq"}  # peft's LoftQ quantiser runs on CUDA/XPU only
CASES = [
    pytest.param(
        v,
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")],
    )
    if v in NEEDS_CUDA
    else v
    for v in sorted(VARIANTS)
]


@pytest.mark.parametrize("variant", CASES)
def test_contract(tmp_path, cls_data, variant):
    result, before = run(tmp_path, cls_data, variant)
    trainable = before.pop("_trainable")
    assert trainable, "no trainable parameter"
    after = dict(result.model.named_parameters())
    for name, old in before.items():
        if name in trainable:
            assert not torch.equal(after[name], old), f"trainable {name} did not change"
        else:
            assert torch.equal(after[name], old), f"frozen {name} changed"

    want = logits(result.model, IDS)
    # save -> load: from the run directory onto a freshly loaded base model
    base, _ = load_model("tiny-llama", device=str(result.model.device))
    loaded = result.method.load(base, result.run_dir)
    # Logits here are O(1). The loaded model holds the same fp32 values (safetensors round-trip
    # exactly) and runs the same products, or groups an adapter's terms otherwise: a few ulps,
    # ~1e-7 (seen: <= 4.8e-7 over all variants under MKL's AVX-512, AVX2 and COMPATIBLE paths,
    # ATen default/AVX2). 1e-5 absolute; a lost or mis-scaled tensor moves logits far more.
    torch.testing.assert_close(logits(loaded, IDS), want, atol=1e-5, rtol=0)

    # merge == unmerged (or, where virtual tokens cannot be folded, one clear error)
    if not result.method.mergeable:
        with pytest.raises(SlimtuneError, match="cannot be folded"):
            result.method.merge(copy.deepcopy(result.model))
        return
    merged = result.method.merge(copy.deepcopy(result.model))
    # Folding rounds each merged weight once (u |W|) and sums W x in one product instead of
    # W x + s B (A x): a few ulps of O(1) logits, as above; 1e-5 absolute.
    torch.testing.assert_close(logits(merged, IDS), want, atol=1e-5, rtol=0)
    assert not any("lora_" in n for n, _ in merged.named_parameters())


def test_every_method_has_a_summary_and_documented_fields():
    from slimtune.config import field_docs
    from slimtune.methods.base import summary_of

    for axis in registry.AXES:
        for name in registry.names(axis):
            cls = registry.get(axis, name)
            assert summary_of(cls), f"{axis}/{name} has no docstring summary"
            docs = field_docs(cls.Config)
            import dataclasses

            for f in dataclasses.fields(cls.Config):
                assert docs.get(f.name), f"{axis}/{name}.{f.name} has no docstring"
