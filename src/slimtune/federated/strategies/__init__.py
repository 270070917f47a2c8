"""Federated strategies: what goes down to a client, what it sends back after its local round,
and how the server folds the replies into the global state.

A strategy is one class in one module here, decorated ``@register("strategy", name)`` and named
by the recipe's ``federated.strategy``. The runner (``core.py``) calls only the hooks below, in
this order per round: server ``payload`` -> client ``receive``, ``local_optimizer``, ``load``,
``on_step`` (per local step), ``upload`` -> server ``decode`` (per reply), ``aggregate``,
``sync``. A server-side instance lives as long as the :class:`~slimtune.federated.core.Server`
and owns the global state; a client makes a fresh instance per round.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ...config import RunConfig

if TYPE_CHECKING:
    from ..core import Server

Arrays = dict[str, np.ndarray]
State = dict[str, torch.Tensor]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """What travels for a tensor (bf16 as fp32: numpy has no bf16)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.contiguous().numpy()


def numpy_nbytes(t: torch.Tensor) -> int:
    """``to_numpy(t).nbytes`` without the copy."""
    return t.numel() * (4 if t.dtype == torch.bfloat16 else t.element_size())


def to_torch(a: np.ndarray, like: torch.Tensor | None = None) -> torch.Tensor:
    t = torch.from_numpy(np.array(a, copy=True))
    return t.to(like.dtype) if like is not None else t


@dataclasses.dataclass
class Local:
    """One client's round as the client-side hooks see it."""

    cfg: RunConfig
    pid: int
    rnd: int
    arrays: Arrays  # what came down, after ``receive``
    conf: dict[str, Any]  # the round's config from the server
    params: Any  # the params spec this client trains (its rank under a memory budget)
    budget: float | None  # its memory budget (MB), None when homogeneous
    theta0: State  # the initial trainable state at this client's params


class Strategy(ABC):
    """The hooks of a federated strategy (defaults: a stateless client, a dense download); the
    abstract ones every strategy implements."""

    name: str  # set by the registry
    # A client may train at its own LoRA rank (federated.memory_budgets_mb) or compress its
    # upload (federated.compress): only strategies that send the trainable state support it.
    heterogeneous_ranks = False
    compression = False

    def __init__(self, cfg: RunConfig):
        self.cfg, self.f = cfg, cfg.federated

    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        """Refuse a recipe this strategy cannot run (raise SlimtuneError naming the field)."""
        return None  # optional hook

    # --- client side ---------------------------------------------------------------------
    def receive(self, arrays: Arrays, conf: dict[str, Any], memory: dict[str, Any] | None):
        """The client's full view of what came down, given what it kept from earlier rounds
        (``memory``: Flower's per-node state; update it in place to keep something)."""
        return arrays

    def local_optimizer(self, spec: Any, rnd: int, pid: int) -> Any:
        """The optimizer spec of this client's round: a seeded optimizer draws fresh noise
        per round and client."""
        if hasattr(spec, "seed"):
            return dataclasses.replace(spec, seed=spec.seed + 7919 * rnd + 104729 * pid)
        return spec

    @abstractmethod
    def load(self, model: nn.Module, opt: Any, method: Any, local: Local) -> None:
        """Put the global state into the client's freshly prepared model."""

    def on_step(self, step: int, row: dict | None) -> None:
        """After local step ``step`` (``row``: its logged metrics, None when not logged)."""
        return None  # optional hook

    @abstractmethod
    def upload(self, start: State, end: State, local: Local) -> tuple[Arrays, dict[str, Any]]:
        """What the client sends up after its local steps, and extra metrics."""

    # --- server side ---------------------------------------------------------------------
    def start(self, server: Server) -> None:
        """Set up the global state (on ``server``, where reports and tests read it)."""
        return None  # optional hook

    def on_build(self, server: Server) -> None:
        """The server (re)built its model and method."""
        return None  # optional hook

    @abstractmethod
    def payload(self, server: Server, rnd: int, node: int | None, conf: dict[str, Any]):
        """(arrays, conf) that round ``rnd`` sends to ``node``."""

    @abstractmethod
    def decode(self, server: Server, arrays: Arrays, metrics: dict[str, Any]):
        """(update, None) for a well-formed reply, (None, reason) otherwise."""

    @abstractmethod
    def aggregate(self, server: Server, rnd: int, updates: list, weights: list[float]) -> None:
        """Fold the accepted updates (with their metrics: ``(update, metrics)``) into the
        global state."""

    @abstractmethod
    def sync(self, server: Server) -> None:
        """Put the global state into the server's model."""
