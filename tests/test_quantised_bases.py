"""Quantised bases (nf4, fp4, int8 through bitsandbytes): adapters train on them, also after an
evaluation forward (the CPU repack trap), the quantised weights never change, methods that
change base weights are refused in one line, and merging folds the adapter into the weights
the run computed with."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from slimtune import config, registry
from slimtune.cli import main
from slimtune.errors import SlimtuneError
from slimtune.loop import train
from slimtune.models import load_model
from slimtune.plan.planner import Workload, method, plan
from slimtune.plan.shapes import ModelShape

from .conftest import tiny_recipe

W16 = Workload(seq=16, batch=2)

bnb = pytest.importorskip("bitsandbytes")

QUANTISED = ["nf4", "fp4", "int8"]
IDS = torch.tensor([[1, 40, 50, 60, 70, 80, 90, 100]])


def quantised_state(model) -> dict[str, torch.Tensor]:
    """Every stored tensor of the quantised layers: integers and their constants."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            out[name + ".weight"] = m.weight.data.clone()
            out[name + ".absmax"] = qs.absmax.clone()
            if qs.state2 is not None:
                out[name + ".absmax2"] = qs.state2.absmax.clone()
        elif isinstance(m, bnb.nn.Linear8bitLt):
            out[name + ".weight"] = m.weight.data.clone()
            # the row scales move from the weight to the layer's state at its first forward
            scb = m.weight.SCB if m.weight.SCB is not None else m.state.SCB
            out[name + ".SCB"] = scb.clone()
    return out


def lora_recipe(cls_data, out, base, **train_options):
    return tiny_recipe(
        cls_data, out, base=base,
        params={"name": "lora", "r": 4, "target_modules": ["all-linear"]},
        train={"steps": 6, "eval_before": True, **train_options},
    )  # fmt: skip


@pytest.mark.parametrize("name", QUANTISED)
def test_lora_trains_on_a_quantised_base_after_an_evaluation_forward(tmp_path, cls_data, name):
    """eval_before runs an eval-mode, no-grad forward first: on CPUs with AVX512-BF16 that
    would repack 4-bit weights into a layout with no backward, and LoRA would stay at zero."""
    seen = {}

    def on_step(step, model, row):
        if step == 0:
            seen["before"] = quantised_state(model)

    result = train(config.from_dict(lora_recipe(cls_data, tmp_path / "run", name)), on_step=on_step)
    model = result.model
    after = quantised_state(model)
    assert after and after.keys() == seen["before"].keys()
    for key, old in seen["before"].items():  # the frozen integers and constants, bit for bit
        assert torch.equal(after[key], old), key
    bs = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert bs and all(p.abs().sum() > 0 for p in bs)  # gradients reached every adapter
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in rows if "eval" not in r and "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    for m in model.modules():  # the inference-only layout never appeared
        if isinstance(m, bnb.nn.Linear4bit):
            assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)


@pytest.mark.parametrize("name", QUANTISED)
def test_the_quantised_model_keeps_its_head_and_embeddings_in_the_compute_dtype(name):
    model, _ = load_model("tiny-llama", base={"name": name, "compute_dtype": "fp32"})
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear" not in kinds or isinstance(model.lm_head, torch.nn.Linear)
    plain = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert plain == ["lm_head"]  # every other linear is quantised
    assert model.get_input_embeddings().weight.dtype == torch.float32
    dense, _ = load_model("tiny-llama")
    with torch.no_grad():
        q, d = model(IDS).logits, dense(IDS).logits
    # the quantised model is the dense one up to quantisation error: close, not equal
    assert 0 < (q - d).abs().max() < 0.2 * d.abs().max()


