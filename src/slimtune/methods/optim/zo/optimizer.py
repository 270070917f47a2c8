"""The zeroth-order optimizer: estimate the gradient from forwards, then apply an update rule."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from ....loss import _innermost, find_head
from ....memory import trim_heap
from .estimators import estimator_for
from .forward import SegmentForward
from .noise import CHUNK, PerturbedTensor
from .perturbation import Pass, Perturber
from .rules import UpdateRule

_BLOCK_NAME = ("layers", "h", "blocks", "layer")


def _block_of(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in _BLOCK_NAME and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return "(outside the blocks)"


class ZerothOrderOptimizer(torch.optim.Optimizer):
    """Gradient estimate from forward passes (see ``estimators.py``), then an update rule (see
    ``rules.py``).
    ``step(closure)``: ``closure(forward)`` runs this step's micro-batches through
    ``forward(batch) -> per-copy loss sums`` and returns them summed over micro-batches and
    processes and divided by the step's target tokens."""

    zeroth_order = True

    def __init__(
        self,
        groups: list[dict[str, Any]],
        model: nn.Module,
        cfg: Any,
        rule: type[UpdateRule],
        forward: Callable[[Any, Pass], torch.Tensor] | None = None,
    ):
        super().__init__(groups, {"lr": cfg.lr, "weight_decay": cfg.weight_decay})
        self.param_groups[0].setdefault("zo_step", 0)
        self.cfg, self.model, self.rule = cfg, model, rule(cfg)
        self.estimator = estimator_for(cfg.estimator)(cfg)
        names = {id(p): n for n, p in model.named_parameters()}
        self.tensors: list[PerturbedTensor] = []
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                self.tensors.append(PerturbedTensor(p, len(self.tensors), gi))
        self.names = [names.get(id(t.param), f"param{t.pid}") for t in self.tensors]
        sparsity = getattr(cfg, "sparsity", None)
        if sparsity is not None:
            for t in self.tensors:
                self.state[t.param]["threshold"] = _quantile_abs(t.param.detach(), 1 - sparsity)
                trim_heap()  # kthvalue's temporaries would otherwise fragment the heap for good
        self._refresh()
        self.perturber = Perturber(
            model, self.tensors, cfg.noise, cfg.mask_ratio, cfg.pool_bits, cfg.seed
        )
        # ``forward(batch, pass)``: per-copy loss sums (tests pass their own for toy models).
        self.forward = forward or SegmentForward(model, find_head(model), self.perturber, 256)
        self.step_info: dict[str, float] = {}
        self._here: float | None = None
        self._last_terms: list = []
        # A federated runner (FedKSeed) may choose each step's noise key from a shared set of
        # candidates: ``key_source(step) -> key`` (one sample, one block).
        self.key_source: Callable[[int], tuple[int, int]] | None = None

    @property
    def last_terms(self) -> list[tuple[tuple[int, int], float, dict[int, PerturbedTensor]]]:
        """The terms of the last step's estimate sum(coefficient * z_key), one per sample and
        block: (key, coefficient, active). ``key`` is the noise key (seed, counter word) of z;
        ``coefficient`` the projected gradient g (the loss's derivative along z) divided by
        ``samples``; ``active`` the perturbed tensors (id(param) -> PerturbedTensor). Empty
        before the first step; set even when a non-finite estimate skipped the update."""
        return list(self._last_terms)

    def add_terms(self, terms: list[tuple[tuple[int, int], float, dict[int, Any]]]) -> None:
        """w += sum(coefficient * z_key) over ``terms`` (shaped as :attr:`last_terms`), with no
        update rule: FedKSeed rebuilds its weights from the accumulated scalars this way."""
        self._apply(terms, add=True)

    @property
    def loss_chunk_tokens(self) -> int:
        """Target tokens per chunk of the output head (the loop sets train.loss_chunk_tokens)."""
        return self.forward.chunk

    @loss_chunk_tokens.setter
    def loss_chunk_tokens(self, value: int) -> None:
        self.forward.chunk = value

    def _refresh(self) -> None:
        for t in self.tensors:
            t.threshold = self.state[t.param].get("threshold") if t.param in self.state else None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, entry in saved.items():  # torch casts floating state to the param dtype: undo
            state = self.state[params[int(pid)]]
            for key, value in entry.items():
                if torch.is_tensor(value) and state[key].dtype != value.dtype:
                    state[key] = value.to(state[key].device, copy=True)
        self._refresh()

    # --- estimate --------------------------------------------------------------------------
    def _key(self, step: int, sample: int, block: int) -> tuple[int, int]:
        if self.key_source is not None:
            return self.key_source(step)
        return (self.cfg.seed, (step << 24) | (sample << 12) | block)

    def _losses(self, closure: Callable, spec: Pass) -> list[float]:
        ctx = self._dual() if spec.dual else contextlib.nullcontext()
        with ctx, self.perturber.perturbed(spec):
            out = closure(lambda batch: self.forward(batch, spec))
        return [float(x) for x in out]

    @contextlib.contextmanager
    def _dual(self) -> Iterator[None]:
        """A forward-AD level, with eager attention: torch's fused CPU/CUDA attention kernels
        have no forward-mode derivative."""
        inner = _innermost(self.model)
        impl = getattr(getattr(inner, "config", None), "_attn_implementation", None)
        switch = impl not in (None, "eager") and hasattr(inner, "set_attn_implementation")
        if switch:
            inner.set_attn_implementation("eager")
        try:
            with fwAD.dual_level():
                yield
        finally:
            if switch:
                inner.set_attn_implementation(impl)

    def _blocks(self) -> list[dict[int, PerturbedTensor]]:
        live = [t for t in self.tensors if t.param.requires_grad]  # LISA & co. toggle this
        if not self.cfg.blockwise:
            return [{id(t.param): t for t in live}]
        out: dict[str, dict[int, PerturbedTensor]] = {}
        for t in live:
            out.setdefault(_block_of(self.names[t.pid]), {})[id(t.param)] = t
        return list(out.values())

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> float:  # type: ignore[override]
        if closure is None:
            raise RuntimeError("zeroth-order optimizers need the loop's loss closure")
        g0 = self.param_groups[0]
        step = int(g0["zo_step"])
        was = self.model.training
        self.model.eval()  # no dropout: both sides of the difference see the same network
        try:
            loss, terms = self._estimate(closure, step)
            self._last_terms = terms
            if math.isfinite(loss) and all(math.isfinite(c) for _, c, _ in terms):
                self.rule.update(self, closure, terms, step)
        finally:
            self.model.train(was)
        g0["zo_step"] = step + 1
        return loss

    def _estimate(self, closure: Callable, step: int):
        """Loss at the current weights and the terms (key, coefficient, tensors) of the
        estimated gradient sum(coefficient * z_key)."""
        est, blocks, n = self.estimator, self._blocks(), self.cfg.samples
        terms, losses, projected = [], [], []
        self._here = None
        base = est.base(self, closure, step)
        for i in range(n):
            for bi, active in enumerate(blocks):
                key = self._key(step, i + 1, bi)
                g, center = est.probe(self, closure, key, active, base)
                terms.append((key, g / n, active))
                losses.append(center)
                projected.append(g)
        loss = base if base is not None else sum(losses) / len(losses)
        self.step_info = {"projected_grad": sum(abs(x) for x in projected) / len(projected)}
        return loss, terms

    # --- update ----------------------------------------------------------------------------
    def _apply(self, terms: list, add: bool, step: int = 0) -> None:
        """w += sum(coefficient * z_key) over ``terms`` (``add``: FedKSeed's rebuild, zo-cons's
        chosen candidate), or the update rule's step along that estimate."""
        for t in self.tensors:
            mine = [(key, coef) for key, coef, active in terms if id(t.param) in active]
            if not mine:
                continue
            group = self.param_groups[t.group]
            lr, wd = group["lr"], group["weight_decay"]
            flat = t.param.detach().view(-1)
            st = self.state[t.param]
            for s in range(0, flat.numel(), CHUNK):
                w = flat[s : s + CHUNK]
                d = self.perturber.z(t, mine[0][0], s, len(w), w).mul_(mine[0][1])
                for key, coef in mine[1:]:
                    d.add_(self.perturber.z(t, key, s, len(w), w), alpha=coef)
                if add:
                    new = w.float().add_(d)
                else:
                    bufs = {b: _buffer(st, b, t.param)[s : s + len(w)] for b in self.rule.buffers}
                    new = self.rule.chunk(w, d, bufs, lr, wd, step)
                if new.data_ptr() != w.data_ptr():  # fp32 weights were updated in place
                    w.copy_(new.to(w.dtype))


