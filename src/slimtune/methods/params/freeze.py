"""Train chosen decoder blocks and/or named parameters; freeze the rest."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ...errors import SlimtuneError
from ...registry import register
from ..base import ParamsMethod, PrepareContext
from ..shared import decoder_layers


@register("params", "freeze")
class Freeze(ParamsMethod):
    """Freeze everything except chosen decoder blocks, parameter patterns, embeddings or head."""

    @dataclass
    class Config:
        layers: list[int] = field(default_factory=lambda: [-1])
        """Decoder blocks that train; negative indices count from the last block."""
        patterns: list[str] = field(default_factory=list)
        """Extra trainable parameters, as glob patterns on parameter names (e.g. '*norm*')."""
        embeddings: bool = False
        """Train the input embeddings (and a head tied to them)."""
        head: bool = False
        """Train the output head."""

    def memory(self, plan: Any) -> None:
        c = self.cfg
        n = plan.shape.layers
        layers = {i % n for i in c.layers if -n <= i < n}
        plan.freeze_all()
        plan.train(s for s in plan.base if s.layer in layers)
        if c.embeddings:
            plan.train(s for s in plan.base if s.kind == "embedding")
        if c.head:
            plan.train(
                s
                for s in plan.base
                if s.kind in ("head", "embedding") and (s.kind == "head" or plan.shape.tied)
            )
        plan.train(s for s in plan.base if any(fnmatch.fnmatch(s.name, p) for p in c.patterns))

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        c = self.cfg
        model.requires_grad_(False)
        prefix, blocks = decoder_layers(model)
        for i in c.layers:
            if not -len(blocks) <= i < len(blocks):
                raise SlimtuneError(
                    f"config: params.layers: {i} is out of range for {len(blocks)} blocks"
                )
            blocks[i].requires_grad_(True)
        if c.embeddings:
            model.get_input_embeddings().requires_grad_(True)
        if c.head:
            model.get_output_embeddings().requires_grad_(True)
        matched = set()
        for name, p in model.named_parameters():
            for pat in c.patterns:
                if fnmatch.fnmatch(name, pat):
                    p.requires_grad_(True)
                    matched.add(pat)
        unmatched = [pat for pat in c.patterns if pat not in matched]
        if unmatched:
            raise SlimtuneError(f"config: params.patterns: {unmatched[0]!r} matches no parameter")
        return model
