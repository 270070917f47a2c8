"""GaLore: Adam whose moments live in a low-rank projection of each weight matrix's gradient.

``GaLoreAdamW`` is a plain ``torch.optim.Optimizer``; the family's other members
(``natural_galore.py``, ``gradnorm_lorp.py``) subclass it and change only what is done to a
matrix's gradient. What it adds to AdamW, per parameter group:

- ``rank`` (None: plain AdamW for the group), ``update_gap`` (T: the basis is recomputed from
  the current gradient every T steps of that parameter, and at its first step), ``scale``
  (alpha, multiplies the projected-back update).
- The projection side follows from the matrix shape, never a flag: an m x n gradient with
  m >= n is projected on the right (basis Q, r x n: R = G Q^T, back = N Q), otherwise on the
  left (basis P, m x r: R = P^T G, back = P N). The SVD runs in fp32; moments are fp32, in the
  r-dimensional space; the moments are kept when the basis changes (as the paper does).
- The step follows the reference implementation: Adam's bias correction folded into the step
  size (lr * sqrt(1 - b2^t) / (1 - b1^t)), eps added to sqrt(v), decoupled weight decay
  ``p -= lr * wd * p`` after the update, not scaled by alpha.
- ``state_bits=8`` keeps both moments blockwise-quantised (bitsandbytes' dynamic 8-bit maps,
  blocks of 256, fp32 absmax per block) for tensors of >= 4096 elements; smaller ones stay fp32.
- ``layerwise=True`` steps each parameter from a post-accumulate-grad hook and frees its
  gradient at once, so the model's whole gradient is never resident. Gradient accumulation is
  honoured: while ``accumulating`` is True the hooks let gradients add up; the loop sets it for
  every micro-batch but the last. Clipping really happens, inside the hook, with a coefficient
  from the *previous* step's global gradient norm, min(1, max_grad_norm / norm_prev) (the
  current global norm is not known until the whole backward has run); before any norm has been
  measured (first step), each parameter's gradient is clipped to its share of the budget,
  max_grad_norm * sqrt(numel / total numel), which bounds the global norm by max_grad_norm.
  ``grad_norm()`` gives the pre-clip global norm of the last backward. A non-finite gradient is
  not applied (that parameter is skipped) and shows as a non-finite ``grad_norm()``.

Optimizer state holds tensors only, so ``torch.load(weights_only=True)`` reads a checkpoint,
and ``load_state_dict`` keeps each state tensor's own dtype (torch would cast the 8-bit
moments and fp32 moments of a bf16 model to the parameter's dtype).

Outside slimtune::

    from slimtune.optim import GaLoreAdamW, galore_param_groups
    opt = GaLoreAdamW(galore_param_groups(model, rank=8), lr=1e-5)
    trainer = transformers.Trainer(model=model, args=args, optimizers=(opt, None))  # not layer-wise
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ...errors import SlimtuneError
from ...memory import optimizer_state_bytes
from ...registry import register
from ..base import OptimizerMethod, StepContext, StepResult, backprop, check_betas

BLOCK = 256  # 8-bit moments: elements per quantisation block
MIN_8BIT = 4096  # smaller state tensors stay fp32 (as bitsandbytes does)
SLICE = 1 << 21  # elements: larger tensors without a projection are updated a slice at a time
_MOMENTS = ("exp_avg", "exp_avg_sq")


# --- projection --------------------------------------------------------------------------------


def right_side(shape: torch.Size | tuple[int, ...]) -> bool:
    """True when an m x n gradient is projected on the right (m >= n), else on the left."""
    return shape[0] >= shape[1]


def make_basis(
    grad: torch.Tensor,
    rank: int,
    method: str = "svd",
    previous: torch.Tensor | None = None,
    iters: int = 2,
    seed: int = 0,
) -> torch.Tensor:
    """Orthonormal basis of the top-``rank`` singular subspace on the smaller side, in fp32:
    Q = V^T[:r] (r x n) when m >= n, else P = U[:, :r] (m x r).

    ``method="svd"`` takes the exact SVD (O(m n min(m, n)), the wall at 7B). ``"randomized"``
    runs ``iters`` steps of subspace iteration (Halko, Martinsson & Tropp, 2011) on the
    smaller side, started from ``previous`` (the basis being replaced: gradients of
    consecutive refreshes share most of their leading subspace) padded with seeded Gaussian
    columns to r + 8 (cold start: all Gaussian); then an SVD of the small m x (r + 8)
    product picks the leading r directions. Cost: 2 iters + 1 products with the gradient."""
    g = grad.float()
    right = right_side(g.shape)
    if method == "svd":
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        return vh[:rank].contiguous() if right else u[:, :rank].contiguous()
    a = g if right else g.T  # the basis spans a's row space: (k x n) on a's right side
    n = a.shape[1]
    k = min(rank + OVERSAMPLE, n)
    gen = torch.Generator(device=a.device).manual_seed(seed)
    start = torch.randn(n, k, generator=gen, device=a.device)
    if previous is not None:
        prev = previous.float() if right else previous.float().T  # r x n
        start[:, : prev.shape[0]] = prev.T
    v, _ = torch.linalg.qr(start)
    for _ in range(iters):
        v, _ = torch.linalg.qr(a.T @ (a @ v))
    _, _, wh = torch.linalg.svd(a @ v, full_matrices=False)
    basis = (v @ wh[:rank].T).T  # rank x n: a's leading right singular vectors
    return basis.contiguous() if right else basis.T.contiguous()


OVERSAMPLE = 8  # extra columns of the randomized range finder (Halko et al.: 5-10)


def project(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Gradient (m x n) -> low-rank (m x r or r x n), in fp32."""
    g = grad.float()
    return g @ basis.t() if right_side(grad.shape) else basis.t() @ g


