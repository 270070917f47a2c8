"""Full fine-tuning: every parameter trains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ...registry import register
from ..base import ParamsMethod, PrepareContext


@register("params", "full")
class Full(ParamsMethod):
    """Full fine-tuning: every weight trains; saved as a plain Hugging Face checkpoint."""

    @dataclass
    class Config:
        pass

    def memory(self, plan: Any) -> None:
        """Every base tensor trains: the plan's starting point, nothing to change."""

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        model.requires_grad_(True)
        return model

    def sharding_refusal(self) -> str | None:
        return None  # tests/test_sharding.py: equals one process
