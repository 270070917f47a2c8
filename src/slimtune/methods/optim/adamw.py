"""Plain first-order optimizers from torch.optim."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ...errors import SlimtuneError
from ...registry import register
from ..base import OptimizerMethod, check_betas


@register("optimizer", "adamw")
class AdamW(OptimizerMethod):
    """AdamW (Loshchilov & Hutter, https://arxiv.org/abs/1711.05101): two fp32 moments per parameter.

    ``state_bits: 8`` keeps both moments blockwise-quantised (bitsandbytes' 8-bit AdamW,
    Dettmers et al., https://arxiv.org/abs/2110.02861; tensors under 4096 elements keep fp32
    moments); ``paged: true`` puts the state in CUDA unified memory that pages out to the CPU
    under memory pressure (QLoRA's paged optimizer; CUDA only)."""

    @dataclass
    class Config(OptimizerMethod.Config):
        betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
        """Moment decay rates (beta1, beta2)."""
        eps: float = 1e-8
        """Denominator epsilon."""
        state_bits: Literal[8, 32] = 32
        """Precision of the moments: 32 (torch's AdamW) or 8 (bitsandbytes, blockwise quantised)."""
        paged: bool = False
        """Page the optimizer state between GPU and CPU memory (bitsandbytes; needs CUDA)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check_betas(self.betas)
            if self.eps <= 0:
                raise ValueError(f"eps must be > 0, got {self.eps}")

    def memory(self, plan: Any) -> None:
        """Two moments per trainable element, in the parameter's dtype (torch's AdamW); 8-bit:
        one byte each plus an fp32 absmax per block of 256 (tensors under 4096 elements keep
        fp32 moments), updated in place. CPU runs one tensor at a time (a temporary of ~2
        tensors' size); CUDA's foreach path makes one temporary list the size of all
        trainable tensors."""
        if self.cfg.state_bits == 8:
            state = sum(
                2 * s.numel * (1 + 4 / 256) if s.numel >= MIN_8BIT else 2 * s.numel * 4.0
                for s in plan.trainable
            )
            plan.add("optimizer state", state, "always", "AdamW moments, 8-bit blockwise")
            return
        state = sum(2 * s.nbytes for s in plan.trainable)
        plan.add("optimizer state", state, "always", "AdamW moments")
        if plan.work.device == "cuda":
            plan.add("temporaries", sum(s.nbytes for s in plan.trainable), "step", "foreach step")
        else:
            plan.add(
                "temporaries",
                2 * max(s.nbytes for s in plan.trainable),
                "step",
                "one tensor's step",
            )

    def check_device(self, device: str) -> None:
        if self.cfg.paged and device != "cuda":
            raise SlimtuneError(
                "optimizer: adamw paged=true needs CUDA (it pages GPU memory); on the CPU set "
                "paged=false (state_bits=8 works there)"
            )

    def sharding_refusal(self) -> str | None:
        if self.cfg.state_bits == 8 or self.cfg.paged:
            return "with state_bits=8 or paged=true quantises whole tensors (bitsandbytes)"
        return None  # torch's AdamW: elementwise, each process updates its shard

    def build(self, groups: list[dict[str, Any]], model: nn.Module) -> torch.optim.Optimizer:
        c = self.cfg
        options = dict(lr=c.lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay)
        if c.state_bits == 32 and not c.paged:
            return torch.optim.AdamW(groups, **options)
        import bitsandbytes as bnb

        cls = {
            (8, False): bnb.optim.AdamW8bit,
            (8, True): bnb.optim.PagedAdamW8bit,
            (32, True): bnb.optim.PagedAdamW,
        }[c.state_bits, c.paged]
        return cls(groups, min_8bit_size=MIN_8BIT, **options)


MIN_8BIT = 4096  # bitsandbytes' default: smaller tensors keep fp32 moments


@register("optimizer", "sgd")
class SGD(OptimizerMethod):
    """SGD with optional momentum: no state without momentum, one buffer with it."""

    stateless = True

    @dataclass
    class Config(OptimizerMethod.Config):
        momentum: float = 0.0
        """Momentum factor (0: plain SGD, no optimizer state)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if not 0 <= self.momentum < 1:
                raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    def memory(self, plan: Any) -> None:
        """No state without momentum, one buffer per trainable element with it."""
        if self.cfg.momentum:
            plan.add(
                "optimizer state",
                sum(s.nbytes for s in plan.trainable),
                "always",
                "momentum buffers",
            )

    def sharding_refusal(self) -> str | None:
        return None  # elementwise: each process updates its shard

    def build(self, groups: list[dict[str, Any]], model: nn.Module) -> torch.optim.Optimizer:
        c = self.cfg
        return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
