"""Zeroth-order optimizers: MeZO (SPSA), its ZO-Bench variants, Sparse MeZO and forward gradients.

Every method here estimates the gradient from forward passes only (no autograd graph, no
``.grad``) and updates the weights itself; the loop hands ``step`` a closure that runs the
step's micro-batches through a forward function (see the loop's zeroth-order branch).

How the estimate is computed (the part that makes the step cheap and exact):

* **Noise from a counter.** The perturbation ``z`` of every tensor is a pure function of
  (seed, step, sample, tensor, element): 16-bit words from numpy's counter-based Philox
  generator, mapped through a 65,536-entry table (Gaussian quantiles by default, so z is
  N(0, 1) quantised to 16 bits and cut at 4.2 sigma; also Rademacher or uniform). Any slice of
  any tensor's z can be generated on its own, so nothing is ever stored.
* **The weights never move during the estimate.** Instead of MeZO's in-place +eps, -2eps, +eps
  (which does not restore the weights exactly in floating point), every module that owns a
  perturbed parameter gets a forward wrapper that builds ``W + s z`` (in fp32, cast once to the
  weight's dtype) for the duration of its own call. The +eps and -eps losses come from one
  forward of the batch stacked twice: each wrapper runs the first half with ``W + eps z`` and
  the second with ``W - eps z``, from one generation of its z. So the weights are bitwise what
  they were before the step, in fp32 and in bf16, and z is generated twice per step (estimate
  and update) instead of four times. Transient memory is one module's weight, except the
  embedding (only the looked-up rows are perturbed) and a tied or trainable output head
  (processed in vocabulary blocks with an online log-sum-exp).
* **Forward gradients** use the same wrappers with dual tensors (``torch.autograd.forward_ad``,
  the engine behind ``torch.func.jvp``), so the tangent z also exists one module at a time.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from ...data import IGNORE
from ...errors import SlimtuneError
from ...loss import Head, _innermost, find_head
from ...memory import trim_heap
from ...registry import register
from ..base import OptimizerMethod, StepContext, StepResult, check_betas

CHUNK = 1 << 22  # elements of z generated at once by the update (16 MiB of fp32)
POOL_BLOCK = 1 << 16  # elements of z taken as one contiguous slice of the noise pool
HEAD_BLOCK = 4096  # vocabulary rows per block of the output head
_MASK_STREAM = 1  # Philox counter word 2: 0 noise, 1 the random gradient-sparsity mask


@cache
def _table(kind: str) -> torch.Tensor:
    """Value of z for each 16-bit word: zero mean, unit variance."""
    u = (torch.arange(65536, dtype=torch.float64) + 0.5) / 65536
    if kind == "gaussian":
        t = torch.special.ndtri(u)
    elif kind == "rademacher":
        t = torch.where(u < 0.5, -1.0, 1.0)
    elif kind == "uniform":
        t = (u * 2 - 1) * math.sqrt(3)
    else:  # validated in the config
        raise ValueError(kind)
    return (t / t.pow(2).mean().sqrt()).float()


def _words(key: tuple[int, int], stream: tuple[int, int], start: int, n: int) -> torch.Tensor:
    """16-bit words ``start .. start+n`` of Philox stream (key, stream) as int32 (0..65535)."""
    first = start // 16 * 16  # one Philox counter value yields 16 words
    counter = np.array([first // 16, stream[0], stream[1], 0], dtype=np.uint64)
    gen = np.random.Philox(key=np.array(key, dtype=np.uint64), counter=counter)
    raw = gen.random_raw((start + n - first + 3) // 4).view(np.uint16)
    return torch.from_numpy(raw[start - first : start - first + n]).to(torch.int32)


@dataclass
class _Tensor:
    """A perturbed tensor: its index in the noise streams and what masks its z."""

    param: nn.Parameter
    pid: int
    group: int  # index of its optimizer param group (lr, weight decay)
    threshold: torch.Tensor | None = None  # sparse MeZO: perturb only |w| <= threshold


@dataclass
class _Pass:
    """What the wrappers do during one forward: the noise key, and per stacked copy of the
    batch the scale s of ``W + s z`` (or the tangent for a dual pass)."""

    key: tuple[int, int]
    scales: list[float]
    dual: bool = False
    active: dict[int, _Tensor] = field(default_factory=dict)  # id(param) -> tensor
    segment: int | None = None  # set while a wrapper runs one copy (nested modules use it)


class Perturber:
    """Installs the per-module forward wrappers and generates z."""

    def __init__(
        self,
        model: nn.Module,
        tensors: list[_Tensor],
        noise: str,
        mask_ratio: float,
        pool_bits: int = 0,
        seed: int = 0,
    ):
        self.model, self.tensors, self.mask_ratio = model, tensors, mask_ratio
        self.table = _table(noise)
        self.pool: torch.Tensor | None = None
        if pool_bits:
            # 2**pool_bits draws of the noise, centred and scaled to mean 0 and variance 1
            # exactly, extended by one block so that a slice never wraps.
            size = 1 << pool_bits
            pool = self.table[_words((seed, (1 << 63) - 1), (0, 2), 0, size)].double()
            pool = ((pool - pool.mean()) / pool.std(correction=0)).float()
            self.pool = torch.cat([pool, pool[:POOL_BLOCK]])
            self.pool_mask = size - 1
            device = next((t.param.device for t in tensors), torch.device("cpu"))
            self.pool = self.pool.to(device)
        self.by_id = {id(t.param): t for t in tensors}
        self.pass_: _Pass | None = None
        self.owners: list[tuple[nn.Module, list[str]]] = []
        for module in model.modules():
            names = [
                n for n, p in module._parameters.items() if p is not None and id(p) in self.by_id
            ]
            if names:
                self.owners.append((module, names))
        self._installed = False

    # --- noise -------------------------------------------------------------------------------
    def z(
        self, t: _Tensor, key: tuple[int, int], start: int, n: int, w: torch.Tensor
    ) -> torch.Tensor:
        """fp32 z of elements ``start .. start+n`` of tensor ``t`` (flat), masked; ``w`` is the
        same slice of the weight (for the sparse-MeZO magnitude mask)."""
        z = self._pool_slices(t, key, start, n) if self.pool is not None else None
        if z is None:
            z = torch.index_select(self.table, 0, _words(key, (t.pid, 0), start, n))
        if self.mask_ratio > 0:
            keep = _words(key, (t.pid, _MASK_STREAM), start, n) >= int(self.mask_ratio * 65536)
            z.mul_(keep)
        if t.threshold is not None:
            z.mul_(w.reshape(-1).abs() <= t.threshold)
        return z.to(w.device).view(w.shape)

    def _pool_slices(self, t: _Tensor, key: tuple[int, int], start: int, n: int) -> torch.Tensor:
        """z from the pool: block b of the tensor (POOL_BLOCK elements) is the pool slice at a
        random offset o_b (two 16-bit counter words per block), so z is mean 0, variance 1 and
        uncorrelated between blocks exactly; within a block its correlation is the pool's
        autocorrelation (about 2**(-pool_bits/2))."""
        b0, b1 = start // POOL_BLOCK, (start + n - 1) // POOL_BLOCK
        w = _words(key, (t.pid, 3), 2 * b0, 2 * (b1 - b0 + 1)).view(-1, 2)
        offsets = (((w[:, 0] << 16) | w[:, 1]) & self.pool_mask).tolist()
        z = torch.empty(n, device=self.pool.device)
        for i, o in enumerate(offsets):
            lo = max(start, (b0 + i) * POOL_BLOCK)
            hi = min(start + n, (b0 + i + 1) * POOL_BLOCK)
            a = o + lo - (b0 + i) * POOL_BLOCK
            z[lo - start : hi - start].copy_(self.pool[a : a + hi - lo])
        return z

    def z_rows(self, t: _Tensor, key: tuple[int, int], rows: torch.Tensor) -> torch.Tensor:
        """z of the given rows of a 2-D tensor (runs of consecutive rows generated together)."""
        w = t.param
        width = w.shape[1]
        out = torch.empty(len(rows), width, device=w.device)
        r = rows.tolist()
        i = 0
        while i < len(r):
            j = i + 1
            while j < len(r) and r[j] == r[j - 1] + 1:
                j += 1
            out[i:j] = self.z(
                t, key, r[i] * width, (j - i) * width, w.detach()[r[i] : r[j - 1] + 1]
            )
            i = j
        return out

    # --- wrappers ----------------------------------------------------------------------------
    def install(self) -> None:
        if self._installed:
            return
        for module, names in self.owners:
            module.forward = self._wrap(module, names, module.forward)
        self._installed = True

    def remove(self) -> None:
        for module, _ in self.owners:
            module.__dict__.pop("forward", None)
        self._installed = False

    @contextlib.contextmanager
    def perturbed(self, spec: _Pass) -> Iterator[None]:
        self.install()
        self.pass_ = spec
        try:
            yield
        finally:
            # Never leave wrappers behind: a deep copy of the model (merge, export) would keep
            # closures that call the original modules.
            self.pass_ = None
            self.remove()

    def _wrap(self, module: nn.Module, names: list[str], forward: Callable) -> Callable:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            spec = self.pass_
            mine = [(n, spec.active.get(id(module._parameters[n]))) for n in names] if spec else []
            mine = [(n, t) for n, t in mine if t is not None]
            if not mine:
                return forward(*args, **kwargs)
            if spec.segment is not None:  # inside a module that already split the batch
                return self._run(module, mine, forward, args, kwargs, spec, [spec.segment], None)
            k = len(spec.scales)
            x = next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)
            if x is None or x.numel() == 0:
                return forward(*args, **kwargs)
            if k == 1:
                return self._run(module, mine, forward, args, kwargs, spec, [0], None)
            if x.shape[0] % k:
                raise _Unstackable(
                    f"zeroth-order: {type(module).__name__} got {x.shape[0]} rows, not a multiple "
                    f"of the {k} stacked copies of the batch"
                )
            return self._run(module, mine, forward, args, kwargs, spec, list(range(k)), x.shape[0])

        return wrapped

    def _run(self, module, mine, forward, args, kwargs, spec: _Pass, segments, n) -> Any:
        emb = isinstance(module, nn.Embedding) and len(mine) == 1 and mine[0][0] == "weight"
        if emb:
            t = mine[0][1]
            if type(module).forward is nn.Embedding.forward:
                ids = args[0] if args else kwargs["input"]
                return self._embedding(module, t, ids, spec, segments, n)
            # A subclass (Gemma's scaled embedding) post-processes the lookup: run its own
            # forward with the lookup of this weight answered by the perturbed-rows path.
            lookup = F.embedding

            def perturbed_lookup(ids: torch.Tensor, weight: torch.Tensor, *a: Any, **k: Any):
                if weight is module.weight:
                    return self._embedding(module, t, ids, spec, segments, n)
                return lookup(ids, weight, *a, **k)

            F.embedding = perturbed_lookup
            try:
                return forward(*args, **kwargs)
            finally:
                F.embedding = lookup
        zs = {name: self.z(t, spec.key, 0, t.param.numel(), t.param.detach()) for name, t in mine}
        outs = []
        for j in segments:
            part = (args, kwargs) if n is None else _slice(args, kwargs, n, len(segments), j)
            subst = {}
            for name, t in mine:
                w = t.param.detach()
                if spec.dual:
                    subst[name] = fwAD.make_dual(w, zs[name].to(w.dtype))
                elif spec.scales[j] != 0:
                    subst[name] = torch.add(w.float(), zs[name], alpha=spec.scales[j]).to(w.dtype)
            prev, spec.segment = spec.segment, j
            try:
                with _swapped(module, subst):
                    outs.append(forward(*part[0], **part[1]))
            finally:
                spec.segment = prev
        return outs[0] if len(outs) == 1 else _cat(outs)

    def _embedding(self, module: nn.Embedding, t: _Tensor, ids, spec: _Pass, segments, n):
        w = t.param.detach()
        rows, inverse = torch.unique(ids, return_inverse=True)
        z = self.z_rows(t, spec.key, rows)
        k = len(segments)
        size = ids.shape[0] // k if n is not None else ids.shape[0]
        outs = []
        for idx, j in enumerate(segments):
            sl = slice(idx * size, (idx + 1) * size) if n is not None else slice(None)
            base = F.embedding(ids[sl], w, module.padding_idx)
            dz = F.embedding(inverse[sl], z)
            if spec.dual:
                outs.append(fwAD.make_dual(base, dz.to(base.dtype)))
            elif spec.scales[j] != 0:
                outs.append(
                    torch.add(w.float()[ids[sl]], dz, alpha=spec.scales[j]).to(w.dtype)
                    if w.dtype != torch.float32
                    else torch.add(base, dz, alpha=spec.scales[j])
                )
            else:
                outs.append(base)
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class _Unstackable(RuntimeError):
    """A module saw a batch that is not the stacked copies (computed once per batch)."""


def _slice(args, kwargs, n: int, k: int, j: int):
    size = n // k

    def cut(a):
        return (
            a[j * size : (j + 1) * size] if torch.is_tensor(a) and a.ndim and a.shape[0] == n else a
        )

    return tuple(cut(a) for a in args), {key: cut(v) for key, v in kwargs.items()}


def _cat(outs: list[Any]) -> Any:
    first = outs[0]
    if torch.is_tensor(first):
        return torch.cat(outs)
    if isinstance(first, tuple):
        return type(first)(
            _cat([o[i] for o in outs]) if torch.is_tensor(first[i]) else first[i]
            for i in range(len(first))
        )
    raise RuntimeError(f"zeroth-order: cannot stack module outputs of type {type(first).__name__}")


@contextlib.contextmanager
def _swapped(module: nn.Module, subst: dict[str, torch.Tensor]) -> Iterator[None]:
    """Make ``module.<name>`` return the given tensors (bypassing Parameter checks)."""
    saved = {name: module._parameters[name] for name in subst}
    module._parameters.update(subst)
    try:
        yield
    finally:
        module._parameters.update(saved)


# --- the forward that returns one loss per stacked copy --------------------------------------


class SegmentForward:
    """``forward(batch, spec)``: summed next-token cross-entropy of each stacked copy of the
    batch (one per entry of ``spec.scales``), under the current perturbation; for a dual pass,
    [loss, directional derivative]."""

    def __init__(self, model: nn.Module, head: Head, perturber: Perturber, chunk: int):
        self.model, self.head, self.perturber, self.chunk = model, head, perturber, chunk
        self.stack = True  # False once the model turned out not to allow stacked copies
        inner = _innermost(model)
        self.decoder = getattr(inner, inner.base_model_prefix, None)
        m = head.module
        self.blocked = (
            type(m) is nn.Linear
            and m.bias is None
            and id(m.weight) in perturber.by_id
            and self.decoder is not None
        )

    def __call__(self, batch: dict[str, torch.Tensor], spec: _Pass) -> torch.Tensor:
        k = 1 if spec.dual else len(spec.scales)
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        targets = labels[keep]
        if self.head.module is None or self.decoder is None:  # the model's own logits
            outs = self._outputs(batch, spec, k, logits=True)
            rows = [o[:, -labels.shape[1] - 1 : -1][keep].float() for o in outs]
            out = torch.stack([F.cross_entropy(r, targets, reduction="sum") for r in rows])
            return self._finish(out, spec)
        outs = self._outputs(batch, spec, k, logits=False)
        # [:, -T:]: prompt tuning prepends its virtual tokens
        rows = [o[:, -labels.shape[1] - 1 : -1][keep] for o in outs]
        t = self.perturber.by_id.get(id(self.head.module.weight)) if self.blocked else None
        if t is not None and id(t.param) in spec.active:
            out = self._blocked(rows, targets, t, spec)
        else:
            out = torch.stack([self._chunked(r, targets, spec, j) for j, r in enumerate(rows)])
        return self._finish(out, spec)

    def _outputs(self, batch, spec: _Pass, k: int, logits: bool) -> list[torch.Tensor]:
        """Final hidden states (or logits) of each copy: one forward of the batch stacked k
        times, or, for a model that computes something once for the whole batch (peft prompt
        tuning embeds its virtual tokens once), one forward per copy."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.stack and k > 1:
            try:
                out = self._run(ids.repeat(k, 1), mask.repeat(k, 1), logits)
                return list(out.chunk(k))
            except _Unstackable:
                self.stack = False
        outs = []
        for j in range(k):
            prev, spec.segment = spec.segment, j
            try:
                outs.append(self._run(ids, mask, logits))
            finally:
                spec.segment = prev
        return outs

    def _run(self, ids: torch.Tensor, mask: torch.Tensor, logits: bool) -> torch.Tensor:
        if logits:
            return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        captured: list[torch.Tensor] = []
        hook = self.decoder.register_forward_hook(lambda m, a, o: captured.append(o[0]))
        try:
            self.model(
                input_ids=ids,
                attention_mask=mask,
                logits_to_keep=torch.empty(0, dtype=torch.long, device=ids.device),
                use_cache=False,
            )
        finally:
            hook.remove()
        return captured[-1]

    @staticmethod
    def _finish(out: torch.Tensor, spec: _Pass) -> torch.Tensor:
        if spec.dual:
            primal, tangent = fwAD.unpack_dual(out[0])
            return torch.stack(
                [primal, tangent if tangent is not None else torch.zeros_like(primal)]
            )
        return out

    def _chunked(
        self, rows: torch.Tensor, targets: torch.Tensor, spec: _Pass, j: int
    ) -> torch.Tensor:
        total = rows.new_zeros((), dtype=torch.float32)
        prev, spec.segment = spec.segment, j  # a perturbed head module uses copy j's scale
        try:
            for i in range(0, len(targets), self.chunk):
                logits = self.head.logits(rows[i : i + self.chunk])
                total = total + F.cross_entropy(
                    logits, targets[i : i + self.chunk], reduction="sum"
                )
        finally:
            spec.segment = prev
        return total

    def _blocked(self, rows: list[torch.Tensor], targets: torch.Tensor, t: _Tensor, spec: _Pass):
        """Cross-entropy through a perturbed output head, a block of vocabulary rows at a time
        (online log-sum-exp), so that no perturbed copy of the whole head exists."""
        w = t.param.detach()
        vocab, width = w.shape
        cap = self.head.softcap
        k = len(rows)
        top: list[Any] = [None] * k
        total: list[Any] = [None] * k
        picked: list[Any] = [rows[0].new_zeros(len(targets), dtype=torch.float32) for _ in rows]
        for v0 in range(0, vocab, HEAD_BLOCK):
            v1 = min(vocab, v0 + HEAD_BLOCK)
            wb = w[v0:v1]
            z = self.perturber.z(t, spec.key, v0 * width, (v1 - v0) * width, wb)
            inside = (targets >= v0) & (targets < v1)
            local = (targets - v0).clamp(0, v1 - v0 - 1)[:, None]
            for j in range(k):
                if spec.dual:
                    # a copy: the tangent of a view is allocated the size of the view's whole
                    # storage (the full head) by forward AD, once per vocabulary block
                    wj = fwAD.make_dual(wb.clone(), z.to(wb.dtype))
                elif spec.scales[j] != 0:
                    wj = torch.add(wb.float(), z, alpha=spec.scales[j]).to(wb.dtype)
                else:
                    wj = wb
                logits = (rows[j] @ wj.t()).float()
                if cap:
                    logits = torch.tanh(logits / cap) * cap
                picked[j] = picked[j] + torch.where(inside, logits.gather(1, local).squeeze(1), 0.0)
                m = logits.amax(dim=-1)
                if top[j] is None:
                    top[j], total[j] = m, (logits - m[:, None]).exp().sum(dim=-1)
                else:
                    new = torch.maximum(top[j], m)
                    total[j] = total[j] * (top[j] - new).exp() + (logits - new[:, None]).exp().sum(
                        -1
                    )
                    top[j] = new
        return torch.stack([(top[j] + total[j].log() - picked[j]).sum() for j in range(k)])


