"""The base axis (how the frozen weights are stored): a contract over its registry, the recipe's
``base`` / ``model.dtype`` agreement, and a test-only base (defined here, with no edit under
src/) that runs end to end through slimtune.train."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import yaml

from slimtune import config, registry
from slimtune.errors import SlimtuneError
from slimtune.loop import train
from slimtune.methods.base import BaseWeights
from slimtune.models import load_model
from slimtune.plan.planner import DTYPE_BYTES, QUANT_BYTES

from .conftest import tiny_recipe

IDS = torch.tensor([[1, 5, 9, 13, 17, 21]])


@pytest.mark.parametrize("name", registry.names("base"))
def test_base_contract(tmp_path, cls_data, name):
    """Every base loads the model in its dtype with finite logits, is priced by the planner,
    round-trips through a recipe and config.yaml, and LoRA trains on it with the base frozen."""
    storage = registry.build("base", registry.get("base", name).Config())
    model, _ = load_model("tiny-llama", base=storage.cfg)
    assert model.get_input_embeddings().weight.dtype == storage.torch_dtype
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
    assert name in DTYPE_BYTES or name in QUANT_BYTES  # the planner prices its weights

    recipe = tiny_recipe(
        cls_data, tmp_path / "run", base=name, params={"name": "lora", "r": 2},
        train={"steps": 1},
    )  # fmt: skip
    cfg = config.from_dict(recipe)
    assert cfg.base.name == name and cfg.base == storage.cfg
    assert config.from_dict(yaml.safe_load(config.dump(cfg))).base == cfg.base
    result = train(cfg)
    assert result.summary["steps"] == 1
    frozen = [p for n, p in result.model.named_parameters() if "lora_" not in n]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.dtype == storage.torch_dtype for p in frozen if p.is_floating_point())


def test_model_dtype_names_the_base_and_both_must_agree(tmp_path, cls_data):
    def cfg(**sections):
        return config.from_dict(tiny_recipe(cls_data, tmp_path / "run", **sections))

    assert cfg().base.name == "fp32"
    assert cfg(model={"name": "tiny-llama", "dtype": "bf16"}).base.name == "bf16"
    only_base = cfg(base="bf16")
    assert only_base.model.dtype == "bf16"  # a dense base is the model's dtype
    assert cfg(base="bf16", model={"name": "tiny-llama", "dtype": "bf16"}).base.name == "bf16"
    with pytest.raises(SlimtuneError, match="base: 'bf16' disagrees with model.dtype 'fp16'"):
        cfg(base="bf16", model={"name": "tiny-llama", "dtype": "fp16"})
    with pytest.raises(SlimtuneError, match="base: unknown method 'bf61'"):
        cfg(base="bf61")


class Rounded(BaseWeights):
    """Test-only: float32 weights rounded to bfloat16's precision after loading, and a base
    that refuses to have its weights trained (as a quantised base will)."""

    @dataclass
    class Config(BaseWeights.Config):
        pass

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float32

    def after_load(self, model):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        return model

    def check(self, params, optimizer):
        if params.name != "lora":
            raise SlimtuneError(f"base: {self.name} keeps its weights frozen; use params: lora")


@pytest.fixture
def rounded():
    registry.load_all()
    registry.register("base", "test-rounded")(Rounded)
    try:
        yield
    finally:
        registry._REGISTRY["base"].pop("test-rounded")


def test_a_test_only_base_runs_through_train(tmp_path, cls_data, rounded):
    recipe = tiny_recipe(
        cls_data, tmp_path / "run", base="test-rounded", params={"name": "lora", "r": 2},
        train={"steps": 2},
    )  # fmt: skip
    result = train(config.from_dict(recipe))
    assert result.summary["steps"] == 2
    base = [p for n, p in result.model.named_parameters() if "lora_" not in n]
    assert all(torch.equal(p, p.to(torch.bfloat16).float()) for p in base)  # after_load ran
    assert "base:\n  name: test-rounded" in (tmp_path / "run" / "config.yaml").read_text()


def test_a_base_refuses_a_params_method_in_one_line_before_anything_is_written(
    tmp_path, cls_data, rounded
):
    recipe = tiny_recipe(cls_data, tmp_path / "run", base="test-rounded")  # params: full
    with pytest.raises(SlimtuneError, match="base: test-rounded keeps its weights frozen"):
        train(config.from_dict(recipe))
    assert not (tmp_path / "run").exists()
