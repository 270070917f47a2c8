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
  special token ids, whether BOS is added, and the chat template;
* a SentencePiece-style tokenizer (BPE over characters with byte fallback: Gemma-3, Llama 2,
  Mistral) goes in as ``tokenizer.ggml.model = llama``: tokens by id with types (byte tokens
  ``<0xNN>`` as bytes, the unknown token, control and user-defined ones) and scores. llama.cpp
  merges the adjacent pair whose joined token scores highest, so each token's score is minus
  the rank of the first merge that makes it: llama.cpp then merges in the order the
  tokenizer's merges list gives. Whether a space is prefixed follows the tokenizer's
  normaliser; Gemma's runs of spaces are stored as spaces and typed user-defined (matched
  whole), as Google's own Gemma GGUF files store them;
* Gemma-3 stores its norms as ``w`` in ``x * (1 + w)``; GGUF readers expect ``1 + w`` (what
  llama.cpp's converter writes and transformers' reader subtracts again); no q/k permutation;
  head size, sliding window and the global layers' rotary base as llama.cpp names them.

Supported: Llama (SmolLM2, Llama 3, Llama 2), Mistral, Qwen2 and Gemma-3 text models. Others
are refused in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .errors import SlimtuneError

# HF model_type -> gguf.MODEL_ARCH member (llama.cpp writes Mistral as a Llama)
ARCHES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "gemma3_text": "GEMMA3"}
PERMUTED = {"llama", "mistral"}  # architectures whose q/k weights llama.cpp permutes
ONE_PLUS_NORMS = {"gemma3_text"}  # RMSNorm computes x * (1 + w); GGUF stores 1 + w
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
        return "gpt-2"  # llama.cpp's name of GPT-2's split (ByteLevel with use_regex)
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


def tokenizer_fields(tok: Any, rows: int = 0, arch: str = "") -> dict[str, Any]:
    """What the GGUF stores of ``tok``: byte-level BPE (``gpt2``) or SentencePiece-style
    (``llama``), padded with unused ``[PADn]`` tokens to ``rows`` (the embedding's rows, which
    llama.cpp requires to match)."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec.get("model", {})
    byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") != "BPE" or not (byte_level or model.get("byte_fallback")):
        raise SlimtuneError(
            f"export: a {model.get('type', 'unknown')} tokenizer"
            f"{'' if model.get('type') != 'BPE' else ' without byte fallback'}; byte-level BPE "
            "(SmolLM2, Llama 3, Qwen2) and SentencePiece-style BPE (Gemma-3, Llama 2, Mistral) "
            "tokenizers can be exported"
        )
    vocab = tok.get_vocab()
    n = max(max(vocab.values()) + 1, rows)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED until a token claims the id
    for text, i in vocab.items():
        tokens[i], types[i] = text, 1  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {name: getattr(tok, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    probe = tok("a")["input_ids"]
    out: dict[str, Any] = {
        "tokens": tokens,
        "types": types,
        "ids": ids,
        "add_bos": bool(probe) and tok.bos_token_id is not None and probe[0] == tok.bos_token_id,
        "add_eos": bool(probe) and tok.eos_token_id is not None and probe[-1] == tok.eos_token_id,
    }
    if byte_level:
        out |= {"model": "gpt2", "pre": pre_tokenizer_name(tok), "merges": merges}
    else:
        out |= _sentencepiece(spec, tokens, types, merges, gemma=arch == "gemma3_text")
    if ids["unk"] is not None and ids["unk"] < n:
        types[ids["unk"]] = 2  # UNKNOWN
    for added in spec.get("added_tokens", []):
        types[added["id"]] = 3 if added.get("special") else 4  # CONTROL / USER_DEFINED
    return out


def _sentencepiece(
    spec: dict[str, Any], tokens: list[str], types: list[int], merges: list[str], gemma: bool
) -> dict[str, Any]:
    """Scores (minus the rank of the first merge making each token), byte tokens, the space
    prefix flag, Gemma's runs of spaces spelled as spaces."""
    first: dict[str, int] = {}
    for rank, m in enumerate(merges):
        a, _, b = m.partition(" ")
        first.setdefault(a + b, rank)
    scores = [-float(first[t]) if t in first else 0.0 for t in tokens]
    for i, t in enumerate(tokens):
        if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = 6  # BYTE
        elif gemma and len(t) > 1 and set(t) == {"\u2581"}:
            # Gemma's runs of spaces are user-defined pieces, matched whole (as its own files)
            tokens[i], types[i] = " " * len(t), 4
    prefix = _prefixes_space(spec.get("normalizer")) or _prefixes_space(spec.get("pre_tokenizer"))
    return {"model": "llama", "pre": "default", "scores": scores, "add_space_prefix": prefix}


def _prefixes_space(node: Any) -> bool:
    """Whether a normaliser / pre-tokenizer (or a sequence of them) puts a space before the
    text: a ``Prepend``, or a ``Metaspace`` whose scheme is not ``never``."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == "Prepend":
        return True
    if node.get("type") == "Metaspace":
        return node.get("prepend_scheme", "always") != "never"
    parts = node.get("normalizers") or node.get("pretokenizers") or []
    return any(_prefixes_space(p) for p in parts)


def rope_theta(config: Any) -> float:
    """The rotary base (Gemma-3: of its global-attention layers, as llama.cpp stores it)."""
    params = getattr(config, "rope_parameters", None) or {}
    params = params.get("full_attention", params)
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def check(model: nn.Module, dtype: str) -> str:
    """The GGUF architecture name of ``model``, or one line saying why it cannot be exported."""
    if dtype not in DTYPES:
        raise SlimtuneError(f"export: --dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    kind = getattr(model.config, "model_type", None)
    if kind not in ARCHES:
        raise SlimtuneError(
            f"export: architecture {kind!r} is not exported to GGUF yet; supported: "
            f"{', '.join(sorted(ARCHES))} (SmolLM2, Llama 2 and 3, Mistral, Qwen2, Gemma-3)"
        )
    if kind == "gemma3_text":
        c = model.config
        layout = [
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
            for i in range(c.num_hidden_layers)
        ]
        if list(getattr(c, "layer_types", layout)) != layout:
            raise SlimtuneError(
                "export: this Gemma-3's attention layout is not Gemma-3's (every sixth layer "
                "global, the others sliding-window), which GGUF readers assume"
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
    fields = tokenizer_fields(tok, model.get_input_embeddings().weight.shape[0], kind)
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
        if kind == "gemma3_text":
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
            if getattr(c, "sliding_window", None):
                writer.add_sliding_window(c.sliding_window)
        else:
            writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(rope_theta(c))
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
        writer.add_vocab_size(len(fields["tokens"]))
        writer.add_file_type(ftype)
        writer.add_tokenizer_model(fields["model"])
        writer.add_tokenizer_pre(fields["pre"])
        writer.add_token_list(fields["tokens"])
        writer.add_token_types(fields["types"])
        if fields["model"] == "llama":
            writer.add_token_scores(fields["scores"])
            writer.add_add_space_prefix(fields["add_space_prefix"])
        elif fields["merges"]:
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
        writer.add_add_eos_token(fields["add_eos"])
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
            elif kind in ONE_PLUS_NORMS and hf_name.endswith("norm.weight"):
                data = data + 1.0
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
