"""slimtune merge --dtype: the folded weights written in a narrower dtype (half the bytes),
each equal to the full-precision merge rounded once."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from slimtune.cli import main

from .conftest import tiny_recipe


@pytest.fixture
def lora_run(tmp_path, cls_data):
    recipe = tiny_recipe(
        cls_data, tmp_path / "out", params={"name": "lora", "r": 4}, train={"steps": 2}
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    return tmp_path / "out"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_merge_writes_the_asked_dtype(tmp_path, lora_run, capsys, dtype):
    assert main(["merge", str(lora_run), str(tmp_path / "fp32")]) == 0
    assert main(["merge", str(lora_run), str(tmp_path / dtype), "--dtype", dtype]) == 0
    wide = load_file(tmp_path / "fp32" / "model.safetensors")
    narrow = load_file(tmp_path / dtype / "model.safetensors")
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert wide.keys() == narrow.keys()
    for name, w in wide.items():
        assert w.dtype == torch.float32 and narrow[name].dtype == want, name
        # folded in float32, then rounded once: exactly the cast of the float32 merge
        assert torch.equal(narrow[name], w.to(want)), name
    size = (tmp_path / dtype / "model.safetensors").stat().st_size
    assert size < 0.55 * (tmp_path / "fp32" / "model.safetensors").stat().st_size
    config = json.loads((tmp_path / dtype / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == str(want).removeprefix("torch.")


def test_merge_refuses_an_unknown_dtype(tmp_path, lora_run, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["merge", str(lora_run), str(tmp_path / "m"), "--dtype", "int4"])
    assert exit_.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
