"""A slimtune LoRA run directory is a PEFT adapter: peft loads it with identical logits."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from slimtune import config
from slimtune.loop import train
from slimtune.models import load_model

from .conftest import tiny_recipe


@pytest.mark.parametrize(
    "extra",
    [{}, {"dora": True}, {"init": "pissa", "pissa_niter": 0}, {"rslora": True, "r": 4}],
    ids=["lora", "dora", "pissa", "rslora"],
)
def test_peft_from_pretrained_reproduces_logits(tmp_path, cls_data, extra):
    recipe = tiny_recipe(cls_data, tmp_path / "run", params={"name": "lora", **extra})
    result = train(config.from_dict(recipe))
    ids = torch.tensor([[1, 30, 31, 32, 33, 34]], device=result.model.device)
    result.model.eval()
    with torch.no_grad():
        ours = result.model(input_ids=ids).logits
        base, _ = load_model("tiny-llama", device=str(result.model.device))
        theirs = PeftModel.from_pretrained(base, result.run_dir).eval()(input_ids=ids).logits
    # The same fp32 adapter values (safetensors round-trips exactly) through peft's LoRA layers:
    # the same products, at most grouped otherwise (DoRA's norm, PiSSA's residual base), a few
    # ulps of the tiny model's O(1) logits (seen: <= 3.6e-7 under MKL's AVX-512, AVX2 and
    # COMPATIBLE paths, ATen default/AVX2). 1e-5 absolute; a wrong scale or lost tensor moves
    # logits by orders of magnitude more.
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (result.run_dir / "adapter_config.json").is_file()
    assert (result.run_dir / "adapter_model.safetensors").is_file()
