"""SpIEL: sparse fine-tuning with a fixed budget of trainable weight entries (Ansell et al. 2024).

Each linear layer of the decoder blocks gets a sparse delta: ``indices`` (positions in the
flattened weight) and trainable ``values``; the layer computes with W + delta. The budget is
``density`` x the weights of those layers, split between layers in proportion to their size, and
it never changes. Every ``update_every`` steps a fraction p_t = ``drop_fraction`` x (1 - t / T)
of each layer's active entries with the smallest |value| is dropped (its value discarded) and
as many inactive entries are grown: those with the largest |gradient| accumulated over the
``grow_window`` steps before the update (a dense per-layer accumulator exists only during that
window). Grown entries start at 0 with fresh optimizer moments. T is the run's step count.

Saved sparsely (``spiel_delta.safetensors``: indices and values per layer, plus
``spiel_config.json``); ``merge`` adds the deltas into plain weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from ...registry import register
from ..base import ParamsMethod, PrepareContext
from ..shared import SELECTS_PARTS, decoder_layers

DELTA_FILE = "spiel_delta.safetensors"
CONFIG_FILE = "spiel_config.json"


class SparseDeltaLinear(nn.Module):
    """A frozen linear layer plus a sparse trainable delta on its weight."""

    def __init__(self, base: nn.Linear, indices: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("indices", indices.to(torch.long))
        self.values = nn.Parameter(torch.zeros(len(indices), dtype=base.weight.dtype))
        self.grad_sink: torch.Tensor | None = None  # |grad W| accumulator during a grow window

    def weight_with_delta(self) -> torch.Tensor:
        w = self.base.weight.flatten().index_add(
            0, self.indices, self.values.to(self.base.weight.dtype)
        )
        return w.view_as(self.base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_with_delta()
        if self.grad_sink is not None and w.requires_grad:
            w.register_hook(self._sink)
        return nn.functional.linear(x, w, self.base.bias)

    def _sink(self, grad: torch.Tensor) -> None:
        self.grad_sink += grad.detach().abs().float()

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight.copy_(self.weight_with_delta())
        return self.base


def _wrapped(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


def _wrap(model: nn.Module, sizes: dict[str, int], seed: int) -> dict[str, SparseDeltaLinear]:
    """Replace each named linear by a SparseDeltaLinear with ``sizes[name]`` random entries."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, k in sizes.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base: nn.Linear = getattr(parent, child)
        idx = torch.randperm(base.weight.numel(), generator=g)[:k].sort().values
        layer = SparseDeltaLinear(base, idx.to(base.weight.device)).to(base.weight.device)
        setattr(parent, child, layer)
        out[name] = layer
    return out