# --- the optimizer ---------------------------------------------------------------------------

_BLOCK_NAME = ("layers", "h", "blocks", "layer")


def _block_of(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in _BLOCK_NAME and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return "(outside the blocks)"


class ZerothOrderOptimizer(torch.optim.Optimizer):
    """Gradient estimate from forward passes, then an update rule (sgd, momentum, sign, adam,
    cons). ``step(closure)``: ``closure(forward)`` runs this step's micro-batches through
    ``forward(batch) -> per-copy loss sums`` and returns them summed over micro-batches and
    processes and divided by the step's target tokens."""

    zeroth_order = True

    def __init__(
        self,
        groups: list[dict[str, Any]],
        model: nn.Module,
        cfg: Any,
        rule: str,
        forward: Callable[[Any, _Pass], torch.Tensor] | None = None,
    ):
        super().__init__(groups, {"lr": cfg.lr, "weight_decay": cfg.weight_decay})
        self.param_groups[0].setdefault("zo_step", 0)
        self.cfg, self.model, self.rule = cfg, model, rule
        names = {id(p): n for n, p in model.named_parameters()}
        self.tensors: list[_Tensor] = []
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                self.tensors.append(_Tensor(p, len(self.tensors), gi))
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

    def _losses(self, closure: Callable, spec: _Pass) -> list[float]:
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

    def _blocks(self) -> list[dict[int, _Tensor]]:
        live = [t for t in self.tensors if t.param.requires_grad]  # LISA & co. toggle this
        if not self.cfg.blockwise:
            return [{id(t.param): t for t in live}]
        out: dict[str, dict[int, _Tensor]] = {}
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
                self._update(closure, terms, step)
        finally:
            self.model.train(was)
        g0["zo_step"] = step + 1
        return loss

    def _estimate(self, closure: Callable, step: int):
        """Loss at the current weights and the terms (key, coefficient, tensors) of the
        estimated gradient sum(coefficient * z_key)."""
        c, eps = self.cfg, self.cfg.eps
        blocks = self._blocks()
        n = c.samples
        terms, losses, projected = [], [], []
        base = self._here = None
        if c.estimator == "one-sided":
            base = self._losses(closure, _Pass(self._key(step, 0, 0), [0.0]))[0]
        for i in range(n):
            for bi, active in enumerate(blocks):
                key = self._key(step, i + 1, bi)
                if c.estimator == "forward-grad":
                    primal, jvp = self._losses(closure, _Pass(key, [1.0], dual=True, active=active))
                    g, center = jvp, primal
                elif c.estimator == "one-sided":
                    plus = self._losses(closure, _Pass(key, [eps], active=active))[0]
                    g, center = (plus - base) / eps, base
                else:
                    scales = [eps, -eps, 0.0] if self.rule == "cons" else [eps, -eps]
                    out = self._losses(closure, _Pass(key, scales, active=active))
                    g, center = (out[0] - out[1]) / (2 * eps), (out[0] + out[1]) / 2
                    if self.rule == "cons":
                        self._here = out[2]
                terms.append((key, g / n, active))
                losses.append(center)
                projected.append(g)
        loss = base if base is not None else sum(losses) / len(losses)
        self.step_info = {"projected_grad": sum(abs(x) for x in projected) / len(projected)}
        return loss, terms

    # --- update ----------------------------------------------------------------------------
    def _update(self, closure: Callable, terms: list, step: int) -> None:
        if self.rule == "cons":
            # Keep the best of theta, theta - lr g z, theta + lr g z (one sample, one block).
            (key, g, active), lr = terms[0], self.param_groups[0]["lr"]
            here = self._here
            cand = self._losses(closure, _Pass(key, [-lr * g, lr * g], active=active))
            options = [
                (here if here is not None else math.inf, 0.0),
                (cand[0], -lr * g),
                (cand[1], lr * g),
            ]
            best = min(options, key=lambda x: x[0])[1]
            self.step_info["cons_choice"] = [0.0, -lr * g, lr * g].index(best)
            if best:
                self._apply([(key, best, active)], add=True)
            return
        self._apply(terms, add=False, step=step)

    def _apply(self, terms: list, add: bool, step: int = 0) -> None:
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
                if add:  # zo-cons: the chosen candidate, W + s z
                    new = w.float().add_(d)
                else:
                    new = self._rule(w, d, st, t.param, s, lr, wd, step)
                if new.data_ptr() != w.data_ptr():  # fp32 weights were updated in place
                    w.copy_(new.to(w.dtype))

    def _rule(self, w, d, st, param, s: int, lr: float, wd: float, step: int) -> torch.Tensor:
        c, n = self.cfg, len(w)
        new = w.float()
        if self.rule == "adam":
            b1, b2 = c.betas
            m = _buffer(st, "exp_avg", param)[s : s + n]
            v = _buffer(st, "exp_avg_sq", param)[s : s + n]
            m.mul_(b1).add_(d, alpha=1 - b1)
            v.mul_(b2).addcmul_(d, d, value=1 - b2)
            t = step + 1
            denom = (v / (1 - b2**t)).sqrt_().add_(c.adam_eps)
            if wd:
                new.mul_(1 - lr * wd)
            return new.addcdiv_(m, denom, value=-lr / (1 - b1**t))
        if wd:
            d.add_(new, alpha=wd)
        if self.rule == "momentum":
            buf = _buffer(st, "momentum_buffer", param)[s : s + n]
            buf.mul_(c.momentum).add_(d)
            d = buf
        elif self.rule == "sign":
            d = d.sign_()
        return new.add_(d, alpha=-lr)


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


# --- registered methods ----------------------------------------------------------------------


class ZerothOrder(OptimizerMethod):
    """Base of the zeroth-order methods: the shared estimator options."""

    rule: ClassVar[str] = "sgd"
    stateless: ClassVar[bool] = True

    @dataclass
    class Config(OptimizerMethod.Config):
        lr: float = 1e-6
        """Learning rate (MeZO paper, OPT-13B: full 1e-6/1e-7, LoRA 1e-4/5e-5, prefix 1e-2/1e-3)."""
        eps: float = 1e-3
        """Perturbation scale (MeZO: 1e-3 full, 1e-2 LoRA, 1e-1 prefix)."""
        samples: int = 1
        """Perturbations per step (n-SPSA); the estimate is their mean."""
        estimator: Literal["two-point", "one-sided"] = "two-point"
        """two-point: (L(w+eps z) - L(w-eps z)) / 2eps; one-sided: (L(w+eps z) - L(w)) / eps."""
        noise: Literal["gaussian", "rademacher", "uniform"] = "gaussian"
        """Distribution of z (all zero mean, unit variance)."""
        blockwise: bool = False
        """Perturb one transformer block at a time, each with its own z and forwards."""
        mask_ratio: float = 0.0
        """Gradient sparsity: this fraction of z's entries, drawn afresh each step, is zero."""
        seed: int = 0
        """Seed of the perturbations."""
        pool_bits: int = 22
        """z is cut from a pool of 2**pool_bits noise draws (16 MiB at 22) in blocks of 65,536 at random offsets (fast); 0: every entry from the counter-based generator (exact i.i.d., several times slower on CPU)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.eps <= 0:
                raise ValueError(f"eps must be > 0, got {self.eps}")
            if self.seed < 0:
                raise ValueError(f"seed must be >= 0, got {self.seed}")
            if self.samples < 1 or self.samples >= 4096:
                raise ValueError(f"samples must be in 1..4095, got {self.samples}")
            if self.pool_bits and not 17 <= self.pool_bits <= 30:
                raise ValueError(f"pool_bits must be 0 or in 17..30, got {self.pool_bits}")
            if not 0 <= self.mask_ratio < 1:
                raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")

    def memory(self, plan: Any) -> None:
        """No graph and no gradients: forwards of the batch stacked twice (+eps and -eps, or
        primal and tangent), one module's perturbed fp32 weight at a time, z generated in
        chunks for the update, the noise pool; state per ``rule`` (momentum: one fp32 buffer
        per trainable element, adam: two; the others none)."""
        c = self.cfg
        plan.graph, plan.grads, plan.batch_factor = False, "none", 2.0
        numel = sum(s.numel for s in plan.trainable)
        per = {"momentum": 1, "adam": 2}.get(self.rule, 0)
        if per:
            plan.add("optimizer state", per * numel * 4.0, "always", f"{per} fp32 buffer(s)")
        if c.pool_bits:
            plan.add(
                "optimizer state", ((1 << c.pool_bits) + POOL_BLOCK) * 4.0, "always", "noise pool"
            )
        mats = [s for s in plan.trainable if s.kind not in ("embedding", "head")]
        biggest = max((s.numel for s in mats), default=0)
        temp = biggest * (8.0 + plan.work.param_bytes)  # W + s z (fp32), z, the cast
        temp = max(temp, CHUNK * 6.0)  # the update's z chunk and its 16-bit words
        if self.sparse:  # per-tensor |w| quantile: an fp32 |w| and kthvalue's work (<= CHUNK)
            temp = max(temp, min(max(s.numel for s in plan.trainable), CHUNK) * 12.0)
        plan.add("temporaries", temp, "forward", "one module's perturbed weight / z chunk")
        if c.estimator == "forward-grad":  # attention falls back to the math path under
            w = plan.work  # forward AD: scores, masked scores, softmax, each with a tangent
            att = 6 * w.batch * plan.shape.heads * w.seq * w.seq * 4.0
            plan.add("activations", att, "forward", "attention matrices of one block (dual)")
            if not plan.head_trains():  # a frozen head's chunk of logits carries a tangent
                chunk = min(w.loss_chunk or w.tokens, w.tokens)
                plan.add("loss buffer", 2 * chunk * plan.shape.vocab * 4.0, "forward", "tangents")

    sparse: ClassVar[bool] = False

    def build(self, groups: list[dict[str, Any]], model: nn.Module) -> torch.optim.Optimizer:
        return ZerothOrderOptimizer(groups, model, self.cfg, self.rule)

    def check(self, train: Any, world: int) -> None:
        if train.mixed_precision == "fp16":
            raise SlimtuneError(
                f"optimizer: {self.name}: zeroth-order steps take no fp16 loss scaling; use "
                "train.mixed_precision=bf16 or no"
            )

    def step(self, ctx: StepContext) -> StepResult:
        """Forward passes only (no graph): the optimizer perturbs, estimates and updates in one
        call. ``losses(forward)`` runs each micro-batch through ``forward(batch)`` (a tensor of
        loss sums, one per perturbation) and returns their sum over micro-batches and processes
        divided by the step's target tokens."""
        opt = ctx.raw
        opt.loss_chunk_tokens = ctx.loss_chunk_tokens

        def losses(forward: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> torch.Tensor:
            total = sum(forward(ctx.on_device(b)) for b in ctx.micro)
            return ctx.accelerator.reduce(total, "sum") / max(ctx.n_targets, 1)

        with torch.no_grad(), ctx.accelerator.autocast():
            loss = float(opt.step(losses))
        ctx.guard(loss, None)  # an estimator with a non-finite loss has skipped its update
        return StepResult(loss, None, dict(opt.step_info))


@register("optimizer", "mezo")
class MeZO(ZerothOrder):
    """MeZO (Malladi et al., https://arxiv.org/abs/2305.17333): SPSA from forward passes, w -= lr (g z + wd w); memory of inference."""


@register("optimizer", "zo-sgd-momentum")
class ZOMomentum(ZerothOrder):
    """ZO-SGD with momentum (ZO-Bench, Zhang et al. 2024): one fp32 buffer per parameter."""

    rule = "momentum"
    stateless = False

    @dataclass
    class Config(ZerothOrder.Config):
        momentum: float = 0.9
        """Momentum factor."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if not 0 <= self.momentum < 1:
                raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")


@register("optimizer", "zo-sign")
class ZOSign(ZerothOrder):
    """ZO-SignSGD (ZO-Bench): w -= lr sign(g z)."""

    rule = "sign"


@register("optimizer", "zo-cons")
class ZOCons(ZerothOrder):
    """ZO-SGD-Cons (ZO-Bench): keep the best of w, w - lr g z and w + lr g z (two more forwards)."""

    rule = "cons"

    @dataclass
    class Config(ZerothOrder.Config):
        def __post_init__(self) -> None:
            super().__post_init__()
            if self.samples != 1 or self.blockwise or self.estimator != "two-point":
                raise ValueError("zo-cons needs samples=1, blockwise=false, estimator=two-point")
            if self.weight_decay:
                raise ValueError("zo-cons takes no weight_decay (its candidates are w +- lr g z)")


@register("optimizer", "zo-adam")
class ZOAdam(ZerothOrder):
    """ZO-Adam (ZO-Bench): Adam moments of g z; two fp32 buffers per parameter (no memory edge)."""

    rule = "adam"
    stateless = False

    @dataclass
    class Config(ZerothOrder.Config):
        betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
        """Moment decay rates."""
        adam_eps: float = 1e-8
        """Adam denominator epsilon."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check_betas(self.betas)
            if self.adam_eps <= 0:
                raise ValueError(f"adam_eps must be > 0, got {self.adam_eps}")


@register("optimizer", "forward-grad")
class ForwardGrad(ZerothOrder):
    """Forward gradient (Baydin et al. 2022): the exact directional derivative g = grad . z by forward-mode AD (jvp), w -= lr g z."""

    @dataclass
    class Config(ZerothOrder.Config):
        estimator: Literal["forward-grad"] = "forward-grad"  # type: ignore[assignment]
        """Fixed: the jvp replaces the finite difference (eps is unused)."""


@register("optimizer", "sparse-mezo")
class SparseMeZO(ZerothOrder):
    """Sparse MeZO (Liu et al. 2024): perturb and update only weights with |w| at or below a per-tensor quantile; stores thresholds, not masks."""

    sparse = True

    @dataclass
    class Config(ZerothOrder.Config):
        sparsity: float = 0.75
        """Fraction of each tensor (the largest |w|) left out; the rest is perturbed and updated."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if not 0 < self.sparsity < 1:
                raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity}")
