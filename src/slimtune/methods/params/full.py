"""Full fine-tuning: every parameter trains."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...registry import register
from ..base import ParamsMethod, PrepareContext


@register("params", "full")
class Full(ParamsMethod):
    """Full fine-tuning: every weight trains; saved as a plain Hugging Face checkpoint."""

    @dataclass
    class Config:
        pass

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        model.requires_grad_(True)
        return model
