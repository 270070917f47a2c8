"""LISA: layerwise importance sampling (Pan et al. 2024).

The input embeddings and the output head always train. Every ``interval`` steps (from step 0)
all decoder blocks are frozen and ``layers`` of them, drawn uniformly without replacement, are
unfrozen. Unlike the reference, the optimizer state of blocks that leave the active set is
dropped at the switch, so optimizer memory stays bounded by embedding + head + ``layers`` blocks
however long the run (a block that comes back starts with fresh moments).

The draw for interval i depends only on (seed, i): a resumed run picks the same blocks.
The optimizer is built over every parameter that can ever train (all blocks, embedding, head);
frozen tensors get no gradient, hence no update and no state. Saved as a plain Hugging Face
checkpoint (the result is full weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import SlimtuneError
from ...registry import register
from ..base import ParamsMethod, PrepareContext
from ..shared import decoder_layers, drop_optimizer_state, groups_including, seeded_generator


@register("params", "lisa")
class Lisa(ParamsMethod):
    """LISA (Pan et al. 2024, https://arxiv.org/abs/2403.17919): embedding and head always train; every K steps a fresh uniform sample of gamma blocks trains; stale optimizer state is dropped."""

    @dataclass
    class Config:
        layers: int = 2
        """gamma: decoder blocks trained at a time."""
        interval: int = 20
        """K: optimizer steps between re-samplings."""
        embeddings: bool = True
        """Train the input embeddings (and a head tied to them) throughout."""
        head: bool = True
        """Train the output head throughout."""

        def __post_init__(self) -> None:
            if self.layers < 1:
                raise ValueError(f"layers must be >= 1, got {self.layers}")
            if self.interval < 1:
                raise ValueError(f"interval must be >= 1, got {self.interval}")

    def sharding_refusal(self) -> str | None:
        return (
            "changes which blocks train every few steps, and its optimizer state with them; "
            "FSDP fixes each process's shards and their state at the start"
        )

    def memory(self, plan: Any) -> None:
        """Embedding and head plus ``layers`` blocks train at any time (the optimizer state of
        blocks that leave is dropped); which blocks does not change the sum, and backward
        reaches the lowest sampled block, the first one in the worst case."""
        c, sh = self.cfg, plan.shape
        plan.freeze_all()
        blocks = set(range(sh.layers - min(c.layers, sh.layers), sh.layers))
        plan.train(s for s in plan.base if s.layer in blocks)
        if c.embeddings:
            plan.train(s for s in plan.base if s.kind == "embedding")
        if c.head:
            plan.train(
                s for s in plan.base if s.kind == "head" or (s.kind == "embedding" and sh.tied)
            )
        plan.grad_from = 0

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        _, self._blocks = decoder_layers(model)
        if self.cfg.layers > len(self._blocks):
            raise SlimtuneError(
                f"config: params.layers: {self.cfg.layers} blocks asked, the model has "
                f"{len(self._blocks)}"
            )
        self._seed = ctx.seed
        model.requires_grad_(False)
        always = []
        if self.cfg.embeddings:
            always.append(model.get_input_embeddings())
        if self.cfg.head and model.get_output_embeddings() is not None:
            always.append(model.get_output_embeddings())
        for module in always:
            module.requires_grad_(True)
        self._always = {id(p) for m in always for p in m.parameters()}
        self.active: list[int] = []
        self._interval = -1
        self._select(model, 0, None)
        return model

    def sample(self, interval: int) -> list[int]:
        """The blocks of an interval: a draw that depends only on (seed, interval)."""
        g = seeded_generator(self._seed, interval)
        return sorted(torch.randperm(len(self._blocks), generator=g)[: self.cfg.layers].tolist())

    def _select(self, model: nn.Module, step: int, optimizer: Any) -> None:
        interval = step // self.cfg.interval
        if interval == self._interval:
            return
        self._interval = interval
        chosen = self.sample(interval)
        for i, block in enumerate(self._blocks):
            keep = i in chosen
            if not keep and optimizer is not None:
                drop_optimizer_state(
                    optimizer, [p for p in block.parameters() if id(p) not in self._always]
                )
            block.requires_grad_(keep)
        for p in model.parameters():  # a head tied to the embedding may sit inside no block
            if id(p) in self._always:
                p.requires_grad_(True)
        self.active = chosen

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        # Every tensor that may ever train: the optimizer holds them all; only those with a
        # gradient in a step are updated and get state.
        return groups_including(self, model, self._trainable_set(model), weight_decay)

    def _trainable_set(self, model: nn.Module) -> list[nn.Parameter]:
        ids = {id(p) for b in self._blocks for p in b.parameters()} | self._always
        return [p for p in model.parameters() if id(p) in ids]

    def on_step_start(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        self._select(model, step, optimizer)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        ids = {id(p) for p in self._trainable_set(model)}
        return {n: p.detach() for n, p in model.named_parameters() if id(p) in ids}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)
