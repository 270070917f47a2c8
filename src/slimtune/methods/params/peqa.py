"""PEQA: the base's linear weights quantised to a few bits, only the quantisation scales train.

Each targeted linear W (out x in) is quantised once, by asymmetric round-to-nearest min-max
quantisation per output channel (or per group of ``group_size`` input columns):

    lo = min(W_g, 0), hi = max(W_g, 0), s = (hi - lo) / (2^b - 1), z = round(-lo / s),
    Wq = clamp(round(W / s) + z, 0, 2^b - 1),  W ~ s * (Wq - z)

so that |W - s (Wq - z)| <= s / 2 for every weight (the range includes 0, so z fits in b bits).
Wq and z are frozen uint8 buffers (Wq packed as b bit-planes, 8 weights per byte per plane: b/8
bytes per weight); s is an fp32 Parameter of shape (out, groups) and the only tensor that
trains. The forward rebuilds one layer's dense weight s (Wq - z) as a temporary and calls
F.linear; the scale's gradient is dL/ds = sum over the group of (dL/dW) * (Wq - z).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase

from ...errors import SlimtuneError
from ...registry import register
from ..base import ParamsMethod, PrepareContext
from ..shared import decoder_layers

SCALES_FILE = "peqa_scales.safetensors"
CONFIG_FILE = "peqa_config.json"
BITS = (2, 3, 4, 8)


def quantise(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, ...]:
    """(Wq uint8 (out, in), s fp32 (out, G), z uint8 (out, G)) of ``w`` (out, in), rounded to
    nearest with the min-max range of each group of ``group`` input columns (extended to 0)."""
    out, n = w.shape
    wg = w.detach().float().reshape(out, n // group, group)
    lo = wg.amin(-1).clamp(max=0)
    hi = wg.amax(-1).clamp(min=0)
    qmax = 2**bits - 1
    s = (hi - lo) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero group: any scale is exact
    z = torch.round(-lo / s)
    q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, qmax)
    return q.reshape(out, n).to(torch.uint8), s, z.to(torch.uint8)


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """``q`` (out, in) of ``bits``-bit integers as ``bits`` bit-planes, 8 columns per byte:
    uint8 (bits, out, ceil(in / 8)); columns beyond ``in`` are zero padding."""
    out, n = q.shape
    q8 = F.pad(q, (0, -n % 8)).reshape(out, -1, 8)
    shifts = _shifts(q.device)
    planes = [(((q8 >> i) & 1) << shifts).sum(-1, dtype=torch.uint8) for i in range(bits)]
    return torch.stack(planes)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 (out, n)."""
    bits, out, cols = packed.shape
    shifts = _shifts(packed.device)
    q = torch.zeros(out, cols, 8, dtype=torch.uint8, device=packed.device)
    for i in range(bits):
        q |= ((packed[i].unsqueeze(-1) >> shifts) & 1) << i
    return q.reshape(out, cols * 8)[:, :n]


