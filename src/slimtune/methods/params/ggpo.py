"""LoRA-GGPO / LoRA-MGPO (Chang et al., https://arxiv.org/abs/2502.14538): during each training
step the frozen weight of every LoRA layer is perturbed along the optimizer's momentum mapped
into weight space, with a size set by the layer's smoothed gradient norm, so that the factors
are trained at a nearby point of the loss surface (flatter minima, the paper's cure for LoRA's
double descent). The update itself is LoRA's; nothing of this is saved with the adapter.

For a layer with scale s, factors A (r x in), B (out x r) and their first moments m_A, m_B:

* direction  v = s (m_B A + B m_A)   (the momentum of the product s B A, to first order)
* size       g = EMA_beta of || s (dB A + B dA) ||_F, the weight-space gradient norm, updated
  after each step's backward (before clipping, with the weights of that step)
* perturbation  eps = -rho * v / ||v||_F * min(1 / g, max_scale)

The authors' code adds eps to W in place before the forward and subtracts it after the backward
(recomputed), which leaves W off by rounding every step and cannot touch a quantised W. Here W
is never written: v has rank <= 2r, v = s [m_B, B] [A; m_A], so each LoRA layer adds
``x eps^T`` to its output as two thin products (a forward hook), which is the same function
and gradient as computing with W + eps. Norms are taken on 2r x 2r Gram matrices, never on
an out x in matrix. No perturbation before the first step (no momentum yet), none outside a
training step (evaluation), none while the adapters are switched off (a reference policy).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import SlimtuneError

UNSET = -1.0  # a layer's smoothed gradient norm before its first backward


def low_rank_norm(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """|| p q ||_F for p (out x k), q (k x in), from k x k Gram matrices: trace(p^T p q q^T)."""
    p, q = p.double(), q.double()
    return ((p.T @ p) * (q @ q.T)).sum().clamp_min(0).sqrt()


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """peft's LoRA layers of ``model`` over linear weights (dense or quantised) that hold the
    trained adapter, by name."""
    from peft.tuners.lora.layer import LoraLayer

    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer)
        and "default" in m.lora_A
        and isinstance(m.lora_A["default"], nn.Linear)
        and "default" in m.lora_B
    }


class GGPO:
    """The perturbation of one run's LoRA layers: installed once on the prepared peft model."""

    def __init__(self, model: nn.Module, rho: float, beta: float, max_scale: float):
        self.rho, self.beta, self.max_scale = rho, beta, max_scale
        self.layers = lora_layers(model)
        if not self.layers:
            raise SlimtuneError("params: ggpo: the adapter has no LoRA linear layer to perturb")
        # smoothed weight-space gradient norm per layer (a checkpoint and FedAvg carry it)
        self.gbar = {n: torch.tensor(UNSET) for n in self.layers}
        self.active: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.pending: dict[str, torch.Tensor] = {}  # this step's gradient norms
        self.seen: dict[str, list[int]] = {n: [0, 0] for n in self.layers}
        for name, layer in self.layers.items():
            layer.register_forward_hook(self._hook(name))
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            for i, p in enumerate((a, b)):
                p.register_post_accumulate_grad_hook(self._grad_hook(name, i))

    # --- before the step: the perturbation ----------------------------------------------
    def start(self, optimizer: Any) -> None:
        """Build each layer's perturbation from the optimizer's momentum (none before the
        first step); it holds for the forwards and backwards of this step."""
        self.active = {}
        state = optimizer.state
        for name, layer in self.layers.items():
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            m_a, m_b = momentum(state, a), momentum(state, b)
            if m_a is None or m_b is None:
                continue
            s = float(layer.scaling["default"])
            with torch.no_grad():
                p = torch.cat([m_b, b], dim=1).float()  # out x 2r
                q = torch.cat([a, m_a], dim=0).float()  # 2r x in
                norm = float(s * low_rank_norm(p, q))
                if not norm > 1e-12:  # the authors' eps: no direction, no perturbation
                    continue
                g = float(self.gbar[name])
                scale = min(1.0 / (g + 1e-12), self.max_scale) if g >= 0 else 1.0
                self.active[name] = (p, q, -self.rho * scale * s / norm)

    def end(self) -> None:
        self.active = {}

    def _hook(self, name: str):
        def add(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            found = self.active.get(name)
            if found is None or not module.training or module.disable_adapters:
                return out
            if "default" not in module.active_adapters:
                return out
            p, q, c = found
            x = args[0]
            extra = F.linear(F.linear(x.to(q.dtype), q), p) * c
            return out + extra.to(out.dtype)

        return add

    # --- after the backward: the gradient norm -----------------------------------------
    def _grad_hook(self, name: str, which: int):
        def seen(param: torch.Tensor) -> None:
            count = self.seen[name]
            count[which] += 1
            if count[0] != count[1]:
                return  # the other factor's gradient of this backward is not in yet
            layer = self.layers[name]
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if a.grad is None or b.grad is None:
                return
            with torch.no_grad():
                s = float(layer.scaling["default"])
                p = torch.cat([b.grad, b], dim=1)
                q = torch.cat([a, a.grad], dim=0)
                self.pending[name] = s * low_rank_norm(p, q).float()

        return seen

    def commit(self) -> None:
        """After the step: fold the step's gradient norms into the moving averages (the last
        backward of the step saw the whole accumulated gradient)."""
        for name, g in self.pending.items():
            old = float(self.gbar[name])
            new = float(g) if old < 0 else self.beta * old + (1 - self.beta) * float(g)
            self.gbar[name] = torch.tensor(new)
        self.pending = {}
        for count in self.seen.values():
            count[0] = count[1] = 0

    # --- state --------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        return {f"{n}.ggpo_gbar": g for n, g in self.gbar.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for n in self.gbar:
            self.gbar[n] = state[f"{n}.ggpo_gbar"].detach().float().cpu().reshape(())


def momentum(state: Any, p: torch.Tensor) -> torch.Tensor | None:
    """The optimizer's first moment of ``p`` in p's own shape (AdamW's exp_avg, SGD's
    momentum buffer), or None."""
    st = state.get(p) if hasattr(state, "get") else None
    if not st:
        return None
    m = st.get("exp_avg", st.get("momentum_buffer"))
    if m is None or tuple(m.shape) != tuple(p.shape):
        return None
    return m.detach()
