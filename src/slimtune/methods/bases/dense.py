"""Dense bases: every weight held as a plain tensor of one floating dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import register
from ..base import BaseWeights


class Dense(BaseWeights):
    """Every weight in one floating dtype (the class attribute ``dtype``)."""

    dtype: ClassVar[torch.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.dtype


@register("base", "fp32")
class FP32(Dense):
    """Weights in float32 (4 bytes each): exact and slowest; the default."""

    dtype = torch.float32

    @dataclass
    class Config(Dense.Config):
        pass


@register("base", "bf16")
class BF16(Dense):
    """Weights in bfloat16 (2 bytes each): half the memory, float32's range, 8 mantissa bits."""

    dtype = torch.bfloat16

    @dataclass
    class Config(Dense.Config):
        pass


@register("base", "fp16")
class FP16(Dense):
    """Weights in float16 (2 bytes each): half the memory, 10 mantissa bits, range up to 65504."""

    dtype = torch.float16

    @dataclass
    class Config(Dense.Config):
        pass