def dequantise(packed: torch.Tensor, s: torch.Tensor, z: torch.Tensor, n: int) -> torch.Tensor:
    """The dense fp32 weight s * (Wq - z), (out, n), built in one buffer."""
    out, groups = s.shape
    w = unpack(packed, n).float().reshape(out, groups, n // groups)
    w.sub_(z.float()[..., None]).mul_(s.detach().float()[..., None])
    return w.reshape(out, n)


class _ScaledLinear(torch.autograd.Function):
    """y = x (s (Wq - z))^T + b, keeping only x for backward: the dense weight and its gradient
    are rebuilt per layer in backward, and the integers are read from the layer, not saved."""

    @staticmethod
    def forward(ctx, x, scale, bias, layer):  # type: ignore[override]
        ctx.save_for_backward(x, scale)
        ctx.layer = layer
        w = layer.dequantised()
        return F.linear(x, w.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, scale = ctx.saved_tensors
        layer = ctx.layer
        out, groups = scale.shape
        d = unpack(layer.qweight, layer.in_features).float().reshape(out, groups, -1)
        d.sub_(layer.zero.float()[..., None])  # Wq - z, rebuilt: the integers are not saved
        g2 = grad_y.reshape(-1, out)
        grad_w = g2.t() @ x.reshape(-1, x.shape[-1]).to(g2.dtype)
        # dL/ds: the weight gradient times (Wq - z), summed over each group's columns
        grad_s = grad_w.float().reshape(out, groups, -1).mul_(d).sum(-1)
        del grad_w
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = d.mul_(scale.detach().float()[..., None]).reshape(out, -1)
            grad_x = (grad_y @ w.to(grad_y.dtype)).to(x.dtype)
        return grad_x, grad_s.to(scale.dtype), None, None


class QuantLinear(nn.Module):
    """A linear layer held as packed integers Wq, zero points z and trainable fp32 scales s."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_dtype = linear.weight.dtype  # what merge writes the dense weight in
        group = group_size or self.in_features
        q, s, z = quantise(linear.weight, bits, group)
        self.register_buffer("qweight", pack(q, bits))
        self.register_buffer("zero", z)
        self.scale = nn.Parameter(s)
        self.bias = linear.bias

    def dequantised(self) -> torch.Tensor:
        return dequantise(self.qweight, self.scale, self.zero, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ScaledLinear.apply(x, self.scale, self.bias, self)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding s (Wq - z) in the original weight dtype."""
        w = self.dequantised().to(self.weight_dtype)
        lin = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, w.device, w.dtype
        )
        lin.weight = nn.Parameter(w, requires_grad=False)
        lin.bias = self.bias
        return lin


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def read_quantised(path: Path) -> dict[str, torch.Tensor]:
    """The dense fp32 weights s (Wq - z) of a file :meth:`PEQA.export_quantised` wrote, by
    layer name (what a deployment reading the integer form computes with)."""
    with safe_open(str(path), "pt") as f:
        widths = json.loads(f.metadata()["in_features"])
        return {
            n: dequantise(f.get_tensor(f"{n}.qweight"), f.get_tensor(f"{n}.scale"),
                          f.get_tensor(f"{n}.zero"), width)
            for n, width in widths.items()
        }  # fmt: skip


@register("params", "peqa")
class PEQA(ParamsMethod):
    """PEQA (Kim et al., https://arxiv.org/abs/2305.14152): linears quantised to 3-4-bit integers Wq with zero points z; only the per-channel scales s of W = s (Wq - z) train.

    Memory-Efficient Fine-Tuning of Compressed Large Language Models via sub-4-bit Integer
    Quantization. Everything else is frozen; the scales take no weight decay (it would shrink
    whole weight rows towards zero). The artefact is the scales alone (``peqa_scales.safetensors``)
    with the settings (``peqa_config.json``) and the tokenizer: ``load`` quantises the base again,
    deterministically, and puts the scales back. ``merge`` gives plain linears holding s (Wq - z);
    :meth:`export_quantised` writes the integers with the trained scales.
    """

    frozen_base = False  # it replaces the base's linear weights by integers
    mergeable = True

    @dataclass
    class Config:
        bits: int = 4
        """Bits per integer weight: 3 or 4 (the paper's), or 2 or 8."""
        group_size: int = 0
        """Input columns that share one scale and zero point (must divide in_features); 0: one per output channel, as in the paper."""
        target_modules: list[str] = field(default_factory=list)
        """Linear modules to quantise, by name (e.g. [q_proj, v_proj]); empty: every linear inside the decoder blocks (never the head or embeddings)."""

        def __post_init__(self) -> None:
            if self.bits not in BITS:
                raise ValueError(
                    f"bits must be one of {', '.join(map(str, BITS))}, got {self.bits}"
                )
            if self.group_size < 0:
                raise ValueError(f"group_size must be >= 0 (0: per channel), got {self.group_size}")

    def _targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The linears inside the decoder blocks that ``target_modules`` names (all if empty)."""
        prefix, _ = decoder_layers(model)
        found = {
            n: m
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith(prefix + ".")
        }
        wanted = self.cfg.target_modules
        if wanted:
            found = {n: m for n, m in found.items() if any(n.split(".")[-1] == t for t in wanted)}
            missing = [t for t in wanted if not any(n.split(".")[-1] == t for n in found)]
            if missing:
                raise SlimtuneError(
                    f"config: params.target_modules: {missing[0]!r} names no linear inside "
                    "the decoder blocks"
                )
        g = self.cfg.group_size
        for n, m in found.items():
            if g and m.in_features % g:
                raise SlimtuneError(
                    f"config: params.group_size: {g} does not divide {n}'s {m.in_features} "
                    "input features"
                )
        return found

    def quantise_model(self, model: nn.Module) -> nn.Module:
        """Freeze ``model`` and replace its targeted linears by :class:`QuantLinear` (in place)."""
        model.requires_grad_(False)
        for name, lin in self._targets(model).items():
            model.set_submodule(name, QuantLinear(lin, self.cfg.bits, self.cfg.group_size))
        return model

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        return self.quantise_model(model)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": [m.scale for m in quant_layers(model).values()], "weight_decay": 0.0}]

    def save(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
        layers = quant_layers(model)
        scales = {f"{n}.scale": m.scale.detach().contiguous().cpu() for n, m in layers.items()}
        save_file(scales, str(out_dir / SCALES_FILE))
        settings = {
            "bits": self.cfg.bits,
            "group_size": self.cfg.group_size,
            "target_modules": list(self.cfg.target_modules),
            "quantised": sorted(layers),
        }
        (out_dir / CONFIG_FILE).write_text(json.dumps(settings, indent=1) + "\n")
        tokenizer.save_pretrained(out_dir)

    @classmethod
    def load(cls, base: nn.Module, run_dir: Path) -> nn.Module:
        settings = json.loads((run_dir / CONFIG_FILE).read_text())
        method = cls(
            cls.Config(
                bits=settings["bits"],
                group_size=settings["group_size"],
                target_modules=settings["target_modules"],
            )
        )
        model = method.quantise_model(base)
        layers = quant_layers(model)
        scales = load_file(str(run_dir / SCALES_FILE))
        if sorted(layers) != settings["quantised"] or len(scales) != len(layers):
            raise SlimtuneError(
                f"params: peqa: the base's quantised layers differ from those of {run_dir}"
            )
        with torch.no_grad():
            for n, m in layers.items():
                m.scale.copy_(scales[f"{n}.scale"])
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        for name, layer in quant_layers(model).items():
            model.set_submodule(name, layer.to_linear())
        return model

    def export_quantised(self, model: nn.Module, path: Path) -> None:
        """One safetensors file of the integer form: per layer ``<name>.qweight`` (packed
        bit-planes, see :func:`pack`), ``<name>.zero`` and ``<name>.scale`` (the trained
        scales); the metadata holds bits, group_size and each layer's in_features."""
        tensors, widths = {}, {}
        for n, m in quant_layers(model).items():
            tensors[f"{n}.qweight"] = m.qweight.contiguous().cpu()
            tensors[f"{n}.zero"] = m.zero.contiguous().cpu()
            tensors[f"{n}.scale"] = m.scale.detach().contiguous().cpu()
            widths[n] = m.in_features
        meta = {
            "bits": str(self.cfg.bits),
            "group_size": str(self.cfg.group_size),
            "in_features": json.dumps(widths),
        }
        save_file(tensors, str(path), metadata=meta)

    def memory(self, plan: Any) -> None:
        """Prices: each targeted linear's dense weight replaced by its integers (bits / 8 bytes
        per weight) and uint8 zero points (1 byte per group); the fp32 scales (out x groups),
        which alone train; each quantised linear keeps its input for the scales' gradient. A
        temporary of one (the largest) layer: the fp32 dense weight rebuilt in the forward
        (plus its cast to the activations' dtype and the unpacked uint8 integers); in backward
        the rebuilt (Wq - z) and the weight gradient (fp32) besides the unpacked integers.
        On the CPU also the dense weights the base was loaded with, as the resident pages of
        the memory-mapped checkpoint (see below)."""
        from ...plan.planner import Adapter, Spec

        c = self.cfg
        chosen = [s for s in plan.linears() if not c.target_modules or s.module in c.target_modules]
        names = {s.name for s in chosen}
        plan.freeze_all()
        quantised = []
        for s in plan.base:
            if s.name in names:
                out, inp = s.shape
                group = c.group_size or inp
                s = replace(s, bytes_per=c.bits / 8 + 1 / group)
                plan.add_new(
                    Spec(s.name[: -len("weight")] + "scale", (out, inp // group), "adapter",
                         s.layer, s.module, 4.0)
                )  # fmt: skip
                plan.adapters.append(Adapter(s.layer, s.module, saves_input=True))
            quantised.append(s)
        plan.base = quantised
        if not chosen:
            return
        if plan.work.device == "cpu":
            # Measured (SmolLM2-135M, CPU): the loader memory-maps the checkpoint, and the pages
            # of the replaced dense weights stay resident (clean file pages, in the RSS) while
            # the mapping lives, which it does as long as any tensor (the embedding) views it.
            dense = sum(s.numel for s in chosen) * plan.work.param_bytes
            plan.add("weights", dense, "always", "CPU: the dense linears' mapped file pages")
        biggest = max(s.numel for s in chosen)
        cast = plan.work.act_bytes if plan.work.act_bytes < 4 else 0.0
        plan.add("temporaries", biggest * (4 + cast + 2), "forward", "PEQA: one dense weight")
        plan.add(
            "temporaries", biggest * (4 + 4 + 2), "backward", "PEQA: one layer's (Wq - z), dL/dW"
        )
