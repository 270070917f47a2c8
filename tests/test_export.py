"""GGUF export (issue 22): what transformers' GGUF reader loads back computes what the exported
model computes with its weights rounded to the file's type; the tokenizer and chat template
round-trip; a LoRA run exports the same tensors as its merged checkpoint; unsupported models
and an existing output are refused in one line."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimtune import config
from slimtune.cli import main
from slimtune.errors import SlimtuneError
from slimtune.export import check, export_gguf
from slimtune.loop import train
from slimtune.models import tiny_llama, tiny_tokenizer

from .conftest import tiny_recipe

SAMPLE = "Grüße aus Köln! Привет, мир. 東京は晴れ。 ¿Qué tal? 12345"


def tiny():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    return tiny_llama(vocab_size=len(tok), num_hidden_layers=2).eval(), tok


def load_back(directory, name):
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), gguf_file=name, dtype=torch.float32
    )
    return model.eval(), AutoTokenizer.from_pretrained(str(directory), gguf_file=name)


def rounded(model, fn):
    """A copy whose matrices went through ``fn`` (what the file stores), vectors kept."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.ndim > 1:
                p.copy_(fn(p))
    return out


def logits(model, tok, text=SAMPLE):
    with torch.no_grad():
        return model(input_ids=torch.tensor([tok(text)["input_ids"]])).logits


def q8_0(p: torch.Tensor) -> torch.Tensor:
    import gguf

    data = p.detach().numpy()
    q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).copy())


# Tolerances: the loaded model holds exactly the file's values (the reader undoes the q/k
# permutation, an exact reshuffle) and runs the same fp32 products as the reference built from
# the same rounded values; the one difference is the config round trip: rms_norm_eps is stored
# as float32 (1e-6 -> 9.99999997e-07), which moves rsqrt(mean + eps) by < 1e-9 relative. 1e-5
# absolute on O(1) logits leaves ample room; a wrong permutation or type moves them by O(1).
ATOL = 1e-5


@pytest.mark.parametrize(
    "dtype,fn",
    [
        ("f32", lambda p: p),
        ("f16", lambda p: p.half().float()),
        ("bf16", lambda p: p.bfloat16().float()),
        ("q8_0", q8_0),  # every tiny matrix has rows of 64 or 128: all Q8_0
    ],
)
def test_exported_model_computes_what_its_rounded_weights_compute(tmp_path, dtype, fn):
    model, tok = tiny()
    info = export_gguf(model, tok, tmp_path / "m.gguf", dtype)
    assert info["architecture"] == "llama" and not list(tmp_path.glob(".*tmp"))
    back, back_tok = load_back(tmp_path, "m.gguf")
    torch.testing.assert_close(
        logits(back, tok), logits(rounded(model, fn), tok), atol=ATOL, rtol=0
    )
    # the tokenizer round-trips a multilingual sample, special tokens included
    text = SAMPLE + " </s>"
    assert back_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert back_tok.chat_template == tok.chat_template


def test_smollm2_exports_and_loads_back(tmp_path):
    """The bundled real model: f16 export, loaded back by transformers' GGUF reader."""
    from slimtune.models import load_model

    model, tok = load_model("smollm2-135m", dtype="fp32")
    export_gguf(model.eval(), tok, tmp_path / "s.gguf", "f16")
    back, back_tok = load_back(tmp_path, "s.gguf")
    assert back_tok(SAMPLE)["input_ids"] == tok(SAMPLE)["input_ids"]
    assert back_tok.chat_template == tok.chat_template
    want = logits(rounded(model, lambda p: p.half().float()), tok)
    torch.testing.assert_close(logits(back, tok), want, atol=ATOL, rtol=0)


def test_a_lora_run_exports_the_tensors_of_its_merged_checkpoint(tmp_path, cls_data, capsys):
    import gguf

    recipe = tiny_recipe(cls_data, tmp_path / "run", params={"name": "lora", "r": 4})
    result = train(config.from_dict(recipe))
    assert main(["export", str(result.run_dir), str(tmp_path / "a"), "--dtype", "f16"]) == 0
    assert "Ollama" in capsys.readouterr().out
    assert (tmp_path / "a" / "Modelfile").read_text().startswith("FROM ./run-f16.gguf")
    assert main(["merge", str(result.run_dir), str(tmp_path / "merged")]) == 0
    merged_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    export_gguf(merged_model, result.tokenizer, tmp_path / "b.gguf", "f16")
    a = gguf.GGUFReader(str(tmp_path / "a" / "run-f16.gguf"))
    b = gguf.GGUFReader(str(tmp_path / "b.gguf"))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert np.array_equal(x.data, y.data), x.name


def test_unsupported_models_and_outputs_are_refused_in_one_line(tmp_path, cls_data, capsys):
    model, _ = tiny()
    other = copy.deepcopy(model)
    other.config.model_type = "gemma3_text"
    with pytest.raises(SlimtuneError, match="architecture 'gemma3_text' is not exported"):
        check(other, "f16")
    with pytest.raises(SlimtuneError, match="--dtype 'q4'"):
        check(model, "q4")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    assert main(["export", str(tmp_path), str(tmp_path / "taken")]) == 2
    assert "exists" in capsys.readouterr().err


def test_qwen2_with_biases_and_an_untied_head_round_trips(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    info = export_gguf(model, tok, tmp_path / "q.gguf", "f32")
    assert info["architecture"] == "qwen2"
    back, _ = load_back(tmp_path, "q.gguf")
    # f32 values written as they are and no permutation for Qwen2: as above
    torch.testing.assert_close(logits(back, tok), logits(model, tok), atol=ATOL, rtol=0)
