"""HFT: half fine-tuning (Hui et al. 2024).

In every decoder block half of the attention projections train (a random 2 of q, k, v, o); in
the feed-forward part a random half of the blocks trains 1 of its 3 projections (gate, up, down)
and the other half 2 of 3, so about half of the block weights update. Embeddings, norms and the
head stay frozen (the paper leaves them open; frozen is this implementation's reading). The
selection is seeded; ``reselect_every`` N > 0 draws a new selection every N steps (a new
"stage"), dropping the optimizer state of matrices that become frozen. The exact trainable
fraction is reported (``fraction``) and equals what trains. Saved as full weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...registry import register
from ..base import ParamsMethod, PrepareContext
from ..shared import (
    SELECTS_PARTS,
    decoder_layers,
    drop_optimizer_state,
    groups_including,
    seeded_generator,
)


@register("params", "hft")
class HalfFineTuning(ParamsMethod):
    """HFT (Hui et al. 2024, "HFT: Half Fine-Tuning for Large Language Models"): half of each block's attention and FFN matrices train, the rest frozen; optional re-selection per stage."""

    @dataclass
    class Config:
        reselect_every: int = 0
        """Draw a new half every N optimizer steps (a new stage); 0 keeps one selection for the run."""

        def __post_init__(self) -> None:
            if self.reselect_every < 0:
                raise ValueError(f"reselect_every must be >= 0, got {self.reselect_every}")

    def sharding_refusal(self) -> str | None:
        return SELECTS_PARTS

    def memory(self, plan: Any) -> None:
        """Half of each block's attention matrices and, on average, half of its FFN matrices
        train; priced with the expected half (the draw is random): alternating blocks train
        (q, v | k, o) and (gate | up, down)."""
        plan.freeze_all()
        for i in range(plan.shape.layers):
            mods = (
                ("q_proj", "v_proj", "gate_proj")
                if i % 2 == 0
                else ("k_proj", "o_proj", "up_proj", "down_proj")
            )
            plan.train(
                s for s in plan.base if s.layer == i and s.kind == "linear" and s.module in mods
            )

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        _, blocks = decoder_layers(model)
        self._attn, self._ffn = [], []
        for block in blocks:
            linears = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
            self._attn.append([m for n, m in linears if "attn" in n])
            self._ffn.append([m for n, m in linears if "mlp" in n])
        self._seed = ctx.seed
        self._stage = -1
        model.requires_grad_(False)
        self._select(0, None)
        return model

    def selection(self, stage: int) -> list[tuple[list[int], list[int]]]:
        """Per block: (indices of trained attention matrices, indices of trained FFN matrices)."""
        g = seeded_generator(self._seed, 7919 + stage)
        n = len(self._attn)
        one = set(torch.randperm(n, generator=g)[: n // 2].tolist())  # blocks training 1 FFN matrix
        out = []
        for i in range(n):
            a = torch.randperm(len(self._attn[i]), generator=g)[: len(self._attn[i]) // 2]
            k = 1 if i in one else len(self._ffn[i]) - 1
            f = torch.randperm(len(self._ffn[i]), generator=g)[:k]
            out.append((sorted(a.tolist()), sorted(f.tolist())))
        return out

    def _select(self, stage: int, optimizer: Any) -> None:
        if stage == self._stage:
            return
        self._stage = stage
        chosen = self.selection(stage)
        for (attn_idx, ffn_idx), attn, ffn in zip(chosen, self._attn, self._ffn):
            for mats, idx in ((attn, attn_idx), (ffn, ffn_idx)):
                for j, m in enumerate(mats):
                    train = j in idx
                    if not train and optimizer is not None:
                        drop_optimizer_state(optimizer, list(m.parameters()))
                    m.requires_grad_(train)
        self.chosen = chosen

    def _candidates(self) -> list[nn.Parameter]:
        return [p for mats in self._attn + self._ffn for m in mats for p in m.parameters()]

    @property
    def fraction(self) -> float:
        """Trainable share of the block matrices under the current selection."""
        params = self._candidates()
        return sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        if not self.cfg.reselect_every:
            return super().param_groups(model, weight_decay)
        # Re-selection: every matrix that may train is in the optimizer from the start.
        return groups_including(self, model, self._candidates(), weight_decay)

    def on_step_start(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        if self.cfg.reselect_every:
            self._select(step // self.cfg.reselect_every, optimizer)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        ids = {id(p) for p in self._candidates()}
        return {n: p.detach() for n, p in model.named_parameters() if id(p) in ids}
