"""``train.sharding: fsdp``: PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) across the
processes of a run, on any device (gloo on CPU, NCCL on CUDA).

Each decoder block is one FSDP unit and the rest of the model (embeddings, final norm, head)
the root unit: every process keeps 1/N of each weight, its gradient and its optimizer state;
a block's weights are gathered for its forward and again for its backward, and gradients are
averaged by reduce-scatter (the same average DDP takes, so the loop's loss normalisation holds
unchanged). slimtune applies FSDP2 itself rather than through accelerate's plugin, because
accelerate enables FSDP on GPUs only, and the same code path must run (and be tested) on CPU
processes; accelerate still launches the processes and wraps the optimizer.

What the loop does differently under sharding (all of it here):

- the model is not wrapped in DDP (FSDP synchronises gradients itself);
- evaluation runs on every process (each forward gathers weights from all), the main process
  logs it;
- where the loop needs whole tensors (the finite check, the final artefact), ``full_weights``
  gathers every unit's weights for the duration of a ``with`` block; the artefact is then the
  same PEFT adapter / HF checkpoint a single process writes;
- a gradient norm comes back as a distributed tensor and is made whole.

Methods that cannot be sharded say why (``sharding_refusal``), and the run stops before it
loads anything; see the README for what was chosen and why.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

MODES = ("none", "fsdp")


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """Shard ``model`` (in place) over the ``world`` processes of the default process group:
    each decoder block one unit, the rest the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .methods.shared import decoder_layers

    model.to(device)
    mesh = init_device_mesh(device.type, (world,))
    _, blocks = decoder_layers(model)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def full_weights(model: nn.Module) -> Iterator[None]:
    """Every process holds the whole weights (as plain tensors, registered on the modules)
    inside the block; sharded again after. A no-op for a model that is not sharded. Every
    process must enter it (the gathers are collective)."""
    if not is_sharded(model):
        yield
        return
    parts = units(model)
    groups = [g for g in (_group(m) for m in parts) if g is not None]
    for m in parts:  # forwards inside the block (evaluation) must not shard them again
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    # FSDP2 shards the weights again before any state_dict() (a pre-hook per module), so that
    # a state dict always holds distributed tensors; the artefact writers (HF, PEFT) read
    # state_dict(), so the hooks are off inside the block and registered again after. Private
    # to FSDP2: torch is pinned exactly (pyproject.toml), and the test of the artefact
    # (tests/test_sharding.py) fails if a torch release changes it.
    for g in groups:
        for handles in (
            g._module_to_pre_save_state_dict_hook_handle,
            g._module_to_pre_load_state_dict_hook_handle,
        ):
            for handle in handles.values():
                handle.remove()
            handles.clear()
    try:
        yield
    finally:
        for m in parts:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)
        for g in groups:
            g._register_state_dict_hooks()


def _group(module: nn.Module) -> Any:
    """FSDP2's parameter group of one unit (None for a unit that owns no parameters)."""
    return module._get_fsdp_state()._fsdp_param_group


def whole(value: Any) -> Any:
    """A distributed tensor (a gradient norm under FSDP) as a plain one; others unchanged."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value
