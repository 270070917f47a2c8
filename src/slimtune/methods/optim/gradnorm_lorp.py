"""GradNormLoRP: weight-normalised training with a low-rank projected direction gradient.

Implemented from the equations (the public code overwrites the learned magnitude every step
and keeps a full extra copy of V; this does neither). Each projected weight (m x n, rows = output
units) is read as W = diag(g) V / ||V||_row: a magnitude g (m) and a direction V (m x n). Given
the ordinary gradient G = dL/dW and the unit rows u = V / ||V|| (= W / g), the chain rule gives

    dL/dg_i = <G_i, u_i>,        dL/dV_i = (g_i / ||V_i||) (G_i - <G_i, u_i> u_i).

The direction gradient is GaLore-projected (basis from its own SVD every T steps), Adam runs in
the r-dimensional space and the update is projected back (times alpha); the magnitude takes a
plain Adam step. Then W = diag(g') V' / ||V'||_row is written back into the weight.

V is never stored: it is W's rows rescaled, V = u * ||V||, so the state is g and ||V|| (two
m-vectors), the magnitude's two Adam moments (m each), the basis and the low-rank moments.
V is materialised only transiently while a matrix is updated. Decoupled weight decay shrinks
the magnitude (g -= lr * wd * g), which is the decoupled decay of W. A zero row of W has no
direction: its gradients are zero and it stays zero.
"""

from __future__ import annotations

from typing import Any

import torch

from ...registry import register
from .galore import GaLore, GaLoreAdamW, project, project_back


def weight_norm_grads(
    grad: torch.Tensor, unit: torch.Tensor, magnitude: torch.Tensor, vnorm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the magnitude (m) and the direction V (m x n) from dL/dW, for
    W = diag(magnitude) V / ||V||_row with unit rows ``unit`` = V / ||V|| and row norms ``vnorm``."""
    grad_g = (grad * unit).sum(dim=1)
    grad_v = (grad - grad_g[:, None] * unit) * (magnitude / vnorm)[:, None]
    return grad_g, grad_v


class GradNormLoRPAdamW(GaLoreAdamW):
    """GaLoreAdamW over a weight-normalised reparameterisation of each projected matrix."""

    def _low_rank_update(
        self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> None:
        w = p.detach().float()
        norms = w.norm(dim=1)
        if "magnitude" not in state:
            state["magnitude"], state["vnorm"] = norms.clone(), norms.clone()
        mag, vnorm = state["magnitude"], state["vnorm"]
        # u = W / g: unit rows, signed like the magnitude (which Adam may drive negative)
        unit = w / norms.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        unit.mul_(torch.where(mag < 0, -1.0, 1.0)[:, None])
        grad_g, grad_v = weight_norm_grads(grad.float(), unit, mag, vnorm)

        if "basis" not in state or int(state["step"]) % group["update_gap"] == 0:
            state["basis"] = self._basis(grad_v, state, group)
        state["step"] += 1
        direction, step_size = self._adam(project(grad_v, state["basis"]), state, group)
        v = unit.mul_(vnorm[:, None])  # V, transient
        v.add_(project_back(direction, state["basis"], p.shape), alpha=-step_size * group["scale"])
        mag_direction, mag_step = self._adam(grad_g, state, group, prefix="magnitude_")
        new_mag = mag - mag_step * mag_direction
        if group["weight_decay"] > 0:
            new_mag.add_(mag, alpha=-group["lr"] * group["weight_decay"])
        new_vnorm = v.norm(dim=1)
        w_new = v.mul_((new_mag / new_vnorm.clamp_min(torch.finfo(torch.float32).tiny))[:, None])
        p.copy_(w_new.to(p.dtype))
        state["magnitude"], state["vnorm"] = new_mag, new_vnorm


@register("optimizer", "gradnorm-lorp")
class GradNormLoRP(GaLore):
    """GradNormLoRP ("Gradient Weight-normalized Low-rank Projection for Efficient LLM Training"): weight-normalised matrices, direction gradient GaLore-projected, magnitude on plain Adam."""

    optimizer_class = GradNormLoRPAdamW

    def matrix_state(self, spec: Any, k: int) -> float:
        """Magnitude, row norm of V and the magnitude's two moments: four fp32 m-vectors."""
        return 4 * spec.shape[0] * 4.0
