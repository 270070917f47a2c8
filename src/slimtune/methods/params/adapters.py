"""Adapter variants that no library implements, on one machinery: each wraps chosen modules of
the frozen model (a linear, an MLP) in a small module of its own, trains only that module's
tensors, saves them (``adapter.safetensors``) with its settings (``slimtune_adapter.json``),
rebuilds them on a freshly loaded base, and folds them into the weights where the maths allows.

Methods here: ``ssf`` (scale and shift), ``nola`` (LoRA factors as mixtures of seeded random
bases), ``loldu`` (LDU decomposition, only the diagonal trains), ``series-adapter`` and
``parallel-adapter`` (the bottleneck adapters of LLM-Adapters), ``nlora`` (a middle matrix,
Nystrom init; SLoRA, IntTune), ``lofit`` (head selection, then per-head offsets) and ``mam``
(peft's prefix tuning plus a parallel MLP adapter). The planner prices each by building it on
the meta device (``WrapperMethod.memory``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from ...errors import SlimtuneError
from ...registry import register
from ..base import ParamsMethod, PrepareContext, _untie
from ..shared import seeded_generator

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "slimtune_adapter.json"
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Wrapper(nn.Module):
    """A frozen module (``base``) and the adapter's own trainable tensors around it."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def merged(self) -> nn.Module:
        """The base with the adapter folded in (where the maths allows)."""
        raise NotImplementedError


