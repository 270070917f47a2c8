"""GGUF export (issue 22): what transformers' GGUF reader loads back computes what the exported
model computes with its weights rounded to the file's type; the tokenizer and chat template
round-trip; a LoRA run exports the same tensors as its merged checkpoint; unsupported models
and an existing output are refused in one line."""

from __future__ import annotations

import copy
import json

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
    other.config.model_type = "phi3"
    with pytest.raises(SlimtuneError, match="architecture 'phi3' is not exported"):
        check(other, "f16")
    with pytest.raises(SlimtuneError, match="--dtype 'q4'"):
        check(model, "q4")
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    odd = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    with pytest.raises(SlimtuneError, match="every sixth layer global"):
        check(Gemma3ForCausalLM(odd), "f16")
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


CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a wonderful, moving film with a great cast",
    "grüße aus köln and hello again to the world",
    "numbers 12345 and    runs of spaces   matter",
] * 4


def sentencepiece_tokenizer(style: str):
    """A small SentencePiece-style BPE (characters, merges, byte fallback) spelled as HF
    converts Gemma's (``style="gemma"``: spaces as U+2581, no prefix, <pad> <eos> <bos> <unk>)
    or Llama 2's (``"llama2"``: a prefixed space, <unk> <s> </s>). Merges trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    space = normalizers.Replace(" ", "\u2581")
    norm = (
        space if style == "gemma" else normalizers.Sequence([normalizers.Prepend("\u2581"), space])
    )
    learn = Tokenizer(models.BPE(unk_token="<unk>"))
    learn.normalizer = norm
    learn.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, show_progress=False))
    learned = json.loads(learn.to_str())["model"]
    specials = (
        ["<pad>", "<eos>", "<bos>", "<unk>"] if style == "gemma" else ["<unk>", "<s>", "</s>"]
    )
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for t in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    bpe = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tk = Tokenizer(bpe)
    tk.normalizer = norm
    parts = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if style == "llama2":
        parts.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(parts)
    bos, eos = ("<bos>", "<eos>") if style == "gemma" else ("<s>", "</s>")
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, vocab[bos])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=bos,
        eos_token=eos,
        unk_token="<unk>",
        pad_token="<pad>" if style == "gemma" else None,
    )
    fast.add_special_tokens({"additional_special_tokens": [t for t in specials]})
    return fast


SPM_SAMPLE = "Grüße aus Köln! the quick fox,    runs   of spaces. 東京 12345"


@pytest.mark.parametrize("arch", ["gemma3", "mistral"])
@pytest.mark.parametrize("dtype,fn", [("f32", lambda p: p), ("q8_0", q8_0)])
def test_sentencepiece_models_gemma3_and_mistral_round_trip(tmp_path, arch, dtype, fn):
    """Gemma-3 (norms stored as 1 + w, sliding window, its rotary bases) and Mistral (a Llama
    in GGUF, permuted q/k) with SentencePiece-style tokenizers: the model loaded back computes
    what the rounded weights compute (ATOL as above: the norms' +1 and the reader's -1 are
    exact in float32 for |w| < 1), and the tokenizer encodes and decodes a multilingual sample
    as the original does (byte fallback for the characters it has no token for)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM

    tok = sentencepiece_tokenizer("gemma" if arch == "gemma3" else "llama2")
    torch.manual_seed(0)
    if arch == "gemma3":
        cfg = Gemma3TextConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,  # Gemma-3's layout: five sliding-window layers, one global
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            max_position_embeddings=256,
            sliding_window=8,  # shorter than the sample: the window matters
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
        model = Gemma3ForCausalLM(cfg).eval()
        with torch.no_grad():  # random norms, so that a lost or doubled +1 shows
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(-0.5, 0.5)
    else:
        cfg = MistralConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = MistralForCausalLM(cfg).eval()
    info = export_gguf(model, tok, tmp_path / "m.gguf", dtype)
    assert info["architecture"] == ("gemma3_text" if arch == "gemma3" else "mistral")
    back, back_tok = load_back(tmp_path, "m.gguf")
    ids = tok(SPM_SAMPLE)["input_ids"]
    assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # byte fallback used
    assert back_tok(SPM_SAMPLE)["input_ids"] == ids
    assert back_tok.decode(ids, skip_special_tokens=True) == tok.decode(
        ids, skip_special_tokens=True
    )
    x = torch.tensor([ids])
    with torch.no_grad():
        want = rounded(model, fn)(input_ids=x).logits
        got = back(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_llama_cpp_generates_what_transformers_generates(tmp_path):
    """A real GGUF runtime (llama.cpp's Python bindings, built from the package index's source
    distribution) reads the exported SmolLM2, tokenises a prompt (chat template, special
    tokens) as transformers does and greedily generates the same 20 tokens.

    The export is f32, so both run the same weights in float32 and differ only in their
    kernels' summation order (~1e-6 relative on the logits). Greedy can then only part where
    the two best tokens are nearly tied, so the test first checks that every step's margin
    in transformers is above 1e-2 (the prompt is chosen so; the margins are a property of the
    weights and the prompt, the same on any machine to ~1e-5)."""
    import llama_cpp

    from slimtune.models import load_model

    model, tok = load_model("smollm2-135m", dtype="fp32")
    export_gguf(model.eval(), tok, tmp_path / "s.gguf", "f32")
    messages = [{"role": "user", "content": "Write a haiku about autumn."}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    want = out.sequences[0, len(ids) :].tolist()
    margins = [float(s[0].topk(2).values.diff().abs()) for s in out.scores]
    assert min(margins) > 1e-2
    llm = llama_cpp.Llama(
        model_path=str(tmp_path / "s.gguf"), n_ctx=256, n_threads=2, seed=0, verbose=False
    )
    try:
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        got = []
        for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            got.append(t)
            if len(got) == 20:
                break
    finally:
        llm.close()
    assert got == want, (tok.decode(got), tok.decode(want))
