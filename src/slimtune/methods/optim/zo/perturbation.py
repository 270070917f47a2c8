"""Forwards at ``W + s z`` without moving the weights.

Instead of MeZO's in-place +eps, -2eps, +eps (which does not restore the weights exactly in
floating point), every module that owns a perturbed parameter gets a forward wrapper that builds
``W + s z`` (in fp32, cast once to the weight's dtype) for the duration of its own call. The
+eps and -eps losses come from one forward of the batch stacked twice: each wrapper runs the
first half with ``W + eps z`` and the second with ``W - eps z``, from one generation of its z.
So the weights are bitwise what they were before the step, in fp32 and in bf16, and z is
generated twice per step (estimate and update) instead of four times. Transient memory is one
module's weight, except the embedding (only the looked-up rows are perturbed) and a tied or
trainable output head (processed in vocabulary blocks by the forward, see ``forward.py``).

Forward gradients use the same wrappers with dual tensors (``torch.autograd.forward_ad``, the
engine behind ``torch.func.jvp``), so the tangent z also exists one module at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from ....errors import SlimtuneError
from .noise import Noise, PerturbedTensor


@dataclass
class Pass:
    """What the wrappers do during one forward: the noise key, and per stacked copy of the
    batch the scale s of ``W + s z`` (or the tangent for a dual pass)."""

    key: tuple[int, int]
    scales: list[float]
    dual: bool = False
    active: dict[int, PerturbedTensor] = field(default_factory=dict)  # id(param) -> tensor
    segment: int | None = None  # set while a wrapper runs one copy (nested modules use it)


class Unstackable(RuntimeError):
    """A module saw a batch that is not the stacked copies (computed once per batch)."""


class Perturber:
    """Installs the per-module forward wrappers and generates z (see :class:`Noise`)."""

    def __init__(
        self,
        model: nn.Module,
        tensors: list[PerturbedTensor],
        noise: str,
        mask_ratio: float,
        pool_bits: int = 0,
        seed: int = 0,
    ):
        self.model, self.tensors, self.mask_ratio = model, tensors, mask_ratio
        device = next((t.param.device for t in tensors), torch.device("cpu"))
        self.noise = Noise(noise, mask_ratio, pool_bits, seed, device)
        self.z, self.z_rows = self.noise.z, self.noise.z_rows
        self.by_id = {id(t.param): t for t in tensors}
        self.pass_: Pass | None = None
        self.owners: list[tuple[nn.Module, list[str]]] = []
        for module in model.modules():
            if isinstance(module, CONTAINERS):
                continue  # its parameters belong to the module that reads them (below)
            names = [n for n, p in module._parameters.items() if self._mine(p)]
            # peft's tuners (IA3, VeRA, LoHa, ...) keep their tensors in ParameterDicts and
            # read them inside the layer's own forward: that layer gets the wrapper
            for child_name, child in module._modules.items():
                if isinstance(child, CONTAINERS):
                    names += [
                        f"{child_name}.{k}" for k, p in child._parameters.items() if self._mine(p)
                    ]
            if names:
                self.owners.append((module, names))
        owned = {id(_param(m, n)) for m, names in self.owners for n in names}
        lost = [n for n, p in model.named_parameters() if self._mine(p) and id(p) not in owned]
        if lost:  # a tensor no wrapper perturbs would get a zero estimate, silently
            raise SlimtuneError(
                f"zeroth-order: no module reads {lost[0]} as its own parameter, so it cannot be "
                "perturbed; train it with a first-order optimizer"
            )
        self._installed = False

    def _mine(self, p: torch.Tensor | None) -> bool:
        return p is not None and id(p) in self.by_id

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
    def perturbed(self, spec: Pass) -> Iterator[None]:
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
        ids = {n: id(_param(module, n)) for n in names}  # resolved once, not per forward

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            spec = self.pass_
            mine = [(n, spec.active.get(ids[n])) for n in names] if spec else []
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
                raise Unstackable(
                    f"zeroth-order: {type(module).__name__} got {x.shape[0]} rows, not a multiple "
                    f"of the {k} stacked copies of the batch"
                )
            return self._run(module, mine, forward, args, kwargs, spec, list(range(k)), x.shape[0])

        return wrapped

    def _run(self, module, mine, forward, args, kwargs, spec: Pass, segments, n) -> Any:
        if isinstance(module, nn.Embedding) and len(mine) == 1 and mine[0][0] == "weight":
            # Only the looked-up rows are perturbed: the module's own forward (a subclass may
            # post-process the lookup, as Gemma's scaled embedding does) runs with a weight
            # whose F.embedding answers from the perturbed-rows path.
            t = mine[0][1]

            def lookup(ids: torch.Tensor) -> torch.Tensor:
                return self._embedding(module, t, ids, spec, segments, n)

            with _swapped(module, {"weight": _LookupWeight.of(t.param.detach(), lookup)}):
                return forward(*args, **kwargs)
        zs = {name: self.z(t, spec.key, 0, t.param.numel(), t.param.detach()) for name, t in mine}
        into = _LinearInto.of(module, args, kwargs, len(segments)) if n and not spec.dual else None
        outs = []
        for j in segments:
            subst = {}
            for name, t in mine:
                w = t.param.detach()
                if spec.dual:
                    subst[name] = fwAD.make_dual(w, zs[name].to(w.dtype))
                elif spec.scales[j] != 0:
                    subst[name] = torch.add(w.float(), zs[name], alpha=spec.scales[j]).to(w.dtype)
            if into is not None:
                into.run(j, subst)
                continue
            part = (args, kwargs) if n is None else _slice(args, kwargs, n, len(segments), j)
            prev, spec.segment = spec.segment, j
            try:
                with _swapped(module, subst):
                    outs.append(forward(*part[0], **part[1]))
            finally:
                spec.segment = prev
        if into is not None:
            return into.out
        return outs[0] if len(outs) == 1 else _cat(outs)

    def _embedding(
        self, module: nn.Embedding, t: PerturbedTensor, ids, spec: Pass, segments, n
    ) -> torch.Tensor:
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


class _LinearInto:
    """A plain ``nn.Linear`` over the stacked copies, each copy's rows multiplied straight into
    its slice of one output tensor: the per-copy outputs are never concatenated (that copy of
    every linear layer's output cost about 8% of a MeZO step on CPU). Same GEMM calls on
    the same operands as ``F.linear`` of each copy (``mm``, or ``addmm`` with a bias)."""

    def __init__(self, module: nn.Linear, x: torch.Tensor, k: int):
        self.module = module
        # F.linear adds a bias inside the GEMM (addmm) for 2-D and contiguous 3-D inputs and
        # after it otherwise; the same here, so each copy's output is bitwise its own forward's
        self.fused = x.ndim == 2 or (x.ndim == 3 and x.is_contiguous())
        self.x = x.reshape(-1, x.shape[-1])
        self.out = x.new_empty((*x.shape[:-1], module.out_features))
        self.rows = self.x.shape[0] // k

    @classmethod
    def of(cls, module: nn.Module, args: tuple, kwargs: dict, k: int) -> _LinearInto | None:
        """The fast path where it computes what the module's forward would: a module whose
        forward is ``nn.Linear``'s, one input tensor of the module's dtype, no autocast, no
        autograd."""
        if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
            return None
        x = args[0] if len(args) == 1 and not kwargs else kwargs.get("input") if not args else None
        w = module.weight
        if (
            not torch.is_tensor(x)
            or x.dtype != w.dtype
            or x.ndim < 2
            or torch.is_autocast_enabled(x.device.type)
            or torch.is_grad_enabled()  # out= writes take no autograd
        ):
            return None
        return cls(module, x, k)

    def run(self, j: int, subst: dict[str, torch.Tensor]) -> None:
        m = self.module
        w = subst.get("weight", m.weight)
        b = subst.get("bias", m.bias)
        rows = slice(j * self.rows, (j + 1) * self.rows)
        out = self.out.view(-1, m.out_features)[rows]
        if b is not None and self.fused:
            torch.addmm(b, self.x[rows], w.t(), out=out)
        else:
            torch.mm(self.x[rows], w.t(), out=out)
            if b is not None:
                out.add_(b)


class _LookupWeight(torch.Tensor):
    """An embedding weight (a view, no copy) whose ``F.embedding`` lookups are answered by a
    callback; every other operation sees the plain weight. It stands in for one module's
    weight during that module's call only, so nothing global is patched."""

    _lookup: Callable[[torch.Tensor], torch.Tensor]

    @staticmethod
    def of(w: torch.Tensor, lookup: Callable[[torch.Tensor], torch.Tensor]) -> _LookupWeight:
        out = w.as_subclass(_LookupWeight)
        out._lookup = lookup
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is F.embedding:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            if isinstance(weight, _LookupWeight):
                return weight._lookup(args[0] if args else kwargs["input"])
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


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


CONTAINERS = (nn.ParameterDict, nn.ParameterList)


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module whose ``_parameters`` hold ``name`` (``ia3_l.default``: the ParameterDict)."""
    child, _, key = name.rpartition(".")
    return (module.get_submodule(child) if child else module), key


def _param(module: nn.Module, name: str) -> torch.Tensor:
    owner, key = _owner(module, name)
    return owner._parameters[key]


@contextlib.contextmanager
def _swapped(module: nn.Module, subst: dict[str, torch.Tensor]) -> Iterator[None]:
    """Make ``module.<name>`` (or ``module.<dict>[<key>]``) return the given tensors,
    bypassing Parameter checks."""
    saved = {name: _param(module, name) for name in subst}
    for name, t in subst.items():
        owner, key = _owner(module, name)
        owner._parameters[key] = t
    try:
        yield
    finally:
        for name, t in saved.items():
            owner, key = _owner(module, name)
            owner._parameters[key] = t