class WrapperMethod(ParamsMethod):
    """Shared by the adapters in this module: wrap the targeted modules, train the wrappers'
    parameters, save and rebuild them."""

    frozen_base = True

    @dataclass
    class Config:
        target_modules: list[str] = field(default_factory=list)
        """Modules to adapt, by the last part of their name (e.g. [q_proj, v_proj]); empty: the method's default."""

    default_targets: ClassVar[tuple[str, ...]] = ("q_proj", "v_proj")

    def adapters_off_is_base(self) -> bool:
        return False  # no peft disable switch: a reference policy is precomputed or copied

    # --- what each method defines -------------------------------------------------------
    def wrap(self, name: str, module: nn.Module, index: int, seed: int) -> Wrapper:
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------
    def target_names(self) -> list[str]:
        return list(self.cfg.target_modules or self.default_targets)

    def targets(self, model: nn.Module) -> dict[str, nn.Module]:
        want = set(self.target_names())
        found = {
            n: m
            for n, m in model.named_modules()
            if n.rpartition(".")[2] in want and ".layers." in f".{n}" and not isinstance(m, Wrapper)
        }
        if not found:
            raise SlimtuneError(
                f"config: params.target_modules: no module of the model is named one of "
                f"{sorted(want)}"
            )
        return found

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        self.seed = ctx.seed  # saved: seeded tensors (NOLA's bases) are rebuilt from it
        model.requires_grad_(False)
        for i, (name, module) in enumerate(sorted(self.targets(model).items())):
            model.set_submodule(name, self.wrap(name, module, i, ctx.seed))
        return model

    @staticmethod
    def wrapped(model: nn.Module) -> dict[str, Wrapper]:
        return {n: m for n, m in model.named_modules() if isinstance(m, Wrapper)}

    def save(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
        state = {n: t.contiguous().cpu() for n, t in self.artefact_state(model).items()}
        save_file(_untie(state), str(out_dir / ADAPTER_FILE))
        info = {
            "method": self.name,
            "config": {
                f.name: getattr(self.cfg, f.name) for f in dataclasses.fields(self.cfg) if f.init
            },
            "seed": getattr(self, "seed", 0),
            "modules": sorted(self.wrapped(model)),
            **self.artefact_info(model),
        }
        (out_dir / CONFIG_FILE).write_text(json.dumps(info, indent=1) + "\n")
        tokenizer.save_pretrained(out_dir)

    def artefact_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors the final artefact holds (by default the trainable state)."""
        return self.trainable_state(model)

    def artefact_info(self, model: nn.Module) -> dict[str, Any]:
        """Entries of the method's own in ``slimtune_adapter.json`` (none by default)."""
        return {}

    def load_artefact(self, model: nn.Module, run_dir: Path, info: dict[str, Any]) -> None:
        """Put ``artefact_state``'s tensors back into freshly wrapped modules."""
        self.load_trainable(model, run_dir / ADAPTER_FILE)

    @classmethod
    def load(cls, base: nn.Module, run_dir: Path) -> nn.Module:
        from ...config import build

        info = json.loads((run_dir / CONFIG_FILE).read_text())
        method = cls(build(cls.Config, info["config"], "params"))
        # extras["artefact"]: the wrappers are rebuilt to receive saved tensors (an init
        # computed from W, such as an SVD, would be overwritten: it may be skipped)
        ctx = PrepareContext(None, run_dir, info["seed"], extras={"artefact": True})
        model = method.prepare(base, ctx)
        if sorted(method.wrapped(model)) != info["modules"]:
            raise SlimtuneError(f"params: {cls.name}: the base's modules differ from {run_dir}'s")
        method.load_artefact(model, run_dir, info)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        if not self.mergeable:
            raise SlimtuneError(
                f"params: {self.name}: its non-linear bottleneck cannot be folded into the "
                "weights; load the run directory with slimtune (eval, the Python API) instead"
            )
        for name, wrapper in self.wrapped(model).items():
            model.set_submodule(name, wrapper.merged())
        return model

    def memory(self, plan: Any) -> None:
        """Counted on the meta device: the method wraps the architecture's modules there, which
        gives its trainable tensors and its buffers exactly; one meta forward of each wrapper
        gives what autograd keeps per token (see ``shared.kept_per_token``)."""
        from ...plan.planner import Adapter, Spec
        from ..shared import kept_per_token, layer_of, meta_model

        plan.freeze_all()
        model = meta_model(plan.shape)
        self.prepare(model, PrepareContext(None, Path("unused"), 0))
        for name, p in model.named_parameters():
            if p.requires_grad:
                module = name.split(".")[-3] if name.count(".") >= 2 else name
                plan.add_new(Spec(name, tuple(p.shape), "adapter", layer_of(name), module, 4.0))
        buffers = {id(b): b for w in self.wrapped(model).values() for b in w.buffers()}
        own = sum(b.numel() * b.element_size() for b in buffers.values())
        own -= sum(  # the base modules' own buffers are the base's
            b.numel() * b.element_size()
            for w in self.wrapped(model).values()
            for b in w.base.buffers()
        )
        if own:
            plan.add("weights", own, "resident", f"{self.name}: frozen tensors of the adapter")
        fixed: dict[int, float] = {}
        for name, wrapper in self.wrapped(model).items():
            # a wrapped sublayer's own activations are the block's (the planner prices
            # them): only the adapter beside it is measured, on the sublayer's input
            beside = (
                getattr(wrapper, "adapter", None) if isinstance(wrapper, ParallelAdapter) else None
            )
            if beside is not None:
                keeps_input, per_token, kept = kept_per_token(beside, wrapper.in_features)
            else:
                keeps_input, per_token, kept = kept_per_token(wrapper)
            fixed.update(kept)
            plan.adapters.append(
                Adapter(layer_of(name), name.rpartition(".")[2], keeps_input, per_token)
            )
        if fixed:
            plan.add(
                "activations",
                sum(fixed.values()) * plan.work.act_bytes / 4,
                "backward",
                "tensors the adapter builds from its weights, kept for backward",
            )


def linear_with_bias(w: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    """A plain linear layer holding weight ``w`` and bias ``b`` (a folded wrapper), in ``dtype``."""
    out = nn.Linear(w.shape[1], w.shape[0], bias=True, device=w.device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        out.bias.copy_(b)
    return out


def _out_in(module: nn.Module) -> tuple[int, int]:
    return module.out_features, module.in_features


# ---------------------------------------------------------------------------------------------
# SSF
# ---------------------------------------------------------------------------------------------


class ScaleShift(Wrapper):
    def __init__(self, base: nn.Linear):
        super().__init__(base)
        out = base.out_features
        self.scale = nn.Parameter(torch.ones(out, dtype=torch.float32, device=base.weight.device))
        self.shift = nn.Parameter(torch.zeros(out, dtype=torch.float32, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return (y * self.scale + self.shift).to(y.dtype)

    def merged(self) -> nn.Linear:
        base = self.base
        with torch.no_grad():
            w = base.weight.float() * self.scale[:, None]
            b = (
                self.shift.clone()
                if base.bias is None
                else base.bias.float() * self.scale + self.shift
            )
        return linear_with_bias(w, b, base.weight.dtype)


@register("params", "ssf")
class SSF(WrapperMethod):
    """SSF (Lian et al., https://arxiv.org/abs/2210.08823): a learned per-channel scale and shift after each chosen linear's output; folds into that linear's weight and bias."""

    default_targets = BLOCK_LINEARS

    def wrap(self, name: str, module: nn.Module, index: int, seed: int) -> Wrapper:
        return ScaleShift(module)

    def merge(self, model: nn.Module) -> nn.Module:
        """W' = diag(scale) W, b' = scale * b + shift (see :func:`merge_with_biases`)."""
        return merge_with_biases(self, model)


def merge_with_biases(method: WrapperMethod, model: nn.Module) -> nn.Module:
    """Fold wrappers whose merged linears gain a bias (SSF's shift, LoFiT's offsets). Llama's
    config can say so (attention_bias, mlp_bias) and the other linears of that kind then get
    zero biases, so the saved checkpoint loads as it computes; an architecture whose config
    cannot hold those biases is refused in one line."""
    cfg = model.config
    kinds = {name.rpartition(".")[2] for name in method.wrapped(model)}
    need = {"attention_bias"} if kinds & {"q_proj", "k_proj", "v_proj", "o_proj"} else set()
    if kinds & {"gate_proj", "up_proj", "down_proj"}:
        need.add("mlp_bias")
    if any(not hasattr(cfg, flag) for flag in need):
        raise SlimtuneError(
            f"params: {method.name}: cannot be folded: {cfg.model_type}'s config has no "
            f"{' / '.join(sorted(need))} switch for the biases it would need; load the run "
            "directory with slimtune instead"
        )
    model = WrapperMethod.merge(method, model)
    groups = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
              "mlp_bias": ("gate_proj", "up_proj", "down_proj")}  # fmt: skip
    for flag in need:
        setattr(cfg, flag, True)
        for name, module in model.named_modules():
            if name.rpartition(".")[2] in groups[flag] and module.bias is None:
                module.bias = nn.Parameter(
                    torch.zeros(
                        module.out_features,
                        dtype=module.weight.dtype,
                        device=module.weight.device,
                    )
                )
    return model


# ---------------------------------------------------------------------------------------------
# NOLA
# ---------------------------------------------------------------------------------------------


class Nola(Wrapper):
    """W x + scale * B (A x) with A = sum_i alpha_i A_i and B = sum_j beta_j B_j; the bases are
    frozen random buffers (regenerated from the seed, never saved); beta starts at 0."""

    def __init__(
        self,
        base: nn.Linear,
        a_bases: torch.Tensor,
        b_bases: torch.Tensor,
        scale: float,
        gen: torch.Generator,
    ):
        super().__init__(base)
        self.register_buffer("a_bases", a_bases, persistent=False)  # (k, r, in)
        self.register_buffer("b_bases", b_bases, persistent=False)  # (l, out, r)
        k, n_b = a_bases.shape[0], b_bases.shape[0]
        device = base.weight.device
        alpha = (
            torch.randn(k, generator=gen) / math.sqrt(k)
            if device.type != "meta"
            else torch.empty(k)
        )
        self.alpha = nn.Parameter(alpha.to(device))
        self.beta = nn.Parameter(torch.zeros(n_b, device=device))
        self.scale = scale

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.einsum("k,kri->ri", self.alpha, self.a_bases)
        b = torch.einsum("l,lor->or", self.beta, self.b_bases)
        return a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a, b = self.factors()
        return y + (F.linear(F.linear(x.to(a.dtype), a), b) * self.scale).to(y.dtype)

    def merged(self) -> nn.Linear:
        a, b = self.factors()
        with torch.no_grad():
            w = self.base.weight.float() + self.scale * (b @ a)
            self.base.weight.copy_(w.to(self.base.weight.dtype))
        return self.base


@register("params", "nola")
class NOLA(WrapperMethod):
    """NOLA (Koohpayegani et al., https://arxiv.org/abs/2310.02556): LoRA's A and B as learned mixtures of frozen random basis matrices regenerated from a seed; only the k + l mixture coefficients per layer train and are saved."""

    @dataclass
    class Config(WrapperMethod.Config):
        r: int = 8
        """Rank of A and B."""
        bases_a: int = 256
        """k: random bases mixed into A."""
        bases_b: int = 256
        """l: random bases mixed into B."""
        alpha: float = 16.0
        """The update is scaled by alpha / r, as LoRA's."""
        share_bases: bool = True
        """One set of bases per module shape (all layers mix the same bases with their own coefficients; memory k r in + l out r per shape); false: per module (memory per module)."""

        def __post_init__(self) -> None:
            for key in ("r", "bases_a", "bases_b"):
                if getattr(self, key) < 1:
                    raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
            if self.alpha <= 0:
                raise ValueError(f"alpha must be > 0, got {self.alpha}")

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        self.bases: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        return super().prepare(model, ctx)

    def wrap(self, name: str, module: nn.Module, index: int, seed: int) -> Wrapper:
        c, (out, inp) = self.cfg, _out_in(module)
        key = (out, inp) if c.share_bases else (out, inp, index)
        gen = seeded_generator(seed, 7919 + index)
        device = module.weight.device
        if key not in self.bases:
            salt = (out * 131 + inp) * 1009 + (index if not c.share_bases else 0)
            g = seeded_generator(seed, salt)
            if device.type == "meta":
                a = torch.empty(c.bases_a, c.r, inp, device="meta")
                b = torch.empty(c.bases_b, out, c.r, device="meta")
            else:  # A x of unit scale for unit inputs; B's columns of unit norm
                a = (torch.randn(c.bases_a, c.r, inp, generator=g) / math.sqrt(inp)).to(device)
                b = (torch.randn(c.bases_b, out, c.r, generator=g) / math.sqrt(c.r)).to(device)
            self.bases[key] = (a, b)
        a, b = self.bases[key]
        return Nola(module, a, b, c.alpha / c.r, gen)


# ---------------------------------------------------------------------------------------------
# LoLDU
# ---------------------------------------------------------------------------------------------


class Ldu(Wrapper):
    """W = P L D U (partial-pivoting LU, U's diagonal D taken out). The first r columns of L
    and rows of U span the update: the weight becomes W_res = W - s0 P L_r diag(z0) U_r and the
    forward adds s P L_r diag(z) U_r x; only z (r values, starting at D's first r) and the
    scale s (starting at 1) train. P is kept as an index permutation."""

    def __init__(self, base: nn.Linear, r: int):
        super().__init__(base)
        w = base.weight
        out, inp = w.shape
        r = min(r, out, inp)
        if w.is_meta:
            lower, upper, d = torch.empty(out, r), torch.empty(r, inp), torch.empty(r)
            perm = torch.empty(out, dtype=torch.long)
            lower, upper, d, perm = (t.to("meta") for t in (lower, upper, d, perm))
        else:
            p, lower_full, upper_full = torch.linalg.lu(w.detach().float())
            d_full = torch.diagonal(upper_full)
            upper_full = upper_full / d_full[:, None]
            lower, upper, d = (
                lower_full[:, :r].contiguous(),
                upper_full[:r].contiguous(),
                d_full[:r].clone(),
            )
            perm = p.argmax(dim=1)  # (P M)[i] = M[perm[i]]
        self.register_buffer("lower", lower)
        self.register_buffer("upper", upper)
        self.register_buffer("perm", perm)
        self.z = nn.Parameter(d.clone())
        self.s = nn.Parameter(torch.ones((), device=d.device))
        if not w.is_meta:
            with torch.no_grad():  # W_res: the update at its initial values leaves W x unchanged
                w.sub_(self.delta().to(w.dtype))

    def delta(self) -> torch.Tensor:
        full = (self.lower * self.z) @ self.upper
        return self.s * full[self.perm]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        t = F.linear(F.linear(x.to(self.upper.dtype), self.upper) * self.z, self.lower)
        return y + (self.s * t[..., self.perm]).to(y.dtype)

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            w = self.base.weight
            w.copy_((w.float() + self.delta()).to(w.dtype))
        return self.base


@register("params", "loldu")
class LoLDU(WrapperMethod):
    """LoLDU (Shi et al., https://arxiv.org/abs/2410.13618): LDU decomposition of each weight; the update lives in the span of the first r columns of L and rows of U, and only its diagonal (r values) and a scale train."""

    frozen_base = False  # the residual W - initial update replaces W

    @dataclass
    class Config(WrapperMethod.Config):
        r: int = 64
        """Columns of L (rows of U) that span the update."""

        def __post_init__(self) -> None:
            if self.r < 1:
                raise ValueError(f"r must be >= 1, got {self.r}")

    def base_change(self) -> str | None:
        return "LoLDU subtracts its initial update from W"

    def wrap(self, name: str, module: nn.Module, index: int, seed: int) -> Wrapper:
        return Ldu(module, self.cfg.r)


# ---------------------------------------------------------------------------------------------
# Bottleneck adapters (LLM-Adapters)
# ---------------------------------------------------------------------------------------------

ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh, "silu": F.silu, "gelu": F.gelu}


class Bottleneck(nn.Module):
    """up(act(down(h))) * scale; up starts at zero, so the adapter starts as the identity."""

    def __init__(self, width: int, size: int, activation: str, scale: float, device: Any):
        super().__init__()
        self.down = nn.Linear(width, size, device=device)
        self.up = nn.Linear(size, width, device=device)
        if not self.up.weight.is_meta:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self.act, self.scale = ACTIVATIONS[activation], scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h.to(self.down.weight.dtype)))) * self.scale


