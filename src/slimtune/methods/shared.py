"""Helpers that several params methods share (so that no method imports another unless it
subclasses it): the decoder blocks of a model, the optimizer state of tensors that stop
training, param groups of a selection method, seeded draws."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import SlimtuneError
from .base import ParamsMethod


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks (its qualified name and the list itself)."""
    n_layers = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return name, module
    raise SlimtuneError(
        f"params: cannot find the {n_layers} decoder blocks of {type(model).__name__}"
    )


def drop_optimizer_state(optimizer: Any, params: list[nn.Parameter]) -> None:
    """Forget the optimizer state of tensors that stop training (moments would go stale)."""
    for p in params:
        optimizer.state.pop(p, None)


def groups_including(
    method: ParamsMethod, model: nn.Module, candidates: list[nn.Parameter], weight_decay: float
) -> list[dict[str, Any]]:
    """The base param groups as if every candidate trained now (a selection method freezes and
    unfreezes them during the run; the optimizer must hold them all), flags left as they were."""
    was = [p.requires_grad for p in candidates]
    for p in candidates:
        p.requires_grad_(True)
    try:
        return ParamsMethod.param_groups(method, model, weight_decay)
    finally:
        for p, flag in zip(candidates, was):
            p.requires_grad_(flag)


def seeded_generator(seed: int, salt: int) -> torch.Generator:
    """A CPU generator for a method's random draws: one stream per (run seed, salt), where the
    salt tells draws of one run apart (an interval, a stage, a method's constant)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + salt)