@register("params", "spiel")
class SpIEL(ParamsMethod):
    """SpIEL (Ansell et al. 2024, "Scaling Sparse Fine-Tuning to Large Language Models"): a fixed budget of trainable weight entries per linear, dropped by |value| and regrown by accumulated |gradient|."""

    @dataclass
    class Config:
        density: float = 0.01
        """Trainable entries as a fraction of the block linears' weights (the budget)."""
        update_every: int = 20
        """Steps between drop-and-regrow updates."""
        drop_fraction: float = 0.2
        """p0: fraction of active entries replaced at an update, decaying linearly to 0 over the run."""
        grow_window: int = 5
        """Steps before an update over which |gradient| of all entries is accumulated (a dense buffer per layer, only then)."""

        def __post_init__(self) -> None:
            if not 0 < self.density <= 1:
                raise ValueError(f"density must be in (0, 1], got {self.density}")
            if not 0 <= self.drop_fraction <= 1:
                raise ValueError(f"drop_fraction must be in [0, 1], got {self.drop_fraction}")
            if self.update_every < 1 or self.grow_window < 1:
                raise ValueError("update_every and grow_window must be >= 1")

    def sharding_refusal(self) -> str | None:
        return SELECTS_PARTS

    def memory(self, plan: Any) -> None:
        """``density`` x the block linears' weights as trainable values (plus int64 indices).
        Each layer computes with a dense W + delta that autograd keeps for backward (one weight
        copy per linear) next to its input; backward forms each dense weight gradient for a
        moment; within ``grow_window`` steps of an update a dense fp32 |gradient| buffer
        exists per linear (counted when the run is long enough to reach one)."""
        from ...plan.planner import Adapter, Spec

        c, w = self.cfg, plan.work
        plan.freeze_all()
        linears = plan.linears()
        for s in linears:
            k = max(1, round(c.density * s.numel))
            plan.add_new(
                Spec(s.name + ".values", (k,), "adapter", s.layer, s.module, w.param_bytes)
            )
            plan.adapters.append(Adapter(s.layer, s.module, saves_input=True))
        n_idx = sum(max(1, round(c.density * s.numel)) for s in linears)
        plan.add("adapters", n_idx * 8, "always", "int64 indices of the sparse entries")
        per_block = [
            sum(s.numel for s in linears if s.layer == i) * w.param_bytes
            for i in range(plan.shape.layers)
        ]
        copies = max(per_block) if w.checkpointing else sum(per_block)
        plan.add("activations", copies, "backward", "W + delta of every linear, kept for backward")
        plan.add(
            "backward transients",
            max(s.numel for s in linears) * w.param_bytes,
            "backward",
            "one dense weight gradient",
        )
        if w.steps is None or w.steps > c.update_every - c.grow_window:
            plan.add(
                "optimizer state",
                sum(s.numel for s in linears) * 4.0,
                "always",
                f"grow window: dense |grad| accumulators ({c.grow_window} of every "
                f"{c.update_every} steps)",
            )

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        _, blocks = decoder_layers(model)
        block_ids = {id(m) for b in blocks for m in b.modules()}
        linears = {
            n: m
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m) in block_ids
        }
        model.requires_grad_(False)
        sizes = {n: max(1, round(self.cfg.density * m.weight.numel())) for n, m in linears.items()}
        self.layers = _wrap(model, sizes, ctx.seed)
        self.budget = sum(sizes.values())
        self.total_steps = int(ctx.extras.get("total_steps", 0))
        return model

    def on_step_start(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        c = self.cfg
        if step > 0 and step % c.update_every == 0:
            self.update(step, optimizer)
        next_update = (step // c.update_every + 1) * c.update_every
        if next_update - step <= c.grow_window:  # inside the window before the next update
            for layer in self.layers.values():
                if layer.grad_sink is None:
                    layer.grad_sink = torch.zeros_like(layer.base.weight, dtype=torch.float32)

    def drop_fraction_at(self, step: int) -> float:
        if not self.total_steps:
            return self.cfg.drop_fraction
        return self.cfg.drop_fraction * max(0.0, 1 - step / self.total_steps)

    @torch.no_grad()
    def update(self, step: int, optimizer: Any) -> None:
        """Drop the smallest-|value| entries of each layer and regrow as many by |gradient|."""
        p = self.drop_fraction_at(step)
        for layer in self.layers.values():
            sink, layer.grad_sink = layer.grad_sink, None
            n = int(p * len(layer.values))
            if n == 0 or sink is None:
                continue
            drop = torch.topk(layer.values.abs().float(), n, largest=False).indices
            score = sink.flatten()
            score[layer.indices] = -1.0  # active entries are not candidates
            grow = torch.topk(score, n).indices
            layer.indices[drop] = grow
            layer.values[drop] = 0
            state = optimizer.state.get(layer.values, {})
            for value in state.values():  # fresh moments for the regrown slots
                if isinstance(value, torch.Tensor) and value.shape == layer.values.shape:
                    value[drop] = 0

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in _wrapped(model).items():
            out[f"{name}.values"] = layer.values.detach()
            out[f"{name}.indices"] = layer.indices
            if layer.grad_sink is not None:  # inside a grow window: a checkpoint needs it
                out[f"{name}.grad_sink"] = layer.grad_sink
        return out

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, layer in _wrapped(model).items():
                layer.indices.copy_(state[f"{name}.indices"])
                layer.values.copy_(state[f"{name}.values"])
                sink = state.get(f"{name}.grad_sink")
                layer.grad_sink = None if sink is None else sink.clone()

    def save(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
        state = {
            k: v.contiguous().cpu()
            for k, v in self.trainable_state(model).items()
            if not k.endswith(".grad_sink")
        }
        save_file(state, str(out_dir / DELTA_FILE))
        info = {
            "density": self.cfg.density,
            "layers": sorted(_wrapped(model)),
            "budget": self.budget,
        }
        (out_dir / CONFIG_FILE).write_text(json.dumps(info, indent=1))
        tokenizer.save_pretrained(out_dir)

    @classmethod
    def load(cls, base: nn.Module, run_dir: Path) -> nn.Module:
        state = load_file(str(run_dir / DELTA_FILE))
        info = json.loads((run_dir / CONFIG_FILE).read_text())
        sizes = {n: len(state[f"{n}.indices"]) for n in info["layers"]}
        layers = _wrap(base, sizes, 0)
        with torch.no_grad():
            for name, layer in layers.items():
                layer.indices.copy_(state[f"{name}.indices"].to(layer.indices.device))
                layer.values.copy_(state[f"{name}.values"].to(layer.values.device))
        return base

    def merge(self, model: nn.Module) -> nn.Module:
        for name, layer in _wrapped(model).items():
            model.set_submodule(name, layer.merged())
        return model