class SeriesAdapter(Wrapper):
    """After a sublayer's output projection: y + adapter(y)."""

    def __init__(self, base: nn.Linear, size: int, activation: str, scale: float):
        super().__init__(base)
        self.adapter = Bottleneck(base.out_features, size, activation, scale, base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.adapter(y).to(y.dtype)


class ParallelAdapter(Wrapper):
    """Beside a sublayer (the MLP or the attention): sublayer(h) + adapter(h)."""

    def __init__(self, base: nn.Module, width: int, size: int, activation: str, scale: float):
        super().__init__(base)
        device = next(base.parameters()).device
        self.adapter = Bottleneck(width, size, activation, scale, device)
        self.in_features = width

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        out = self.base(*args, **kwargs)
        if isinstance(out, tuple):  # attention: (output, weights)
            return (out[0] + self.adapter(h).to(out[0].dtype), *out[1:])
        return out + self.adapter(h).to(out.dtype)


def _width(module: nn.Module) -> int:
    """The input width of a sublayer (its first linear's: q_proj, gate_proj)."""
    return next(m for m in module.modules() if isinstance(m, nn.Linear)).in_features


class _Bottlenecks(WrapperMethod):
    mergeable = False
    placed: ClassVar[dict[str, str]] = {}  # placement -> the module wrapped

    def target_names(self) -> list[str]:
        return [self.placed[p] for p in self.cfg.placement]

    @dataclass
    class Config:
        placement: list[Literal["attention", "mlp"]] = field(default_factory=lambda: ["mlp"])
        """Sublayers that get an adapter: mlp, attention or both."""
        bottleneck: int = 64
        """Width of the bottleneck."""
        activation: Literal["relu", "tanh", "silu", "gelu"] = "relu"
        """Non-linearity between the down- and up-projection."""
        scale: float = 1.0
        """The adapter's output is multiplied by this."""

        def __post_init__(self) -> None:
            if not self.placement:
                raise ValueError("placement must name at least one of attention, mlp")
            if self.bottleneck < 1:
                raise ValueError(f"bottleneck must be >= 1, got {self.bottleneck}")
            if self.scale <= 0:
                raise ValueError(f"scale must be > 0, got {self.scale}")


@register("params", "series-adapter")
class Series(_Bottlenecks):
    """Series bottleneck adapter (Houlsby et al. 2019, as in LLM-Adapters, https://arxiv.org/abs/2304.01933): after the attention and/or MLP output projection, y + up(act(down(y))), up zero-initialised."""

    placed = {"attention": "o_proj", "mlp": "down_proj"}

    def wrap(self, name: str, module: nn.Module, index: int, seed: int) -> Wrapper:
        c = self.cfg
        return SeriesAdapter(module, c.bottleneck, c.activation, c.scale)


@register("params", "parallel-adapter")
class Parallel(_Bottlenecks):
    """Parallel bottleneck adapter (He et al., https://arxiv.org/abs/2110.04366, as in LLM-Adapters): beside the MLP and/or attention, sublayer(h) + up(act(down(h))) on the sublayer's input h, up zero-initialised."""

    placed = {"attention": "self_attn", "mlp": "mlp"}

    def wrap(self, name: str, module: nn.Module, index: int, seed: int) -> Wrapper:
        c = self.cfg
        return ParallelAdapter(module, _width(module), c.bottleneck, c.activation, c.scale)


# ---------------------------------------------------------------------------------------------
# NLoRA / SLoRA / IntTune
# ---------------------------------------------------------------------------------------------


class ThreeFactor(Wrapper):
    """W x + scale * B N (A x), with an r x r middle matrix N."""

    def __init__(self, base: nn.Linear, r: int, scale: float, init: str, gen: torch.Generator):
        super().__init__(base)
        out, inp = base.out_features, base.in_features
        r = min(r, out, inp)
        w = base.weight
        a, n, b = torch.empty(r, inp), torch.empty(r, r), torch.zeros(out, r)
        if w.is_meta:
            pass
        elif init == "nystrom":  # W ~ C pinv(W_IJ) R with I, J the first r rows and columns
            # (the authors' code sets N = W_IJ itself and leaves W as loaded, so its model is
            # not the loaded one at step 0; here W keeps the residual and training starts there)
            w32 = w.detach().float().cpu()
            a, b = w32[:r, :].clone(), w32[:, :r].clone()
            n = torch.linalg.pinv(w32[:r, :r], rtol=PINV_RTOL) / scale
        else:  # slora: A and N random (Kaiming, as LoRA's A), B = 0
            bound_a, bound_n = 1 / math.sqrt(inp), 1 / math.sqrt(r)
            a = (torch.rand(r, inp, generator=gen) * 2 - 1) * bound_a
            n = (torch.rand(r, r, generator=gen) * 2 - 1) * bound_n
        device = w.device
        self.a = nn.Parameter(a.to(device))
        self.n = nn.Parameter(n.to(device))
        self.b = nn.Parameter(b.to(device))
        self.scale = scale
        if init == "nystrom" and not w.is_meta:
            with torch.no_grad():  # W_res = W - scale B N A: the model starts as loaded
                w.sub_(self.delta().to(w.dtype))

    def delta(self) -> torch.Tensor:
        return self.scale * (self.b @ self.n @ self.a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        t = F.linear(F.linear(F.linear(x.to(self.a.dtype), self.a), self.n), self.b)
        return y + (t * self.scale).to(y.dtype)

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            w = self.base.weight
            w.copy_((w.float() + self.delta()).to(w.dtype))
        return self.base


PINV_RTOL = 1e-3  # singular values of W_IJ below 1e-3 of its largest are cut (no blow-up)


@register("params", "nlora")
class NLoRA(WrapperMethod):
    """NLoRA (Guo et al., https://arxiv.org/abs/2502.14482): LoRA with an r x r middle matrix, B N A; init nystrom takes A, B and N = pinv(W_IJ) from W's first r rows and columns (W keeps the residual), slora draws A and N and zeroes B; train: middle is IntTune (only N trains)."""

    frozen_base = False  # the Nystrom init leaves W - B N A in the base

    @dataclass
    class Config(WrapperMethod.Config):
        r: int = 8
        """Rank (the middle matrix is r x r)."""
        alpha: float = 8.0
        """The update is scaled by alpha / r."""
        init: Literal["nystrom", "slora"] = "nystrom"
        """nystrom: A = W[:r, :], B = W[:, :r], N = pinv(W[:r, :r]) and W becomes W - B N A; slora: random A and N, B = 0."""
        train: Literal["all", "middle"] = "all"
        """all: A, N and B train (NLoRA, SLoRA); middle: only N trains (IntTune)."""

        def __post_init__(self) -> None:
            if self.r < 1:
                raise ValueError(f"r must be >= 1, got {self.r}")
            if self.alpha <= 0:
                raise ValueError(f"alpha must be > 0, got {self.alpha}")
            if self.train == "middle" and self.init == "slora":
                raise ValueError("train: middle (IntTune) needs init: nystrom (B = 0 would stay 0)")

    default_targets = BLOCK_LINEARS

    def base_change(self) -> str | None:
        return (
            "the Nystrom init leaves W - B N A in the base" if self.cfg.init == "nystrom" else None
        )

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        model = super().prepare(model, ctx)
        if self.cfg.train == "middle":
            for wrapper in self.wrapped(model).values():
                wrapper.a.requires_grad_(False)
                wrapper.b.requires_grad_(False)
        return model

    def wrap(self, name: str, module: nn.Module, index: int, seed: int) -> Wrapper:
        c = self.cfg
        return ThreeFactor(
            module, c.r, c.alpha / c.r, c.init, seeded_generator(seed, 104729 + index)
        )


# ---------------------------------------------------------------------------------------------
# LoFiT
# ---------------------------------------------------------------------------------------------


class HeadTuning(Wrapper):
    """Around o_proj, whose input is the heads' outputs side by side: phase 1 scales each head
    output, z (1 + scale_h); phase 2 adds a bias offset to the selected heads, z + offset_h."""

    def __init__(self, base: nn.Linear, heads: int):
        super().__init__(base)
        dim = base.in_features // heads
        device = base.weight.device
        self.scale = nn.Parameter(torch.zeros(heads, dim, device=device))
        self.offset = nn.Parameter(torch.zeros(heads, dim, device=device))
        self.register_buffer("mask", torch.zeros(heads, 1, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (
            x.to(self.scale.dtype) * (1 + self.scale.flatten())
            + (self.offset * self.mask).flatten()
        )
        return self.base(z.to(x.dtype))

    def merged(self) -> nn.Linear:
        base = self.base
        with torch.no_grad():  # W (z (1 + s) + o) = W diag(1 + s) z + W o
            w = base.weight.float() * (1 + self.scale.flatten())[None, :]
            b = base.weight.float() @ (self.offset * self.mask).flatten()
            if base.bias is not None:
                b = b + base.bias.float()
        return linear_with_bias(w, b, base.weight.dtype)


@register("params", "lofit")
class LoFiT(WrapperMethod):
    """LoFiT (Yin et al., https://arxiv.org/abs/2406.01563): phase 1 learns a scale per attention head output (L1-penalised), the top heads by its norm are selected; phase 2 trains bias offsets on the selected heads' outputs only; folds into o_proj."""

    default_targets = ("o_proj",)

    @dataclass
    class Config:
        heads_fraction: float = 0.1
        """Fraction of all attention heads (over all blocks) selected for phase 2 (the paper: 3-10%)."""
        select_at: float = 0.5
        """Fraction of the run's steps spent in phase 1 (scales); the rest trains the offsets."""
        l1: float = 1e-3
        """Weight of the L1 penalty on the phase-1 scales."""

        def __post_init__(self) -> None:
            if not 0 < self.heads_fraction <= 1:
                raise ValueError(f"heads_fraction must be in (0, 1], got {self.heads_fraction}")
            if not 0 < self.select_at < 1:
                raise ValueError(f"select_at must be in (0, 1), got {self.select_at}")
            if self.l1 < 0:
                raise ValueError(f"l1 must be >= 0, got {self.l1}")

    def target_names(self) -> list[str]:
        return ["o_proj"]

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        self.heads = model.config.num_attention_heads
        total = int(ctx.extras.get("total_steps") or 2)
        # a run shorter than that ends in phase 1 (its artefact: the scales)
        self.switch = max(1, round(self.cfg.select_at * total))
        return super().prepare(model, ctx)

    def wrap(self, name: str, module: nn.Module, index: int, seed: int) -> Wrapper:
        wrapper = HeadTuning(module, self.heads)
        wrapper.offset.requires_grad_(False)  # phase 2's
        return wrapper

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """Scales and offsets both: the optimizer holds phase 2's tensors from the start."""
        from ..shared import groups_including

        every = [p for w in self.wrapped(model).values() for p in (w.scale, w.offset)]
        return groups_including(self, model, every, weight_decay)

    def check_optimizer(self, optimizer: Any) -> None:
        if optimizer.forward_only and self.cfg.l1:
            raise SlimtuneError(
                f"params: lofit: its L1 penalty on the head scales needs gradients, which "
                f"optimizer {optimizer.name} does not compute; set l1: 0"
            )

    def selecting(self, model: nn.Module) -> bool:
        """Phase 1: no head selected yet."""
        masks = [w.mask for w in self.wrapped(model).values()]
        return not bool(torch.cat(masks).any())  # one device sync, not one per block

    def regulariser(self, model: nn.Module) -> torch.Tensor | None:
        if not self.cfg.l1 or not self.selecting(model):
            return None
        return self.cfg.l1 * sum(w.scale.abs().sum() for w in self.wrapped(model).values())

    def on_step_start(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        if step == self.switch and self.selecting(model):
            self.select(model, optimizer)

    def select(self, model: nn.Module, optimizer: Any = None) -> None:
        """The top heads by the L1 norm of their learned scales; their offsets train from now
        on, on the base model (the scales are reset to 0 and frozen)."""
        from ..shared import drop_optimizer_state

        wrappers = list(self.wrapped(model).values())
        norms = torch.stack([w.scale.detach().abs().sum(dim=1) for w in wrappers])  # (L, H)
        k = max(1, round(self.cfg.heads_fraction * norms.numel()))
        top = norms.flatten().topk(k).indices
        with torch.no_grad():
            for i, w in enumerate(wrappers):
                chosen = top[(top // norms.shape[1]) == i] % norms.shape[1]
                w.mask.zero_()
                w.mask[chosen] = 1.0
                w.scale.zero_()
                w.scale.requires_grad_(False)
                w.offset.requires_grad_(True)
        if optimizer is not None:
            drop_optimizer_state(optimizer, [w.scale for w in wrappers])

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for name, w in self.wrapped(model).items():
            out.update({f"{name}.scale": w.scale.detach(), f"{name}.offset": w.offset.detach()})
            out[f"{name}.mask"] = w.mask
        return out

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, w in self.wrapped(model).items():
                for key in ("scale", "offset", "mask"):
                    getattr(w, key).copy_(state[f"{name}.{key}"])
        phase_1 = self.selecting(model)
        for w in self.wrapped(model).values():
            w.scale.requires_grad_(phase_1)
            w.offset.requires_grad_(not phase_1)

    def selected(self, model: nn.Module) -> list[list[int]]:
        """[block, head] of every selected head (empty in phase 1)."""
        return [
            [i, int(h)]
            for i, w in enumerate(self.wrapped(model).values())
            for h in w.mask.flatten().nonzero().flatten()
        ]

    def artefact_info(self, model: nn.Module) -> dict[str, Any]:
        return {"selected_heads": self.selected(model)}

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_with_biases(self, model)


# ---------------------------------------------------------------------------------------------
# MAM: prefix tuning and a parallel MLP adapter
# ---------------------------------------------------------------------------------------------


@register("params", "mam")
class MAM(WrapperMethod):
    """MAM adapter (He et al., https://arxiv.org/abs/2110.04366, the unified view): prefix tuning in every attention (peft) plus a scaled parallel adapter beside every MLP; not mergeable."""

    mergeable = False
    supports_checkpointing = False  # peft re-applies the prefix cache in a recomputed block
    supports_packing = False  # the prefix: virtual tokens before every row

    @dataclass
    class Config:
        num_virtual_tokens: int = 30
        """Prefix length (the paper's MAM: 30)."""
        bottleneck: int = 512
        """Width of the MLP adapter's bottleneck (the paper's MAM: 512)."""
        scale: float = 4.0
        """The MLP adapter's output scale (the paper's s = 4)."""
        activation: Literal["relu", "tanh", "silu", "gelu"] = "relu"
        """Non-linearity of the MLP adapter."""

        def __post_init__(self) -> None:
            for key in ("num_virtual_tokens", "bottleneck"):
                if getattr(self, key) < 1:
                    raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
            if self.scale <= 0:
                raise ValueError(f"scale must be > 0, got {self.scale}")

    def adapters_off_is_base(self) -> bool:
        return False

    def target_names(self) -> list[str]:
        return ["mlp"]

    def wrap(self, name: str, module: nn.Module, index: int, seed: int) -> Wrapper:
        c = self.cfg
        return ParallelAdapter(module, _width(module), c.bottleneck, c.activation, c.scale)

    def _prefix(self) -> Any:
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=self.cfg.num_virtual_tokens
        )

    def _wrap_mlps(self, model: nn.Module, seed: int) -> nn.Module:
        for i, (name, module) in enumerate(sorted(self.targets(model).items())):
            model.set_submodule(name, self.wrap(name, module, i, seed))
        return model

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        from peft import get_peft_model

        self.seed = ctx.seed
        return self._wrap_mlps(get_peft_model(model, self._prefix()), ctx.seed)

    def save(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
        model.save_pretrained(out_dir)  # peft: the prefix
        super().save(model, tokenizer, out_dir)  # the MLP adapters and the settings

    @classmethod
    def load(cls, base: nn.Module, run_dir: Path) -> nn.Module:
        from peft import PeftModel

        from ...config import build

        info = json.loads((run_dir / CONFIG_FILE).read_text())
        method = cls(build(cls.Config, info["config"], "params"))
        model = method._wrap_mlps(PeftModel.from_pretrained(base, run_dir), info["seed"])
        state = load_file(str(run_dir / ADAPTER_FILE))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, t in state.items():
                if ".adapter." in key:
                    params[key].copy_(t)
        return model

    def memory(self, plan: Any) -> None:
        """The MLP adapters as measured by the wrapper machinery; the prefix as prefix tuning
        prices it (its keys and values, the explicit mask it needs, backward from block 0)."""
        from ...plan.planner import Spec

        super().memory(plan)
        sh, n = plan.shape, self.cfg.num_virtual_tokens
        kv = sh.kv_heads * sh.head_dim
        plan.add_new(
            Spec("prefix_encoder.embedding", (n, sh.layers * 2 * kv), "adapter", None, "embed", 4.0)
        )
        plan.needs_mask, plan.prefix_tokens = True, n
        q = sh.heads * sh.head_dim
        plan.add(
            "activations",
            sh.layers * plan.work.batch * 2 * n * q * plan.work.act_bytes,
            "backward",
            "prefix keys and values kept by attention",
        )
        plan.grad_from = 0