def project_back(low: torch.Tensor, basis: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Low-rank -> m x n (without the scale alpha)."""
    return low @ basis if right_side(shape) else basis @ low


# --- 8-bit moments -----------------------------------------------------------------------------

_CODES: dict[tuple[bool, str], torch.Tensor] = {}


def _code(signed: bool, device: torch.device) -> torch.Tensor:
    key = (signed, str(device))
    if key not in _CODES:
        from bitsandbytes.functional import create_dynamic_map

        _CODES[key] = create_dynamic_map(signed=signed).to(device)
    return _CODES[key]


def quantize(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit (bitsandbytes' dynamic map): uint8 codes and fp32 per-block absmax."""
    from bitsandbytes.functional import quantize_blockwise

    q, qs = quantize_blockwise(x.contiguous(), code=_code(signed, x.device), blocksize=BLOCK)
    return q, qs.absmax.float()


def dequantize(q: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_blockwise

    return dequantize_blockwise(
        q, absmax=absmax, code=_code(signed, q.device), blocksize=BLOCK
    ).float()


# --- the optimizer -----------------------------------------------------------------------------


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore's low-rank gradient projection on groups that set ``rank``.

    Args beyond AdamW's: ``rank``, ``update_gap``, ``scale`` (group defaults; a group with
    ``rank=None`` is plain AdamW), ``state_bits`` (32 or 8), ``layerwise`` (step from
    post-accumulate-grad hooks, see the module docstring), ``max_grad_norm`` (layer-wise
    clipping; 0 disables it).
    """

    steps_in_backward: bool  # the loop's cue: updates happen inside backward

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        rank: int | None = None,
        update_gap: int = 200,
        scale: float = 0.25,
        state_bits: int = 32,
        layerwise: bool = False,
        max_grad_norm: float = 0.0,
        **extra: Any,
    ):
        if state_bits not in (8, 32):
            raise ValueError(f"state_bits must be 8 or 32, got {state_bits}")
        if update_gap < 1:
            raise ValueError(f"update_gap must be >= 1, got {update_gap}")
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            update_gap=update_gap,
            scale=scale,
            state_bits=state_bits,
            **extra,
        )
        super().__init__(params, defaults)
        self.steps_in_backward = layerwise
        self.accumulating = False
        self.max_grad_norm = max_grad_norm
        self._sq = 0.0  # sum of squared gradient norms seen by the hooks in this step
        self._prev_norm: float | None = None
        self._hooks = []
        if layerwise:
            params_ = [p for g in self.param_groups for p in g["params"]]
            self._total = sum(p.numel() for p in params_)
            # By index: load_state_dict (accelerate calls it in prepare) replaces the group dicts.
            self._group_of = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}
            self._hooks = [self._register(p) for p in params_]

    # -- what subclasses change ----------------------------------------------------------------

    def _low_rank_update(
        self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> None:
        """One step of a matrix parameter with a rank: project, Adam in low rank, project back."""
        # The refresh looks at the count of steps before this one, as the reference does.
        if "basis" not in state or int(state["step"]) % group["update_gap"] == 0:
            state["basis"] = self._basis(grad, state, group)
            self._on_new_basis(state)
        state["step"] += 1
        low = self._transform(project(grad, state["basis"]), state, group)
        direction, step_size = self._adam(low, state, group)
        update = project_back(direction, state["basis"], p.shape).mul_(group["scale"])
        self._apply(p, update, step_size, group)

    def _basis(
        self, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> torch.Tensor:
        """A matrix's new basis (exact SVD or warm-started randomized, ``group["basis"]``);
        the randomized draw is seeded by the step count and shape, so a resume repeats it."""
        step = int(state["step"])
        return make_basis(
            grad,
            min(group["rank"], *grad.shape),
            group.get("basis", "svd"),
            state.get("basis"),
            group.get("power_iters", 2),
            seed=step * 1_000_003 + grad.shape[0] * 7919 + grad.shape[1],
        )

    def _on_new_basis(self, state: dict[str, Any]) -> None:
        """Called when a matrix's basis has been (re)computed."""

    def _transform(
        self, low: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> torch.Tensor:
        """The projected gradient fed to the moments (Natural GaLore whitens it here)."""
        return low

    # -- shared machinery ----------------------------------------------------------------------

    def _init_moments(
        self, like: torch.Tensor, state: dict[str, Any], group: dict[str, Any], prefix: str
    ) -> None:
        """Zero moments named ``prefix + exp_avg(_sq)`` shaped like ``like``, unless present:
        fp32, or uint8 codes + fp32 block absmax for 8-bit state."""
        m_name, v_name = (prefix + n for n in _MOMENTS)
        if m_name in state or m_name + "_q" in state:
            return
        if group["state_bits"] == 8 and like.numel() >= MIN_8BIT:
            blocks = -(-like.numel() // BLOCK)
            for name, signed in ((m_name, True), (v_name, False)):
                zero_code = int(quantize(torch.zeros(BLOCK, device=like.device), signed)[0][0])
                state[name + "_q"] = torch.full(
                    like.shape, zero_code, dtype=torch.uint8, device=like.device
                )
                state[name + "_absmax"] = torch.zeros(blocks, device=like.device)
        else:
            state[m_name] = torch.zeros_like(like, dtype=torch.float32)
            state[v_name] = torch.zeros_like(like, dtype=torch.float32)

    def _adam(
        self,
        grad: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        prefix: str = "",
        part: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, float]:
        """Update the moments with ``grad`` (fp32); return the direction m / (sqrt(v) + eps)
        and the step size lr * sqrt(1 - b2^t) / (1 - b1^t) (bias correction folded in).

        With ``part`` = (a, b), ``grad`` is elements a..b of the flattened gradient and only
        that slice of the moments is read and written (a is a multiple of the 8-bit block)."""
        if part is None:
            self._init_moments(grad, state, group, prefix)
        a, b = part if part is not None else (0, grad.numel())
        names = [(prefix + n, signed) for n, signed in zip(_MOMENTS, (True, False))]
        eightbit = names[0][0] + "_q" in state
        if eightbit:
            blocks = slice(a // BLOCK, -(-b // BLOCK))
            m, v = (
                dequantize(state[n + "_q"].view(-1)[a:b], state[n + "_absmax"][blocks], s)
                for n, s in names
            )
        else:
            m, v = (state[n].view(-1)[a:b] for n, _ in names)
        g = grad.reshape(-1)
        b1, b2 = group["betas"]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        if eightbit:
            for (n, signed), t in zip(names, (m, v)):
                q, absmax = quantize(t, signed)
                state[n + "_q"].view(-1)[a:b] = q.view(-1)
                state[n + "_absmax"][blocks] = absmax
        t = float(state["step"])  # already advanced for this step
        step_size = group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
        return (m / v.sqrt().add_(group["eps"])).view(grad.shape), step_size

    def _plain_update(
        self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> None:
        """AdamW on a tensor without a projection; large ones (embeddings) a slice at a time, so
        the temporaries (dequantised moments, sqrt, direction) stay small."""
        state["step"] += 1
        if p.numel() <= SLICE:
            self._apply(p, *self._adam(grad.float(), state, group), group)
            return
        self._init_moments(grad, state, group, "")
        flat_p, flat_g = p.view(-1), grad.reshape(-1)
        for a in range(0, p.numel(), SLICE):
            b = min(a + SLICE, p.numel())
            direction, step_size = self._adam(flat_g[a:b].float(), state, group, part=(a, b))
            self._apply(flat_p[a:b], direction, step_size, group)

    def _apply(
        self, p: torch.Tensor, update: torch.Tensor, step_size: float, group: dict[str, Any]
    ) -> None:
        p.add_(update.to(p.dtype), alpha=-step_size)
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    def _step_param(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
        if group["rank"] is not None and p.ndim == 2:
            self._low_rank_update(p, grad, state, group)
        else:
            self._plain_update(p, grad, state, group)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, p.grad, group)
        if self.steps_in_backward:
            self._prev_norm = math.sqrt(self._sq) if math.isfinite(self._sq) else self._prev_norm
            self._sq = 0.0
        return loss

    # -- layer-wise mode -----------------------------------------------------------------------

    def _register(self, p: torch.Tensor) -> Any:
        """Hook a tensor, also one frozen now (a layer-sampling method unfreezes it later: torch
        only hooks tensors that require grad, and the hook survives the flag being reset)."""
        frozen = not p.requires_grad
        p.requires_grad_(True)
        try:
            return p.register_post_accumulate_grad_hook(self._hook)
        finally:
            if frozen:
                p.requires_grad_(False)

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        if self.accumulating or p.grad is None:
            return
        grad = p.grad
        sq = float(grad.float().pow(2).sum())
        self._sq += sq
        if not math.isfinite(sq):
            p.grad = None  # skipped: the loop stops on the non-finite norm
            return
        if self.max_grad_norm > 0:
            if self._prev_norm is not None:
                coef = self.max_grad_norm / (self._prev_norm + 1e-6)
            else:
                share = self.max_grad_norm * math.sqrt(p.numel() / self._total)
                coef = share / (math.sqrt(sq) + 1e-6)
            if coef < 1:
                grad = grad * coef
        self._step_param(p, grad, self.param_groups[self._group_of[p]])
        p.grad = None

    def grad_norm(self) -> float:
        """Layer-wise mode: the global gradient norm (before clipping) of the last backward."""
        return math.sqrt(self._sq)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self.steps_in_backward:
            self._sq = 0.0

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self.steps_in_backward:
            prev = self._prev_norm if self._prev_norm is not None else float("nan")
            sd["layerwise_prev_norm"] = torch.tensor(prev, dtype=torch.float64)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        prev = state_dict.pop("layerwise_prev_norm", None)
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        # torch casts every floating state tensor to its parameter's dtype: undo that.
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, entry in saved.items():
            state = self.state[params[int(pid)]]
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and state[key].dtype != value.dtype:
                    state[key] = value.to(state[key].device, copy=True)
        if prev is not None:
            value = float(prev)
            self._prev_norm = None if math.isnan(value) else value

    def state_bytes(self) -> int:
        """Bytes held in optimizer state (moments, bases, histories)."""
        return optimizer_state_bytes(self)


# --- parameter groups --------------------------------------------------------------------------


def galore_param_groups(
    model: nn.Module,
    rank: int,
    update_gap: int = 200,
    scale: float = 0.25,
    weight_decay: float = 0.0,
    target_modules: Iterable[str] = (),
    params: Iterable[nn.Parameter] | None = None,
) -> list[dict[str, Any]]:
    """Groups for a GaLore optimizer: the weights of ``nn.Linear`` modules (all but the output
    head, or those whose name contains one of ``target_modules``) get the rank; embeddings, the
    head, norms and biases get plain AdamW. ``params`` restricts the groups to those tensors
    (default: every parameter that requires grad now)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    excluded = {id(m.weight) for m in (head, inputs) if m is not None}
    targets = tuple(target_modules)
    low = {
        id(m.weight)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and id(m.weight) not in excluded
        and (not targets or any(t in name for t in targets))
    }
    # Given tensors are taken as they are: a layer-sampling params method hands over tensors
    # that are frozen now and train later.
    pool = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    names = {id(p): n for n, p in model.named_parameters()}

    def kind(p: torch.Tensor) -> int:  # 0: low rank, 1: AdamW with decay, 2: AdamW without
        if id(p) in low:
            return 0
        return 1 if p.ndim >= 2 and "norm" not in names.get(id(p), "").lower() else 2

    groups = [
        {"params": [p for p in pool if kind(p) == 0], "rank": rank},
        {"params": [p for p in pool if kind(p) == 1], "rank": None},
        {"params": [p for p in pool if kind(p) == 2], "rank": None, "weight_decay": 0.0},
    ]
    groups[0].update(update_gap=update_gap, scale=scale, weight_decay=weight_decay)
    groups[1]["weight_decay"] = weight_decay
    return [g for g in groups if g["params"]]


# --- the registered method ---------------------------------------------------------------------


@register("optimizer", "galore")
class GaLore(OptimizerMethod):
    """GaLore (Zhao et al. 2024, https://arxiv.org/abs/2403.03507): Adam moments in a low-rank projection of each weight gradient; layer-wise and 8-bit modes."""

    optimizer_class: type[GaLoreAdamW] = GaLoreAdamW

    @dataclass
    class Config(OptimizerMethod.Config):
        rank: int = 8
        """Rank r of the gradient projection (the authors use 4-8 for fine-tuning, 128-1024 for pre-training)."""
        update_gap: int = 200
        """T: steps between recomputations of a matrix's projection basis (SVD of its gradient)."""
        basis: Literal["svd", "randomized"] = "svd"
        """How a basis is recomputed: the gradient's exact SVD, or randomized subspace iteration warm-started from the previous basis (a few products with the gradient instead of an SVD: no first-step wall at 7B)."""
        power_iters: int = 2
        """randomized: subspace iterations per refresh (each two products with the gradient)."""
        scale: float = 0.25
        """alpha: the projected-back update is multiplied by it."""
        betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
        """Moment decay rates (beta1, beta2)."""
        eps: float = 1e-6
        """Added to sqrt of the second moment."""
        state_bits: Literal[8, 32] = 32
        """Optimizer-state precision: 8 keeps both moments blockwise-quantised (bitsandbytes' dynamic maps)."""
        layerwise: bool = False
        """Update each parameter inside backward and free its gradient at once (single process; clipping uses the previous step's global norm)."""
        target_modules: list[str] = field(default_factory=list)
        """Linear modules projected (name substrings); empty: every linear but the output head. Other parameters use AdamW."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.rank < 1:
                raise ValueError(f"rank must be >= 1, got {self.rank}")
            if self.update_gap < 1:
                raise ValueError(f"update_gap must be >= 1, got {self.update_gap}")
            if self.power_iters < 0:
                raise ValueError(f"power_iters must be >= 0, got {self.power_iters}")
            check_betas(self.betas)
            if self.scale <= 0:
                raise ValueError(f"scale must be > 0, got {self.scale}")
            if self.eps <= 0:
                raise ValueError(f"eps must be > 0, got {self.eps}")

    def memory(self, plan: Any) -> None:
        """Per projected matrix (m x n, every block linear unless ``target_modules``): an fp32
        basis on the smaller side (r x n or m x r) and two moments of the projected shape
        (m x r or r x n; 8-bit: uint8 codes + an fp32 absmax per 256); other trainable tensors
        take AdamW moments. Step temporaries: the SVD of one gradient and its projected-back
        update (~3 fp32 copies of the largest matrix). Layer-wise: gradients exist one tensor
        at a time and the update runs inside backward."""
        c = self.cfg
        state = basis = 0.0

        def moments(numel: int) -> float:
            if c.state_bits == 8 and numel >= MIN_8BIT:
                return 2 * (numel + 4 * -(-numel // BLOCK))
            return 2 * numel * 4.0

        projected = [
            s
            for s in plan.trainable
            if len(s.shape) == 2
            and (s.kind == "linear" or ".lora_" in s.name)
            and (not c.target_modules or any(t in s.name for t in c.target_modules))
        ]
        names = {s.name for s in projected}
        for s in projected:
            m, n = s.shape
            r = min(c.rank, m, n)
            basis += (r * n if right_side((m, n)) else m * r) * 4.0
            k = m * r if right_side((m, n)) else r * n
            state += moments(k) + self.matrix_state(s, k)
        plain = [s for s in plan.trainable if s.name not in names]
        state += sum(moments(s.numel) for s in plain)
        plan.add(
            "optimizer state",
            state + basis,
            "always",
            f"rank-{c.rank} moments and bases{' (8-bit)' if c.state_bits == 8 else ''}",
        )
        temp = 3 * max((s.numel for s in projected), default=0) * 4.0
        temp = max(temp, 2 * max((s.nbytes for s in plain), default=0.0))
        if c.layerwise and plan.work.grad_accum == 1:  # accumulation keeps every gradient
            plan.grads = "per-tensor"
            plan.add("temporaries", temp, "backward", "one matrix's update inside backward")
        else:
            plan.add("temporaries", temp, "step", "SVD and projected-back update of one matrix")

    def matrix_state(self, spec: Any, k: int) -> float:
        """Bytes a variant keeps per projected matrix beyond GaLore's (k = projected size)."""
        return 0.0

    def extra_defaults(self) -> dict[str, Any]:
        """Optimizer keyword arguments a subclass method adds."""
        return {}

    def sharding_refusal(self) -> str | None:
        return (
            "projects each gradient matrix on a basis taken from the whole matrix (its SVD), "
            "and FSDP gives each process a slice of it"
        )

    def check(self, train: Any, world: int) -> None:
        if not self.cfg.layerwise:
            return
        if world > 1:
            raise SlimtuneError(
                f"optimizer: {self.name}: layerwise updates run in a single process only "
                f"(this run has {world}); set optimizer.layerwise=false"
            )
        if train.mixed_precision == "fp16":
            raise SlimtuneError(
                f"optimizer: {self.name}: layerwise updates cannot be combined with "
                "train.mixed_precision=fp16 (its loss scaling unscales gradients at step(), after "
                "they were applied); use bf16 or no"
            )

    def step(self, ctx: StepContext) -> StepResult:
        """Layer-wise: each parameter is clipped and updated by its gradient hook inside the
        last micro-batch's backward (earlier ones only accumulate); ``step()`` then finishes
        the bookkeeping. A non-finite gradient is skipped by the hook and shows in the norm,
        so the guard stops the run with the finite part applied (the checkpoint stays good)."""
        if not self.cfg.layerwise:
            return super().step(ctx)
        opt = ctx.raw
        opt.max_grad_norm = ctx.max_grad_norm
        loss = backprop(ctx, before=lambda i, last: setattr(opt, "accumulating", not last))
        grad_norm = opt.grad_norm()
        ctx.guard(loss, grad_norm)
        ctx.optimizer.step()
        return StepResult(loss, grad_norm)

    def build(self, groups: list[dict[str, Any]], model: nn.Module) -> torch.optim.Optimizer:
        c = self.cfg
        params = [p for g in groups for p in g["params"]]
        split = galore_param_groups(
            model, c.rank, c.update_gap, c.scale, c.weight_decay, c.target_modules, params
        )
        # Keep the params method's weight-decay choice for what stays on AdamW.
        wd = {id(p): g.get("weight_decay", c.weight_decay) for g in groups for p in g["params"]}
        out = [split[0]] if split and split[0]["rank"] is not None else []
        plain = [p for g in split if g["rank"] is None for p in g["params"]]
        for decay in sorted({wd[id(p)] for p in plain}, reverse=True):
            out.append({"params": [p for p in plain if wd[id(p)] == decay], "weight_decay": decay})
        return self.optimizer_class(
            out,
            lr=c.lr,
            betas=tuple(c.betas),
            eps=c.eps,
            weight_decay=c.weight_decay,
            update_gap=c.update_gap,
            scale=c.scale,
            state_bits=c.state_bits,
            layerwise=c.layerwise,
            basis=c.basis,
            power_iters=c.power_iters,
            **self.extra_defaults(),
        )
