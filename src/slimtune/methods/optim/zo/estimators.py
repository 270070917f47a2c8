"""Estimators: how a zeroth-order step measures the projected gradient g along one z.

The optimizer draws a noise key per sample and block and asks its estimator's ``probe`` for g
(the derivative of the loss along z) and the loss the probe was taken around; the estimate is
``sum g / samples * z``. ``base`` runs once per step, before the probes, for an estimator that
needs the loss at the unperturbed weights (one more forward).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from .noise import PerturbedTensor
from .perturbation import Pass

if TYPE_CHECKING:
    from .optimizer import ZerothOrderOptimizer

Active = dict[int, PerturbedTensor]  # id(param) -> the perturbed tensor


class Estimator:
    """Base: no base forward; subclasses define ``probe``."""

    name: ClassVar[str]
    forward_ad: ClassVar[bool] = False
    """The probes are forward-mode AD (dual) forwards: attention takes torch's math path and a
    frozen output head's logits carry tangents (``methods.py`` plans the memory)."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def base(self, opt: ZerothOrderOptimizer, closure: Callable, step: int) -> float | None:
        """The loss at the unperturbed weights, if this estimator needs it (else None); it is
        then the step's loss."""
        return None

    def probe(
        self,
        opt: ZerothOrderOptimizer,
        closure: Callable,
        key: tuple[int, int],
        active: Active,
        base: float | None,
    ) -> tuple[float, float]:
        """(g, centre): the projected gradient along z_key over ``active`` and the loss it was
        measured around (their mean over the probes is the step's loss)."""
        raise NotImplementedError


class TwoPoint(Estimator):
    """g = (L(w + eps z) - L(w - eps z)) / 2 eps, from one forward of the batch stacked twice
    (three times when the rule ``probes_centre``: the third copy is L(w), kept as ``opt._here``)."""

    name = "two-point"

    def probe(
        self,
        opt: ZerothOrderOptimizer,
        closure: Callable,
        key: tuple[int, int],
        active: Active,
        base: float | None,
    ) -> tuple[float, float]:
        eps, centre = self.cfg.eps, opt.rule.probes_centre
        scales = [eps, -eps, 0.0] if centre else [eps, -eps]
        out = opt._losses(closure, Pass(key, scales, active=active))
        if centre:
            opt._here = out[2]
        return (out[0] - out[1]) / (2 * eps), (out[0] + out[1]) / 2


class OneSided(Estimator):
    """g = (L(w + eps z) - L(w)) / eps: one forward per probe plus one at w per step."""

    name = "one-sided"

    def base(self, opt: ZerothOrderOptimizer, closure: Callable, step: int) -> float:
        return opt._losses(closure, Pass(opt._key(step, 0, 0), [0.0]))[0]

    def probe(
        self,
        opt: ZerothOrderOptimizer,
        closure: Callable,
        key: tuple[int, int],
        active: Active,
        base: float | None,
    ) -> tuple[float, float]:
        eps = self.cfg.eps
        assert base is not None  # from ``base``
        plus = opt._losses(closure, Pass(key, [eps], active=active))[0]
        return (plus - base) / eps, base


class ForwardMode(Estimator):
    """g = grad L . z exactly, the jvp of one dual forward (eps is unused)."""

    name = "forward-grad"
    forward_ad = True

    def probe(
        self,
        opt: ZerothOrderOptimizer,
        closure: Callable,
        key: tuple[int, int],
        active: Active,
        base: float | None,
    ) -> tuple[float, float]:
        primal, jvp = opt._losses(closure, Pass(key, [1.0], dual=True, active=active))
        return jvp, primal


ESTIMATORS: dict[str, type[Estimator]] = {e.name: e for e in (TwoPoint, OneSided, ForwardMode)}


def estimator_for(name: str) -> type[Estimator]:
    """The estimator class of the config's ``estimator`` name."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"estimator must be one of {', '.join(ESTIMATORS)}, got {name!r}"
        ) from None
