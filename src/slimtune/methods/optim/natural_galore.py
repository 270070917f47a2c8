"""Natural GaLore: GaLore whose projected gradient is whitened by the inverse empirical Fisher.

Following the paper (one-sided projection, unlike the public code's two-sided Tucker form): for
each low-rank matrix, the last ``history`` projected gradients g (flattened, k = r * n or m * r)
are kept as the rows of H (s x k). With F = lambda I + H^T H (the empirical Fisher of the kept
gradients, damped), the Woodbury identity gives, with an s x s Cholesky solve instead of a k x k
inverse,

    S = I + H H^T / lambda,  z = S^{-1} (H g),  F^{-1} g = g / lambda - H^T z / lambda^2,

and F^{-1} g goes into the Adam moments; the rest is GaLore. The current gradient enters the
history before the solve. When a matrix's basis is recomputed the history is emptied (its rows
live in the old basis); Adam's moments are kept, as in GaLore. The history is optimizer state:
s * k fp32 numbers per matrix, counted in ``state_bytes`` (the paper calls the method free of
extra memory; it is not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...registry import register
from .galore import GaLore, GaLoreAdamW


def woodbury_natural_gradient(
    history: torch.Tensor, g: torch.Tensor, damping: float
) -> torch.Tensor:
    """(damping I + H^T H)^{-1} g for H = ``history`` (s x k), g (k), through an s x s solve."""
    gram = history @ history.t() / damping
    gram.diagonal().add_(1.0)
    chol = torch.linalg.cholesky(gram)
    z = torch.cholesky_solve((history @ g).unsqueeze(1), chol).squeeze(1)
    return g / damping - history.t() @ z / damping**2


class NaturalGaLoreAdamW(GaLoreAdamW):
    """GaLoreAdamW with the projected gradient whitened by a Woodbury-inverted empirical Fisher.

    Extra group defaults: ``history`` (s, gradients kept per matrix), ``damping`` (lambda).
    """

    def __init__(self, params: Any, history: int = 20, damping: float = 1e-3, **kwargs: Any):
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        if damping <= 0:
            raise ValueError(f"damping must be > 0, got {damping}")
        super().__init__(params, history=history, damping=damping, **kwargs)

    def _on_new_basis(self, state: dict[str, Any]) -> None:
        state["history_len"] = torch.zeros((), dtype=torch.float32)
        state["history_pos"] = torch.zeros((), dtype=torch.float32)

    def _transform(
        self, low: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> torch.Tensor:
        g = low.reshape(-1)
        size = group["history"]
        buf = state.get("history")
        if buf is None or buf.shape != (size, g.numel()):
            buf = state["history"] = torch.zeros(size, g.numel(), dtype=torch.float32)
            self._on_new_basis(state)
        pos, n = int(state["history_pos"]), int(state["history_len"])
        buf[pos] = g
        state["history_pos"].fill_((pos + 1) % size)
        state["history_len"].fill_(min(n + 1, size))
        rows = buf[: min(n + 1, size)]  # filled from row 0 after every reset
        return woodbury_natural_gradient(rows, g, group["damping"]).view_as(low)


@register("optimizer", "natural-galore")
class NaturalGaLore(GaLore):
    """Natural GaLore ("Natural GaLore: Accelerating GaLore for memory-efficient LLM Training and Fine-tuning"): GaLore with the projected gradient whitened by a Woodbury-inverted empirical Fisher over the last s gradients."""

    optimizer_class = NaturalGaLoreAdamW

    @dataclass
    class Config(GaLore.Config):
        history: int = 20
        """s: projected gradients kept per matrix for the Fisher estimate (memory: s x r x n floats per matrix)."""
        damping: float = 1e-3
        """lambda: damping of the empirical Fisher (lambda I + H^T H)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.history < 1:
                raise ValueError(f"history must be >= 1, got {self.history}")
            if self.damping <= 0:
                raise ValueError(f"damping must be > 0, got {self.damping}")

    def extra_defaults(self) -> dict[str, Any]:
        return {"history": self.cfg.history, "damping": self.cfg.damping}

    def matrix_state(self, spec: Any, k: int) -> float:
        """The gradient history: s projected gradients (fp32) per matrix."""
        return self.cfg.history * k * 4.0
