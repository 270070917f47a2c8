"""Helpers that several params methods share (so that no method imports another unless it
subclasses it): the decoder blocks of a model, the optimizer state of tensors that stop
training, param groups of a selection method, seeded draws, the meta-device measurements
the planner prices adapters by, and the sharding refusal of the selection methods."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import SlimtuneError
from .base import ParamsMethod

# sharding_refusal() of the methods that train selected parts of whole tensors (HFT, S2FT, SpIEL)
SELECTS_PARTS = "selects and masks parts of whole tensors, which FSDP splits over processes"


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


TOKENS = 13  # the meta input's token count: a prime no model dimension is likely to equal


def kept_per_token(
    module: nn.Module, width: int | None = None
) -> tuple[bool, float, dict[int, float]]:
    """What autograd keeps for one forward of a peft-wrapped module, measured on the meta
    device: whether its input is kept; the float32 elements per token of every other kept
    tensor that grows with the tokens; and the bytes of kept tensors that do not (a rotation
    built from the tuner's weights, a slice of a shared buffer such as VeRA's projections),
    keyed by the tensor they view so that a buffer shared by every module counts once.
    Parameters are not activations and are left out."""
    if width is None:  # a wrapped linear: its input width
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module.base
        width = base.in_features
    x = torch.empty(1, TOKENS, width, device="meta", requires_grad=True)
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    keeps_input, per_token, fixed = False, 0.0, {}
    seen: set[int] = set()
    for t in kept:
        whole = t._base if t._base is not None else t
        if isinstance(whole, nn.Parameter) or id(whole) in seen:
            continue  # a weight, or a tensor two operations keep (ReLU's output, up's input)
        seen.add(id(whole))
        if whole is x:
            keeps_input = True
        elif TOKENS in whole.shape:
            per_token += whole.numel() / TOKENS * whole.element_size() / 4
        else:
            fixed[id(whole)] = float(whole.numel() * whole.element_size())
    return keeps_input, per_token, fixed


def meta_model(shape: Any) -> nn.Module:
    """The architecture of ``shape`` with meta tensors: sizes without memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**shape.hf_config())
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def layer_of(name: str) -> int | None:
    """The block index in a parameter or module name (``...layers.3...``), None outside blocks."""
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None
