"""Zeroth-order optimizers: MeZO (SPSA), its ZO-Bench variants, Sparse MeZO and forward gradients.

Every method here estimates the gradient from forward passes only (no autograd graph, no
``.grad``) and updates the weights itself; its ``step`` hands the optimizer a closure that runs
the step's micro-batches through a forward function.

* ``noise.py``: the perturbation z, a pure function of (seed, step, sample, tensor, element),
  so any slice of any tensor's z can be generated on its own and nothing is stored.
* ``perturbation.py``: forwards at ``W + s z`` without moving the weights (per-module forward
  wrappers; the +eps and -eps copies of the batch in one stacked forward; dual tensors for
  forward gradients).
* ``forward.py``: the loss of each stacked copy, through ``loss.py``'s chunked cross-entropy or,
  for a perturbed output head, a block of vocabulary rows at a time.
* ``estimators.py``: the projected gradient along one z (two-point, one-sided, forward-gradient)
  as small classes.
* ``rules.py``: the update rules (sgd, momentum, sign, adam, cons) as small classes.
* ``optimizer.py``: the estimate (samples, blocks) and the chunked update.
* ``methods.py``: the registered methods and their options.
"""

from .estimators import Estimator, ForwardMode, OneSided, TwoPoint, estimator_for
from .forward import HEAD_BLOCK, SegmentForward
from .methods import (
    ForwardGrad,
    MeZO,
    SparseMeZO,
    ZerothOrder,
    ZOAdam,
    ZOCons,
    ZOMomentum,
    ZOSign,
)
from .noise import CHUNK, POOL_BLOCK, Noise, PerturbedTensor, table, words
from .optimizer import ZerothOrderOptimizer
from .perturbation import Pass, Perturber, Unstackable
from .rules import SGD, Adam, Cons, Momentum, Sign, UpdateRule

# The names before the split into modules, kept for tests/test_zo.py only (use the public ones).
_Tensor, _Pass, _table, _words = PerturbedTensor, Pass, table, words

__all__ = [
    "CHUNK",
    "HEAD_BLOCK",
    "POOL_BLOCK",
    "SGD",
    "Adam",
    "Cons",
    "Estimator",
    "ForwardGrad",
    "ForwardMode",
    "MeZO",
    "Momentum",
    "Noise",
    "OneSided",
    "Pass",
    "PerturbedTensor",
    "Perturber",
    "SegmentForward",
    "Sign",
    "SparseMeZO",
    "TwoPoint",
    "UpdateRule",
    "Unstackable",
    "ZOAdam",
    "ZOCons",
    "ZOMomentum",
    "ZOSign",
    "ZerothOrder",
    "ZerothOrderOptimizer",
    "estimator_for",
    "table",
    "words",
]
