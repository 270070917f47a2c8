"""Measured memory: peak RSS of this process on CPU, peak allocated bytes on CUDA."""

from __future__ import annotations

import ctypes
import resource
import sys

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def peak_bytes(device: torch.device | str = "cpu") -> int:
    """Peak memory of this process so far: CUDA max allocated, else the CPU high-water RSS."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def current_rss() -> int:
    """Resident set size now (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize()
    except OSError:
        return peak_bytes("cpu")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer keeps per parameter (moments, bases, histories), on
    this process (under FSDP: its shards)."""
    from torch.distributed.tensor import DTensor

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    seen: dict[int, int] = {}  # by storage: bitsandbytes' 8-bit maps are shared by every tensor
    for state in inner.state.values():
        for t in state.values():
            if isinstance(t, DTensor):
                t = t.to_local()
            if isinstance(t, torch.Tensor):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is None:
        try:
            lib = ctypes.CDLL("libc.so.6")
            lib.malloc_trim  # noqa: B018 (glibc only)
            _LIBC = lib
        except (OSError, AttributeError):
            return None
    return _LIBC


def trim_heap() -> bool:
    """glibc: hand the free pages inside the heap back to the OS (``malloc_trim(0)``). False
    where the C library is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def trim_after_blocks(model: nn.Module) -> list[RemovableHandle]:
    """Trim the heap after every forward of a transformer block (in forward and in the
    recomputation of activation checkpointing).

    On CPU, tensors go through glibc's malloc. Activations of a block are mostly a few MiB each,
    so glibc serves them from its heap, and a heap that long-lived tensors (block inputs, kept
    for backward) pin in between keeps the freed pages resident: peak RSS ends up hundreds of MB
    above the live tensors. Trimming after each block returns those pages; the price is page
    faults when they are used again (a few percent of step time). Blocks are the model's
    ``GradientCheckpointingLayer``s (every transformers decoder layer), else the longest
    ``nn.ModuleList``. Returns the hook handles; none where the C library is not glibc."""
    if _libc() is None:
        return []
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        blocks = list(max(lists, key=len)) if lists else []

    def hook(*_: object) -> None:  # returns None: a forward hook's return value replaces output
        trim_heap()

    return [b.register_forward_hook(hook) for b in blocks]