def _buffer(state: dict[str, Any], name: str, param: torch.Tensor) -> torch.Tensor:
    """A flat fp32 state buffer the size of ``param``, created on first use."""
    if name not in state:
        state[name] = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
    return state[name]


def _quantile_abs(w: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of |w| (the k-th smallest, k = round(q n)), found by bisection on the
    float bit pattern with chunked counts, so no sorted copy of a large tensor is made."""
    flat = w.detach().reshape(-1)
    n = flat.numel()
    k = min(n, max(1, round(q * n)))
    if n <= CHUNK:
        return flat.abs().float().kthvalue(k).values.to(w.dtype)

    def count(v: float) -> int:  # elements with |w| <= v
        return sum(int((flat[i : i + CHUNK].abs() <= v).sum()) for i in range(0, n, CHUNK))

    lo, hi = 0, 0x7F800000  # bit patterns of 0.0 and +inf (non-negative floats sort as ints)
    while lo < hi:  # smallest pattern whose value has at least k elements at or below it
        mid = (lo + hi) // 2
        v = float(torch.tensor(mid, dtype=torch.int32).view(torch.float32))
        if count(v) >= k:
            hi = mid
        else:
            lo = mid + 1
    return torch.tensor(lo, dtype=torch.int32).view(torch.float32).to(w.dtype)
