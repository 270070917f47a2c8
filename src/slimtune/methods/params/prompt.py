"""Prompt tuning and prefix tuning through ``peft``: trainable virtual tokens, base frozen."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from torch import nn
from transformers import PreTrainedTokenizerBase

from ...errors import SlimtuneError
from ...registry import register
from ..base import ParamsMethod, PrepareContext


class _VirtualTokens(ParamsMethod):
    """Shared by prompt and prefix tuning: a peft prompt-learning adapter, saved in PEFT format."""

    supports_packing = False  # virtual tokens before every row

    mergeable = False
    frozen_base = True

    def adapters_off_is_base(self) -> bool:
        return True  # disabled, peft prepends no virtual tokens: the loaded model itself

    @dataclass
    class Config:
        num_virtual_tokens: int = 20
        """Number of virtual tokens."""

        def __post_init__(self) -> None:
            if self.num_virtual_tokens < 1:
                raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")

    peft_config: Callable[[], PromptTuningConfig | PrefixTuningConfig]  # set by each subclass

    def memory(self, plan: Any) -> None:
        """Base frozen; the virtual tokens' parameters train and backward runs through every
        block (the input of block 0 depends on them); prompt tuning lengthens every sequence."""
        from ...plan.planner import Spec

        sh, n = plan.shape, self.cfg.num_virtual_tokens
        plan.freeze_all()
        if isinstance(self, PrefixTuning):
            kv = sh.kv_heads * sh.head_dim
            plan.add_new(
                Spec(
                    "prefix_encoder.embedding",
                    (n, sh.layers * 2 * kv),
                    "adapter",
                    None,
                    "embed",
                    4.0,
                )
            )
            plan.needs_mask, plan.prefix_tokens = True, n  # the causal mask becomes explicit
            q = sh.heads * sh.head_dim  # prefix keys and values, repeated per query head
            plan.add(
                "activations",
                sh.layers * plan.work.batch * 2 * n * q * plan.work.act_bytes,
                "backward",
                "prefix keys and values kept by attention",
            )
            if self.cfg.projection:
                plan.add_new(
                    Spec(
                        "prefix_encoder.mlp",
                        (sh.hidden * (sh.hidden + 2 * sh.layers * kv),),
                        "adapter",
                        None,
                        "embed",
                        4.0,
                    )
                )
        else:
            plan.add_new(
                Spec("prompt_encoder.embedding", (n, sh.hidden), "adapter", None, "embed", 4.0)
            )
            plan.extra_tokens = n
        plan.grad_from = 0

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        return get_peft_model(model, self.peft_config())

    def save(self, model: PeftModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)

    @classmethod
    def load(cls, base: nn.Module, run_dir: Path) -> nn.Module:
        return PeftModel.from_pretrained(base, run_dir)

    def merge(self, model: nn.Module) -> nn.Module:
        raise SlimtuneError(
            f"params: {self.name}: virtual tokens cannot be folded into the weights; load the "
            "adapter with peft.PeftModel.from_pretrained instead"
        )


@register("params", "prompt-tuning")
class PromptTuning(_VirtualTokens):
    """Prompt tuning (Lester et al., https://arxiv.org/abs/2104.08691): trainable embeddings of virtual tokens prepended to the input."""

    @dataclass
    class Config(_VirtualTokens.Config):
        init: Literal["random", "vocab"] = "random"
        """Initial virtual-token embeddings: random, or embeddings of random vocabulary tokens."""

    def peft_config(self) -> PromptTuningConfig:
        init = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB"}[self.cfg.init]
        return PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=self.cfg.num_virtual_tokens,
            prompt_tuning_init=init,
        )


@register("params", "prefix-tuning")
class PrefixTuning(_VirtualTokens):
    """Prefix tuning (Li & Liang, https://arxiv.org/abs/2101.00190): trainable key/value prefixes in every attention layer."""

    supports_checkpointing = False  # peft re-applies the prefix cache in a recomputed block

    @dataclass
    class Config(_VirtualTokens.Config):
        projection: bool = False
        """Reparameterise the prefixes through a two-layer MLP (the paper's training trick)."""

    def peft_config(self) -> PrefixTuningConfig:
        return PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=self.cfg.num_virtual_tokens,
            prefix_projection=self.cfg.projection,
        )
