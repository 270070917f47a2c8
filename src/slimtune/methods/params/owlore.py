"""OwLore: LISA whose blocks are drawn with probabilities from their outlier ratios (OWL).

Calibration (no script is published with the paper; this is the reading implemented here): a few
batches of the run's own training data (``calibration_examples``, drawn by the loop's seeded
calibration stream) go through the model; for every linear layer inside a decoder block the L2
norm of each input feature over all calibration tokens, ||X_j||, is accumulated. The Wanda score
of a weight is A_ij = |W_ij| * ||X_j||. A block's outlier ratio is the fraction of the scores of
all its linear weights that exceed ``threshold`` (M) times their mean; block l is drawn with
probability p_l = ratio_l / sum(ratios) (uniform if no block has an outlier). Every ``interval``
steps ``layers`` blocks are drawn without replacement with these probabilities; the rest is
LISA (embedding and head always train; stale optimizer state dropped at each switch). With
``optimizer: galore`` the sampled blocks train with GaLore. The ratios and probabilities are
written to ``owlore.json`` in the run directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ...registry import register
from ..base import PrepareContext
from ..shared import decoder_layers, seeded_generator
from .lisa import Lisa


def outlier_ratios(
    blocks: nn.ModuleList, input_norms: dict[nn.Linear, torch.Tensor], threshold: float
) -> list[float]:
    """Per block: the fraction of Wanda scores |W_ij| * ||X_j|| above threshold x their mean."""
    ratios = []
    for block in blocks:
        scores = [
            (m.weight.detach().abs().float() * input_norms[m][None, :]).flatten()
            for m in block.modules()
            if isinstance(m, nn.Linear) and m in input_norms
        ]
        a = torch.cat(scores)
        ratios.append(float((a > threshold * a.mean()).float().mean()))
    return ratios


@register("params", "owlore")
class OwLore(Lisa):
    """OwLore (Li et al. 2024, "OwLore: Outlier-weighted Layerwise Sampled Low-Rank Projection"): LISA with blocks drawn in proportion to their OWL outlier ratios; pair with optimizer galore."""

    @dataclass
    class Config(Lisa.Config):
        layers: int = 5
        """gamma: decoder blocks trained at a time (drawn without replacement; blocks without outliers are never drawn)."""
        interval: int = 50
        """K: optimizer steps between re-samplings."""
        threshold: float = 7.0
        """M: a Wanda score counts as an outlier above M times its block's mean score."""
        calibration_examples: int = 32
        """Training examples run through the model to measure input-feature norms."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.threshold <= 0:
                raise ValueError(f"threshold must be > 0, got {self.threshold}")
            if self.calibration_examples < 1:
                raise ValueError(
                    f"calibration_examples must be >= 1, got {self.calibration_examples}"
                )

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:

        _, blocks = decoder_layers(model)
        norms = self._input_norms(model, blocks, ctx)
        self.ratios = outlier_ratios(blocks, norms, self.cfg.threshold)
        total = sum(self.ratios)
        n = len(self.ratios)
        self.probabilities = [r / total for r in self.ratios] if total > 0 else [1 / n] * n
        return super().prepare(model, ctx)

    def _input_norms(
        self, model: nn.Module, blocks: nn.ModuleList, ctx: PrepareContext
    ) -> dict[nn.Linear, torch.Tensor]:
        sums: dict[nn.Linear, torch.Tensor] = {}

        def hook(module: nn.Linear, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sq = x.square().sum(dim=0)
            sums[module] = sums[module] + sq if module in sums else sq

        linears = [m for b in blocks for m in b.modules() if isinstance(m, nn.Linear)]
        handles = [m.register_forward_pre_hook(hook) for m in linears]
        was_training = model.training
        model.eval()
        try:
            if ctx.calibration is None:
                raise ValueError("owlore needs calibration data")
            seen, batches = 0, ctx.calibration()
            with torch.no_grad():
                while seen < self.cfg.calibration_examples:
                    batch = next(batches)
                    device = next(model.parameters()).device
                    model(
                        input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                    )
                    seen += len(batch["input_ids"])
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        return {m: s.sqrt() for m, s in sums.items()}

    def sample(self, interval: int) -> list[int]:
        g = seeded_generator(self._seed, interval)
        p = torch.tensor(self.probabilities, dtype=torch.float64)
        k = min(self.cfg.layers, int((p > 0).sum()))
        drawn = torch.multinomial(p, k, replacement=False, generator=g).tolist()
        return sorted(drawn)

    def save(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
        super().save(model, tokenizer, out_dir)
        info = {
            "threshold": self.cfg.threshold,
            "outlier_ratios": self.ratios,
            "probabilities": self.probabilities,
        }
        (out_dir / "owlore.json").write_text(json.dumps(info, indent=1))
