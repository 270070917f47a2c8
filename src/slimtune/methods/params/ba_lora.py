"""BA-LoRA (Chang et al., https://arxiv.org/abs/2408.04556): PiSSA-initialised LoRA trained with
three regularisers on the model's final hidden states H (the valid tokens of the micro-batch,
N x d) that counter the biases a pre-trained model passes on:

- consistency: mean squared difference between H and the pre-trained model's H on the same
  batch (the adapters at their initial values: with PiSSA the base holds W - B0 A0, so
  disabling the adapters would not give the pre-trained model);
- diversity: the squared off-diagonal entries of H's covariance (decorrelated dimensions
  against representation collapse), divided by d^2;
- SVD: minus the share of H's top-k singular values in their sum (a dominant spectrum).

Each enters the loss with its weight (``consistency``, ``diversity``, ``svd``) through the
params contract's ``regulariser``: forward hooks keep the micro-batch's inputs and the final
norm's output for it. The artefact is LoRA's (PEFT format, converted to a delta on the
original weights).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ...errors import SlimtuneError
from ...registry import register
from ..base import PrepareContext
from .lora import Lora


def consistency(h: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the hidden states and the pre-trained model's."""
    return (h - ref).pow(2).mean()


def diversity(h: torch.Tensor) -> torch.Tensor:
    """Squared off-diagonal covariance of the N x d hidden states, over d^2."""
    z = h - h.mean(dim=0, keepdim=True)
    cov = z.T @ z / max(h.shape[0] - 1, 1)
    off = cov - torch.diag_embed(torch.diagonal(cov))
    return off.pow(2).sum() / h.shape[1] ** 2


def svd_share(h: torch.Tensor, k: int) -> torch.Tensor:
    """Minus the share of the top-k singular values of the hidden states in their sum."""
    s = torch.linalg.svdvals(h)
    return -s[:k].sum() / s.sum().clamp_min(torch.finfo(s.dtype).tiny)


@register("params", "ba-lora")
class BaLora(Lora):
    """BA-LoRA (Chang et al., https://arxiv.org/abs/2408.04556): PiSSA-initialised LoRA plus consistency, diversity and SVD regularisers on the final hidden states, weighted in the recipe."""

    frozen_base = False  # PiSSA (the default) leaves W - B0 A0 in the base

    @dataclass
    class Config(Lora.Config):
        init: Literal["default", "gaussian", "pissa", "olora", "corda", "loftq"] = "pissa"
        """Adapter initialisation (the paper: pissa)."""
        consistency: float = 1e-3
        """Weight of the consistency term (hidden states near the pre-trained model's)."""
        diversity: float = 1e-3
        """Weight of the diversity term (off-diagonal covariance of the hidden states)."""
        svd: float = 1e-3
        """Weight of the SVD term (share of the top svd_k singular values)."""
        svd_k: int = 4
        """Singular values the SVD term favours."""

        def __post_init__(self) -> None:
            super().__post_init__()
            for key in ("consistency", "diversity", "svd"):
                if getattr(self, key) < 0:
                    raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
            if self.svd_k < 1:
                raise ValueError(f"svd_k must be >= 1, got {self.svd_k}")

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        model = super().prepare(model, ctx)
        self.initial_factors = {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        }
        self.seen: dict[str, Any] = {}
        norm = final_norm(model)

        def keep_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self.seen.get("reference"):
                self.seen["inputs"] = {
                    k: kwargs[k] for k in ("input_ids", "attention_mask") if k in kwargs
                }

        def keep_hidden(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            key = "reference_hidden" if self.seen.get("reference") else "hidden"
            self.seen[key] = out

        self.hooks = [
            model.get_base_model().register_forward_pre_hook(keep_inputs, with_kwargs=True),
            norm.register_forward_hook(keep_hidden),
        ]
        return model

    def check_optimizer(self, optimizer: Any) -> None:
        if optimizer.forward_only and (self.cfg.consistency or self.cfg.diversity or self.cfg.svd):
            raise SlimtuneError(
                f"params: ba-lora: its regularisers need gradients, which optimizer "
                f"{optimizer.name} does not compute; set consistency, diversity and svd to 0"
            )

    @contextmanager
    def pretrained(self, model: nn.Module) -> Iterator[None]:
        """The adapters at their initial values (the pre-trained model: PiSSA's base holds
        W - B0 A0), restored afterwards."""
        params = dict(model.named_parameters())
        now = {n: params[n].data for n in self.initial_factors}
        try:
            for n, t in self.initial_factors.items():
                params[n].data = t
            yield
        finally:
            for n, t in now.items():
                params[n].data = t

    def regulariser(self, model: nn.Module) -> torch.Tensor | None:
        c = self.cfg
        h, inputs = self.seen.pop("hidden", None), self.seen.get("inputs")
        if h is None or inputs is None or not (c.consistency or c.diversity or c.svd):
            return None
        mask = inputs.get("attention_mask")
        valid = h[mask.bool()] if mask is not None else h.flatten(0, -2)
        valid = valid.float()
        total = torch.zeros((), device=h.device)
        if c.consistency:
            with torch.no_grad(), self.pretrained(model):
                self.seen["reference"] = True
                try:  # the blocks and the final norm only: no logits
                    model.get_base_model().model(**inputs)
                finally:
                    self.seen["reference"] = False
            ref = self.seen.pop("reference_hidden")
            ref = (ref[mask.bool()] if mask is not None else ref.flatten(0, -2)).float()
            total = total + c.consistency * consistency(valid, ref)
        if c.diversity:
            total = total + c.diversity * diversity(valid)
        if c.svd:
            total = total + c.svd * svd_share(valid, c.svd_k)
        return total


def final_norm(model: nn.Module) -> nn.Module:
    """The norm after the last block (Llama, Qwen2, Gemma: ``model.norm``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    norm = getattr(inner, "norm", None)
    if norm is None:
        raise SlimtuneError(f"params: ba-lora: no final norm found in {type(base).__name__}")
    return norm
