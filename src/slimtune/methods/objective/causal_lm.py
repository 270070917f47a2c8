"""Causal language modelling: cross-entropy of every target token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...loss import causal_lm_loss
from ...registry import register
from ..base import Objective


@register("objective", "causal-lm")
class CausalLM(Objective):
    """Next-token cross-entropy on the target tokens the data format leaves unmasked: every token of plain text, the response of SFT formats, the label word of classification."""

    @dataclass
    class Config(Objective.Config):
        pass

    def loss_sum(
        self, model: nn.Module, head: Any, batch: dict[str, torch.Tensor], chunk: int
    ) -> torch.Tensor:
        # The output head runs ``chunk`` target tokens at a time (loss.py): full-vocabulary
        # logits never exist for the whole batch.
        return causal_lm_loss(model, head, batch, chunk)[0]