def test_config_sets_model_dtype_from_the_compute_dtype(tmp_path, cls_data):
    def cfg(**sections):
        return config.from_dict(tiny_recipe(cls_data, tmp_path / "run", **sections))

    assert cfg(base="nf4").model.dtype == "bf16"
    assert cfg(base={"name": "nf4", "compute_dtype": "fp32"}).model.dtype == "fp32"
    with pytest.raises(SlimtuneError, match="'nf4' computes in 'bf16'.*model.dtype 'fp32'"):
        cfg(base="nf4", model={"name": "tiny-llama", "dtype": "fp32"})
    with pytest.raises(SlimtuneError, match="double_quant"):
        cfg(base={"name": "nf4", "double_quant": "maybe"})


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"base": "nf4"}, "base: 'nf4' holds frozen 4-bit weights, and params 'full' trains"),
        (
            {"base": "int8", "params": {"name": "lisa"}},
            "base: 'int8' holds frozen 8-bit weights, and params 'lisa' trains",
        ),
        (
            {"base": "nf4", "params": {"name": "lora", "init": "pissa"}},
            "params 'lora' init 'pissa' moves the principal part of W into the adapter",
        ),
        (
            {"base": {"name": "nf4", "compute_dtype": "fp16"}, "params": {"name": "lora"}},
            "compute_dtype fp16 has no CPU kernels",
        ),
    ],
)
def test_bad_combinations_give_one_line_and_no_run_directory(
    tmp_path, cls_data, capsys, sections, message
):
    import yaml

    recipe = tiny_recipe(cls_data, tmp_path / "run", **sections)
    recipe["model"]["device"] = "cpu"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "run").exists()


