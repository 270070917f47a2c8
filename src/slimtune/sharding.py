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
- evaluation runs on every process (each block's forward gathers its weights from all, the
  root unit is gathered for the whole evaluation), the main process logs it;
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

    # no model.to(device) first: fully_shard moves each unit's tensors to the mesh's device as
    # it shards them, so a GPU never holds more than the shards and one unit whole
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
def full_weights(model: nn.Module, blocks: bool = True) -> Iterator[None]:
    """Every process holds the whole weights (as plain tensors, registered on the modules)
    inside the block; sharded again after. ``blocks=False``: only the root unit's (embeddings,
    final norm, head: what the loss and the evaluation use outside the model's forward), the
    decoder blocks staying sharded and gathered one at a time by their forwards (evaluation).
    A no-op for a model that is not sharded. Every process must enter it (the gathers are
    collective)."""
    if not is_sharded(model):
        yield
        return
    parts = units(model) if blocks else [model]
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


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor, the same on every process) laid out as ``param``: its shard
    where ``param`` is sharded (every process must call it, in the same order)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and not isinstance(value, DTensor):
        value = value.to(device=param.device, dtype=param.dtype)
        return distribute_tensor(value, param.device_mesh, param.placements)
    return value


def local_optimizer_state(optimizer: Any) -> dict[str, Any]:
    """This process's optimizer state as plain tensors (its shards of the moments), for a
    ``torch.save`` file that ``weights_only`` loading reads."""
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    state = {
        k: {n: v.to_local() if isinstance(v, DTensor) else v for n, v in s.items()}
        for k, s in sd["state"].items()
    }
    return {"state": state, "param_groups": sd["param_groups"]}


def load_local_optimizer_state(optimizer: Any, sd: dict[str, Any]) -> None:
    """``local_optimizer_state``'s file back into ``optimizer``: each shard wrapped again as
    its parameter's distributed tensor."""
    from torch.distributed.tensor import DTensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for k, s in sd["state"].items():
        p = params[int(k)]
        state[k] = {
            n: DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.dim() > 0
            else v
            for n, v in s.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
