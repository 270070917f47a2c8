"""The perturbation z: a pure function of (seed, step, sample, tensor, element).

16-bit words from numpy's counter-based Philox generator are mapped through a 65,536-entry table
(Gaussian quantiles by default, so z is N(0, 1) quantised to 16 bits and cut at 4.2 sigma; also
Rademacher or uniform). Any slice of any tensor's z can be generated on its own, so nothing is
ever stored. With a pool (the default), z is cut in blocks from a fixed array of draws at random
offsets, which is several times faster on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch import nn

CHUNK = 1 << 22  # elements of z generated at once by the update (16 MiB of fp32)
POOL_BLOCK = 1 << 16  # elements of z taken as one contiguous slice of the noise pool
MASK_STREAM = 1  # Philox counter word 2: 0 noise, 1 the random gradient-sparsity mask
POOL_STREAM = 3  # Philox counter word 2 of the pool offsets


@cache
def table(kind: str) -> torch.Tensor:
    """Value of z for each 16-bit word: zero mean, unit variance."""
    u = (torch.arange(65536, dtype=torch.float64) + 0.5) / 65536
    if kind == "gaussian":
        t = torch.special.ndtri(u)
    elif kind == "rademacher":
        t = torch.where(u < 0.5, -1.0, 1.0)
    elif kind == "uniform":
        t = (u * 2 - 1) * math.sqrt(3)
    else:  # validated in the config
        raise ValueError(kind)
    return (t / t.pow(2).mean().sqrt()).float()


def words(key: tuple[int, int], stream: tuple[int, int], start: int, n: int) -> torch.Tensor:
    """16-bit words ``start .. start+n`` of Philox stream (key, stream) as int32 (0..65535)."""
    first = start // 16 * 16  # one Philox counter value yields 16 words
    counter = np.array([first // 16, stream[0], stream[1], 0], dtype=np.uint64)
    gen = np.random.Philox(key=np.array(key, dtype=np.uint64), counter=counter)
    raw = gen.random_raw((start + n - first + 3) // 4).view(np.uint16)
    return torch.from_numpy(raw[start - first : start - first + n]).to(torch.int32)


@dataclass
class PerturbedTensor:
    """A perturbed tensor: its index in the noise streams and what masks its z."""

    param: nn.Parameter
    pid: int
    group: int  # index of its optimizer param group (lr, weight decay)
    threshold: torch.Tensor | None = None  # sparse MeZO: perturb only |w| <= threshold


class Noise:
    """Generates z for any slice of a perturbed tensor: ``kind`` (gaussian, rademacher,
    uniform), the fraction ``mask_ratio`` of entries zeroed afresh each key, and a pool of
    ``2**pool_bits`` draws (0: every entry from the counter-based generator)."""

    def __init__(
        self,
        kind: str,
        mask_ratio: float,
        pool_bits: int = 0,
        seed: int = 0,
        device: torch.device | None = None,
    ):
        self.mask_ratio = mask_ratio
        self.table = table(kind)
        self.pool: torch.Tensor | None = None
        if pool_bits:
            # 2**pool_bits draws of the noise, centred and scaled to mean 0 and variance 1
            # exactly, extended by one block so that a slice never wraps.
            size = 1 << pool_bits
            pool = self.table[words((seed, (1 << 63) - 1), (0, 2), 0, size)].double()
            pool = ((pool - pool.mean()) / pool.std(correction=0)).float()
            self.pool = torch.cat([pool, pool[:POOL_BLOCK]]).to(device or torch.device("cpu"))
            self.pool_mask = size - 1

    def z(
        self, t: PerturbedTensor, key: tuple[int, int], start: int, n: int, w: torch.Tensor
    ) -> torch.Tensor:
        """fp32 z of elements ``start .. start+n`` of tensor ``t`` (flat), masked; ``w`` is the
        same slice of the weight (for the sparse-MeZO magnitude mask)."""
        z = self._pool_slices(t, key, start, n) if self.pool is not None else None
        if z is None:
            z = torch.index_select(self.table, 0, words(key, (t.pid, 0), start, n))
        if self.mask_ratio > 0:
            keep = words(key, (t.pid, MASK_STREAM), start, n) >= int(self.mask_ratio * 65536)
            z.mul_(keep)
        if t.threshold is not None:
            z.mul_(w.reshape(-1).abs() <= t.threshold)
        return z.to(w.device).view(w.shape)

    def _pool_slices(
        self, t: PerturbedTensor, key: tuple[int, int], start: int, n: int
    ) -> torch.Tensor:
        """z from the pool: block b of the tensor (POOL_BLOCK elements) is the pool slice at a
        random offset o_b (two 16-bit counter words per block), so z is mean 0, variance 1 and
        uncorrelated between blocks exactly; within a block its correlation is the pool's
        autocorrelation (about 2**(-pool_bits/2)). The host computes two words per block; the
        copy runs as one gather on the pool's device, whatever the tensor's size."""
        b0, b1 = start // POOL_BLOCK, (start + n - 1) // POOL_BLOCK
        w = words(key, (t.pid, POOL_STREAM), 2 * b0, 2 * (b1 - b0 + 1)).view(-1, 2)
        offsets = ((w[:, 0] << 16) | w[:, 1]) & self.pool_mask
        lo = start - b0 * POOL_BLOCK  # where the slice starts in its first block
        if b0 == b1:  # one block: a copy of one slice of the pool
            a = int(offsets[0]) + lo
            return self.pool[a : a + n].clone()
        # All blocks in one gather on the pool's device (no host loop over blocks): row o of
        # the pool's sliding windows of POOL_BLOCK draws is the block that starts at offset o.
        windows = self.pool.unfold(0, POOL_BLOCK, 1)
        rows = windows.index_select(0, offsets.to(self.pool.device, torch.int64))
        return rows.view(-1)[lo : lo + n]

    def z_rows(self, t: PerturbedTensor, key: tuple[int, int], rows: torch.Tensor) -> torch.Tensor:
        """z of the given rows of a 2-D tensor (runs of consecutive rows generated together)."""
        w = t.param
        width = w.shape[1]
        out = torch.empty(len(rows), width, device=w.device)
        r = rows.tolist()
        i = 0
        while i < len(r):
            j = i + 1
            while j < len(r) and r[j] == r[j - 1] + 1:
                j += 1
            out[i:j] = self.z(
                t, key, r[i] * width, (j - i) * width, w.detach()[r[i] : r[j - 1] + 1]
            )
            i = j
        return out
