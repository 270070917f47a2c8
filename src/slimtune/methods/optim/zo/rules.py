"""Update rules: how a zeroth-order step turns its gradient estimate into new weights.

The optimizer estimates the gradient as ``sum_k c_k z_k`` (its ``terms``: noise key, coefficient
c_k, the tensors it covers) and hands the terms to its rule's ``update``. The default update
regenerates z a chunk at a time and asks ``chunk`` for the new weights of that chunk; a rule that
keeps state names its buffers (flat fp32, one element per trainable element, created on first
use under these optimizer-state keys, so checkpoints keep their layout).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .perturbation import Pass

if TYPE_CHECKING:
    from .optimizer import ZerothOrderOptimizer


class UpdateRule:
    """ZO-SGD (MeZO): w -= lr (d + wd w), d = sum_k c_k z_k."""

    name: ClassVar[str] = "sgd"
    buffers: ClassVar[tuple[str, ...]] = ()
    """Optimizer-state keys of the rule's fp32 buffers (one element per trainable element)."""
    probes_centre: ClassVar[bool] = False
    """The two-point estimate also evaluates the loss at the unperturbed weights (a third
    stacked copy), which the update reads as ``opt._here``."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def update(self, opt: ZerothOrderOptimizer, closure: Callable, terms: list, step: int) -> None:
        """Apply the estimate ``terms`` of step ``step`` to the optimizer's tensors."""
        opt._apply(terms, add=False, step=step)

    def chunk(
        self,
        w: torch.Tensor,
        d: torch.Tensor,
        state: dict[str, torch.Tensor],
        lr: float,
        wd: float,
        step: int,
    ) -> torch.Tensor:
        """New values (fp32) of the flat chunk ``w`` of a weight: ``d`` is the estimate over it
        (fp32, the rule's to modify), ``state`` the same chunk of each of ``buffers``. For fp32
        weights the result may be ``w`` itself, updated in place."""
        new = w.float()
        if wd:
            d.add_(new, alpha=wd)
        return new.add_(self.direction(d, state), alpha=-lr)

    def direction(self, d: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The step direction from the (weight-decayed) estimate."""
        return d


class SGD(UpdateRule):
    """ZO-SGD (MeZO): the default rule."""


class Momentum(UpdateRule):
    """ZO-SGD with momentum (ZO-Bench): buf = momentum buf + d; w -= lr buf."""

    name = "momentum"
    buffers = ("momentum_buffer",)

    def direction(self, d: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        buf = state["momentum_buffer"]
        buf.mul_(self.cfg.momentum).add_(d)
        return buf


class Sign(UpdateRule):
    """ZO-SignSGD (ZO-Bench): w -= lr sign(d)."""

    name = "sign"

    def direction(self, d: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return d.sign_()


class Adam(UpdateRule):
    """ZO-Adam (ZO-Bench): Adam moments of d, decoupled weight decay."""

    name = "adam"
    buffers = ("exp_avg", "exp_avg_sq")

    def chunk(self, w, d, state, lr, wd, step):  # type: ignore[override]
        b1, b2 = self.cfg.betas
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(b1).add_(d, alpha=1 - b1)
        v.mul_(b2).addcmul_(d, d, value=1 - b2)
        t = step + 1
        denom = (v / (1 - b2**t)).sqrt_().add_(self.cfg.adam_eps)
        new = w.float()
        if wd:
            new.mul_(1 - lr * wd)
        return new.addcdiv_(m, denom, value=-lr / (1 - b1**t))


class Cons(UpdateRule):
    """ZO-SGD-Cons (ZO-Bench): keep the best of w, w - lr g z and w + lr g z (one sample, one
    block; the loss at w comes with the estimate, the two candidates cost one more forward)."""

    name = "cons"
    probes_centre = True

    def update(self, opt, closure, terms, step):  # type: ignore[override]
        (key, g, active), lr = terms[0], opt.param_groups[0]["lr"]
        here = opt._here
        cand = opt._losses(closure, Pass(key, [-lr * g, lr * g], active=active))
        options = [
            (here if here is not None else math.inf, 0.0),
            (cand[0], -lr * g),
            (cand[1], lr * g),
        ]
        best = min(options, key=lambda x: x[0])[1]
        opt.step_info["cons_choice"] = [0.0, -lr * g, lr * g].index(best)
        if best:
            opt._apply([(key, best, active)], add=True)
