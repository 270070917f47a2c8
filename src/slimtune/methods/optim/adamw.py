"""Plain first-order optimizers from torch.optim."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...registry import register
from ..base import OptimizerMethod, check_betas


@register("optimizer", "adamw")
class AdamW(OptimizerMethod):
    """AdamW (Loshchilov & Hutter, https://arxiv.org/abs/1711.05101): two fp32 moments per parameter."""

    @dataclass
    class Config(OptimizerMethod.Config):
        betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
        """Moment decay rates (beta1, beta2)."""
        eps: float = 1e-8
        """Denominator epsilon."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check_betas(self.betas)
            if self.eps <= 0:
                raise ValueError(f"eps must be > 0, got {self.eps}")

    def memory(self, plan: Any) -> None:
        """Two moments per trainable element, in the parameter's dtype (torch's AdamW). CPU runs
        one tensor at a time (a temporary of ~2 tensors' size); CUDA's foreach path makes one
        temporary list the size of all trainable tensors."""
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

    def build(self, groups: list[dict[str, Any]], model: nn.Module) -> torch.optim.Optimizer:
        c = self.cfg
        return torch.optim.AdamW(
            groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay
        )


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

    def build(self, groups: list[dict[str, Any]], model: nn.Module) -> torch.optim.Optimizer:
        c = self.cfg
        return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
