"""Architecture numbers of a decoder-only model, from a Hugging Face ``config.json`` or one of
the bundled configs (no weights): what the memory planner (issue 7) reasons over.

Counts are exact for the Llama family (Llama, Mistral, Qwen2 with q/k/v biases, SmolLM2) and
Gemma-3 text models (q/k norms, four norms per block); ``tests/test_plan.py`` checks them
against models instantiated on the meta device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from ..errors import SlimtuneError

FAMILIES = ("llama", "mistral", "qwen2", "gemma3_text")


def bundled() -> list[str]:
    """Names of the bundled configs (e.g. llama-3-8b, smollm2-135m)."""
    root = files("slimtune").joinpath("plan/configs")
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def read_config(name: str) -> dict[str, Any]:
    """A bundled config by name, or a ``config.json`` path (or a model directory holding one)."""
    if name in bundled():
        return json.loads(files("slimtune").joinpath(f"plan/configs/{name}.json").read_text())
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SlimtuneError(
            f"model {name!r}: not a bundled config ({', '.join(bundled())}) nor a config.json"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SlimtuneError(f"model config {str(path)!r} line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise SlimtuneError(f"model config {str(path)!r}: the top level must be an object")
    return data


@dataclass(frozen=True)
class ModelShape:
    family: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    norms_per_layer: int = 2

    @classmethod
    def from_config(cls, cfg: dict[str, Any], where: str = "model config") -> ModelShape:
        family = cfg.get("model_type")
        if family == "gemma3":  # the multimodal config nests the text model
            cfg, family = cfg.get("text_config", {}), "gemma3_text"
        if family not in FAMILIES:
            raise SlimtuneError(
                f"{where}: model_type {family!r} is not modelled (supported: {', '.join(FAMILIES)})"
            )
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            shape = cls(
                family=family,
                hidden=hidden,
                layers=int(cfg["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                intermediate=int(cfg["intermediate_size"]),
                vocab=int(cfg["vocab_size"]),
                tied=bool(cfg.get("tie_word_embeddings", family in ("gemma3_text",))),
                qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
                qk_norm=family == "gemma3_text",
                norms_per_layer=4 if family == "gemma3_text" else 2,
            )
        except KeyError as e:
            raise SlimtuneError(f"{where}: missing {e.args[0]!r}") from None
        return shape

    # --- parameter counts --------------------------------------------------------------------
    @property
    def attention_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        n = self.hidden * (q + 2 * kv) + q * self.hidden
        if self.qkv_bias:
            n += q + 2 * kv
        if self.qk_norm:
            n += 2 * self.head_dim
        return n

    @property
    def mlp_params(self) -> int:
        return 3 * self.hidden * self.intermediate

    @property
    def layer_params(self) -> int:
        return self.attention_params + self.mlp_params + self.norms_per_layer * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """The output projection's own weights (0 when tied to the embedding)."""
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        return (
            self.embedding_params + self.layers * self.layer_params + self.hidden + self.head_params
        )

    def hf_config(self) -> dict[str, Any]:
        """transformers config fields that rebuild this architecture (``AutoConfig.for_model``),
        e.g. to instantiate it on the meta device."""
        out: dict[str, Any] = {
            "model_type": self.family,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tied,
        }
        if self.family in ("llama", "mistral"):
            out["attention_bias"] = self.qkv_bias
        return out

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear of one block, by module name."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (q, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, q),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }


def load_shape(name: str) -> ModelShape:
    return ModelShape.from_config(read_config(name), f"model {name!r}")
