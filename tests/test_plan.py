"""Model shapes for the memory planner: bundled configs and exact parameter counts."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from slimtune.errors import SlimtuneError
from slimtune.models import load_model
from slimtune.plan.shapes import ModelShape, bundled, load_shape, read_config

# Published parameter counts (model cards / safetensors metadata) of the bundled configs.
PUBLISHED = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "smollm2-135m": 134_515_008,
    "gemma-3-270m": 268_098_176,
}


def test_bundled_configs_cover_the_models_users_name():
    names = set(bundled())
    for family in ("llama-2-", "llama-3-", "mistral-", "qwen2.5-", "gemma-3-", "smollm2-"):
        assert any(n.startswith(family) for n in names), family


@pytest.mark.parametrize("name", bundled())
def test_parameter_count_matches_the_instantiated_model(name):
    cfg = read_config(name)
    shape = ModelShape.from_config(cfg)
    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg["model_type"], **kwargs))
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    if name in PUBLISHED:
        assert shape.total_params == PUBLISHED[name]


def test_shape_of_the_bundled_real_model_matches_its_weights():
    model, _ = load_model("smollm2-135m")
    assert load_shape("smollm2-135m").total_params == sum(p.numel() for p in model.parameters())


def test_bad_model_configs_are_named(tmp_path):
    with pytest.raises(SlimtuneError, match="not a bundled config"):
        load_shape("no-such-model")
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama",\n "hidden_size": }')
    with pytest.raises(SlimtuneError, match="line 2"):
        load_shape(str(tmp_path))
    bad.write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(SlimtuneError, match="gpt2"):
        load_shape(str(bad))
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(SlimtuneError, match="missing 'num_attention_heads'"):
        load_shape(str(bad))