def test_merge_folds_the_adapter_into_the_dequantised_base(tmp_path, cls_data, capsys):
    """The merged checkpoint is the dequantised base plus the adapter: equal (to rounding) to
    the 4-bit model with its adapter. Merging into the original unquantised weights instead
    differs by the quantisation error, which is what users trip on."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = {"name": "nf4", "compute_dtype": "fp32"}
    recipe = lora_recipe(cls_data, tmp_path / "run", base, eval_before=False)
    result = train(config.from_dict(recipe))
    trained = logits(result.model)
    assert main(["merge", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    got = logits(merged)

    storage = registry.build("base", config.from_dict(recipe).base)
    dequantised = storage.dequantise(load_model("tiny-llama", base=base)[0])
    reference = logits(PeftModel.from_pretrained(dequantised, tmp_path / "run"))
    # Same fp32 weights (the dequantised integers) with the adapter folded in: folding rounds
    # each weight once and sums W x in one product (a few ulps of O(1) logits, as in the
    # params contract); 1e-5 absolute. The 4-bit layer dequantises to the same fp32 weights
    # before its product, so the trained model agrees to the same bound.
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, trained, atol=1e-5, rtol=0)

    naive = PeftModel.from_pretrained(load_model("tiny-llama")[0], tmp_path / "run")
    quantisation_error = (logits(copy.deepcopy(naive).merge_and_unload()) - trained).abs().max()
    assert quantisation_error > 100 * (got - trained).abs().max()


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def test_qlora_optimizer_side_8bit_state_on_cpu_and_paging_refused(tmp_path, cls_data, capsys):
    """QLoRA's optimizer: AdamW with 8-bit moments trains on the CPU (uint8 state for tensors of
    4096 elements or more, as the planner prices it); paging needs CUDA: one line, exit 2."""
    import yaml

    recipe = lora_recipe(cls_data, tmp_path / "run", "nf4", eval_before=False)
    recipe["params"]["r"] = 64  # A and B of 64 x 64 = 4096 elements: 8-bit moments
    recipe["optimizer"] = {"name": "adamw", "lr": 1e-2, "state_bits": 8}
    result = train(config.from_dict(recipe))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in rows if "eval" not in r and "loss" in r]
    assert losses[-1] < losses[0]
    lora = [p for n, p in result.model.named_parameters() if "lora_" in n]
    big = sum(p.numel() for p in lora if p.numel() >= 4096)
    assert big > 0.5 * sum(p.numel() for p in lora)
    shape = ModelShape.from_config(result.model.config.to_dict())
    params = method("params", {"name": "lora", "r": 64, "target_modules": ["all-linear"]})
    eight = plan(shape, params, method("optimizer", {"name": "adamw", "state_bits": 8}), W16)
    planned = eight.by_name()["optimizer state"]
    # The planner's byte count against the state bitsandbytes keeps: the same per-tensor
    # formula (two uint8 moments and an fp32 absmax per 256 elements, fp32 moments under 4096
    # elements) plus the two shared 256-entry fp32 quantile maps (2 KiB) the plan leaves out.
    assert result.summary["optimizer_state_bytes"] == pytest.approx(planned + 2048, abs=64)
    fp32 = plan(shape, params, method("optimizer", "adamw"), W16).by_name()["optimizer state"]
    assert planned < 0.45 * fp32

    recipe["optimizer"] = {"name": "adamw", "paged": True}
    recipe["output_dir"] = str(tmp_path / "paged")
    recipe["model"]["device"] = "cpu"
    path = tmp_path / "paged.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 2
    assert "paged=true needs CUDA" in capsys.readouterr().err
    assert not (tmp_path / "paged").exists()


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_loftq_initialises_against_the_quantised_base_it_runs_on(tmp_path, cls_data, name):
    """LoftQ on a quantised base: Q + s B A (the run's own Q) is closer to the checkpoint's W
    than Q alone, by exactly the rank-r part of W - Q, and the base stays as loaded."""
    from peft.tuners.lora import LoraLayer

    from slimtune.models import tiny_llama

    recipe = tiny_recipe(
        cls_data, tmp_path / "run", base={"name": name, "compute_dtype": "fp32"},
        params={"name": "lora", "r": 8, "init": "loftq", "target_modules": ["q_proj", "down_proj"]},
        train={"steps": 1},
        optimizer={"name": "adamw", "lr": 0.0},  # keep A and B as initialised
    )  # fmt: skip
    result = train(config.from_dict(recipe))
    dense = dict(tiny_llama(vocab_size=259).named_parameters())
    storage = registry.build("base", config.from_dict(recipe).base)
    layers = [(n, m) for n, m in result.model.named_modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 4  # q_proj and down_proj of both blocks
    for n, m in layers:
        w = dense[n.removeprefix("base_model.model.") + ".weight"].detach()
        q = storage.dense_weight(m.get_base_layer()).float()
        ba = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
        best = torch.linalg.svdvals(w - q)[8:].square().sum().sqrt()  # Eckart-Young
        # fp32 SVD and products of 64- to 128-wide matrices: the residual norm equals the
        # tail of the spectrum to ~1e-6 relative (1e-4 leaves room, a wrong scale or
        # transposition is off by O(1))
        torch.testing.assert_close(torch.linalg.norm(w - q - ba), best, rtol=1e-4, atol=1e-6)
        assert torch.linalg.norm(w - q - ba) < 0.9 * torch.linalg.norm(w - q)
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run" / "base").exists()  # the base is the one the recipe loads


@pytest.mark.parametrize(
    "params", [m for m in registry.names("params") if registry.get("params", m).frozen_base]
)
def test_every_frozen_base_method_trains_on_nf4(tmp_path, cls_data, params):
    seen = {}

    def on_step(step, model, row):
        if step == 0:
            seen["before"] = quantised_state(model)

    spec = {"name": params, **({"num_virtual_tokens": 4} if "tuning" in params else {})}
    recipe = tiny_recipe(cls_data, tmp_path / "run", base="nf4", params=spec, train={"steps": 2})
    result = train(config.from_dict(recipe), on_step=on_step)
    assert result.summary["steps"] == 2 and seen["before"]
    after = quantised_state(result.model)
    assert all(torch.equal(after[k], v) for k, v in seen["before"].items())
