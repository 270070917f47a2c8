"""Export a trained model to GGUF (llama.cpp, Ollama, LM Studio) with the ``gguf`` package's
writer, its tensor-name maps and its Q8_0 quantiser (no vendored converter).

What llama.cpp's own converter does for these architectures, done here the same way:

* tensor names from ``gguf.get_tensor_name_map`` (HF ``model.layers.0.self_attn.q_proj.weight``
  -> ``blk.0.attn_q.weight``); a tied output head is not written (llama.cpp reuses the token
  embedding);
* Llama-family query and key weights are permuted from HF's half-split rotary layout to
  GGUF's interleaved one (transformers' GGUF reader undoes it on load); Qwen2 keeps HF's;
* 1-D tensors (norms, biases) stay float32; matrices take the chosen type (f32, f16, bf16, or
  Q8_0 where the row length is a multiple of 32, f16 otherwise);
* a byte-level BPE tokenizer goes in as ``tokenizer.ggml.model = gpt2``: every token by id, its
  type (control for special tokens, user-defined for other added ones), the merges, the
  special token ids, whether BOS is added, and the chat template.

Supported: Llama (SmolLM2, Llama 3) and Qwen2 models with byte-level BPE tokenizers. Others are
refused in one line (SentencePiece tokenizers, Gemma-3 and Mistral among them, are not written
yet).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .errors import SlimtuneError

ARCHES = {"llama": "LLAMA", "qwen2": "QWEN2"}  # HF model_type -> gguf.MODEL_ARCH member
PERMUTED = {"llama"}  # architectures whose q/k weights llama.cpp permutes
DTYPES = ("f32", "f16", "bf16", "q8_0")
QK8_0 = 32  # elements per Q8_0 block


def permute(w: np.ndarray, heads: int, kv_heads: int | None = None) -> np.ndarray:
    """HF's rotary layout (two halves per head) -> GGUF's (interleaved pairs)."""
    if kv_heads is not None and kv_heads != heads:
        heads = kv_heads
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def pre_tokenizer_name(tok: Any) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenisation (the text split before BPE)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = json.loads(tok.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        return "gpt2"  # GPT-2's split (use_regex), or bytes alone: the GPT-2 default
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    split = next((p for p in parts if p.get("type") == "Split"), None)
    if split is not None and any(p.get("type") == "ByteLevel" for p in parts):
        pattern = split.get("pattern", {}).get("Regex")
        for name in ("llama-bpe", "qwen2", "gpt-4o"):
            if GGUF_PRE_TOKENIZER_SPLITS[name] == pattern:
                return name
    raise SlimtuneError(
        f"export: the tokenizer's pre-tokenizer ({pre.get('type', 'none')}) is not one llama.cpp "
        "names; byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2) can be exported"
    )


def tokenizer_fields(tok: Any, rows: int = 0) -> dict[str, Any]:
    """Tokens, types, merges and special ids of a byte-level BPE tokenizer, padded with unused
    ``[PADn]`` tokens to ``rows`` (the embedding's rows, which llama.cpp requires to match)."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise SlimtuneError(
            f"export: a {model.get('type', 'unknown')} tokenizer; only byte-level BPE "
            "tokenizers (SmolLM2, Llama 3, Qwen2) can be exported so far"
        )
    vocab = tok.get_vocab()
    n = max(max(vocab.values()) + 1, rows)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED until a token claims the id
    for text, i in vocab.items():
        tokens[i], types[i] = text, 1  # NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = 3 if added.get("special") else 4  # CONTROL / USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {name: getattr(tok, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    probe = tok("a")["input_ids"]
    add_bos = bool(probe) and tok.bos_token_id is not None and probe[0] == tok.bos_token_id
    return {"tokens": tokens, "types": types, "merges": merges, "ids": ids, "add_bos": add_bos}


def rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def check(model: nn.Module, dtype: str) -> str:
    """The GGUF architecture name of ``model``, or one line saying why it cannot be exported."""
    if dtype not in DTYPES:
        raise SlimtuneError(f"export: --dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    kind = getattr(model.config, "model_type", None)
    if kind not in ARCHES:
        raise SlimtuneError(
            f"export: architecture {kind!r} is not exported to GGUF yet; supported: "
            f"{', '.join(sorted(ARCHES))} (SmolLM2, Llama 3, Qwen2)"
        )
    return kind


def tensor_data(data: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw GGML type or None) of one float32 tensor in the file."""
    import gguf

    if data.ndim == 1 or dtype == "f32":
        return data.astype(np.float32), None
    if dtype == "f16" or (dtype == "q8_0" and data.shape[-1] % QK8_0):
        return data.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.Q8_0 if dtype == "q8_0" else gguf.GGMLQuantizationType.BF16
    return gguf.quants.quantize(data, kind), kind


def export_gguf(
    model: nn.Module, tok: Any, out: Path, dtype: str = "f16", name: str = "slimtune"
) -> dict[str, Any]:
    """Write ``model`` (plain HF weights, adapters merged) and ``tok`` as one GGUF file at
    ``out`` (written to a temporary name, then renamed). Returns what it wrote."""
    import gguf

    kind = check(model, dtype)
    fields = tokenizer_fields(tok, model.get_input_embeddings().weight.shape[0])
    pre = pre_tokenizer_name(tok)
    c = model.config
    arch = getattr(gguf.MODEL_ARCH, ARCHES[kind])
    heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", c.num_attention_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[dtype]
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_name(name)
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(c.hidden_size)
        writer.add_block_count(c.num_hidden_layers)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(rope_theta(c))
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
        writer.add_vocab_size(len(fields["tokens"]))
        writer.add_file_type(ftype)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(fields["tokens"])
        writer.add_token_types(fields["types"])
        if fields["merges"]:
            writer.add_token_merges(fields["merges"])
        else:  # a vocabulary of single bytes: readers derive (no) merges from scores
            writer.add_token_scores([0.0] * len(fields["tokens"]))
        adders = {
            "bos": writer.add_bos_token_id,
            "eos": writer.add_eos_token_id,
            "unk": writer.add_unk_token_id,
            "pad": writer.add_pad_token_id,
        }
        for key, value in fields["ids"].items():
            if value is not None:
                adders[key](value)
        writer.add_add_bos_token(fields["add_bos"])
        if tok.chat_template:
            writer.add_chat_template(tok.chat_template)
        tied = bool(getattr(c, "tie_word_embeddings", False))
        count = 0
        for hf_name, t in model.state_dict().items():
            if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                continue
            target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise SlimtuneError(f"export: no GGUF name for tensor {hf_name!r} ({kind})")
            data = t.detach().float().cpu().numpy()
            if kind in PERMUTED and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute(data, heads, heads)
            elif kind in PERMUTED and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute(data, heads, kv)
            array, raw = tensor_data(data, dtype)
            writer.add_tensor(target, array, raw_dtype=raw)
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"architecture": kind, "tensors": count, "bytes": out.stat().st_size, "dtype": dtype}


def modelfile(gguf_name: str, tok: Any) -> str:
    """An Ollama Modelfile beside the GGUF: the file, and the end-of-turn token as a stop (the
    chat template travels inside the GGUF)."""
    lines = [f"FROM ./{gguf_name}"]
    if tok.eos_token:
        lines.append(f'PARAMETER stop "{tok.eos_token}"')
    return "\n".join(lines) + "\n"
