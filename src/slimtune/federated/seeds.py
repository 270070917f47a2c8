"""Shared-randomness strategies: FedKSeed (K candidate seeds, scalar gradients) and Ferret
(first-order updates projected onto shared random directions).

Both send only scalars and rebuild the weights from the initial trainable state and every
scalar received so far, with the zeroth-order noise generator (``methods/optim/zo/noise.py``),
so the server and every client compute bitwise the same weights from the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..methods.optim.zo import Perturber, ZerothOrderOptimizer
from ..methods.optim.zo.noise import PerturbedTensor

FEDKSEED_TAG = 1 << 40  # key words of the candidate seeds: never those of a plain MeZO step
FERRET_TAG = 1 << 41


# --- FedKSeed ----------------------------------------------------------------------------------


def candidate_key(seed: int, index: int) -> tuple[int, int]:
    """Noise key of candidate seed ``index`` (0 <= index < K) of a run seeded ``seed``."""
    return (seed, FEDKSEED_TAG | index)


def pack_pairs(idx: np.ndarray, val: np.ndarray) -> np.ndarray:
    """(seed index, scalar) pairs as one byte array: uint32 indices, then float32 values
    (little endian). One array instead of two saves a message object on the wire."""
    idx = np.asarray(idx, dtype="<u4")
    val = np.asarray(val, dtype="<f4")
    return np.concatenate([idx.view(np.uint8), val.view(np.uint8)])


def unpack_pairs(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_pairs`; ValueError if the length is not a whole number of pairs."""
    raw = np.ascontiguousarray(buf, dtype=np.uint8)
    if raw.ndim != 1 or raw.size % 8:
        raise ValueError(f"{raw.size} bytes is not a whole number of 8-byte pairs")
    n = raw.size // 8
    return raw[: 4 * n].view("<u4").astype(np.int64), raw[4 * n :].view("<f4").astype(np.float32)


def pro_probabilities(scalars: np.ndarray) -> np.ndarray:
    """FedKSeed-Pro sampling probabilities: softmax of the min-max normalised magnitudes of the
    accumulated scalars (clipped to +-1000); uniform while they are all equal."""
    mag = np.abs(np.clip(scalars.astype(np.float64), -1000, 1000))
    span = mag.max() - mag.min()
    norm = (mag - mag.min()) / span if span > 0 else np.zeros_like(mag)
    e = np.exp(norm - norm.max())
    return e / e.sum()


def rebuild_fedkseed(optimizer: ZerothOrderOptimizer, scalars: np.ndarray, seed: int) -> None:
    """theta = theta_0 + sum_s C_s z_s on the optimizer's tensors (which hold theta_0)."""
    active = {id(t.param): t for t in optimizer.tensors}
    terms = [
        (candidate_key(seed, int(i)), float(scalars[i]), active) for i in np.flatnonzero(scalars)
    ]
    if terms:
        optimizer.add_terms(terms)


# --- Ferret ------------------------------------------------------------------------------------


class Directions:
    """Random directions shared by all parties: direction k of tensor g in round r is the
    zeroth-order noise z (zero mean, unit variance per entry) of key (seed, round, k)."""

    def __init__(self, seed: int, pool_bits: int = 22):
        self.seed = seed
        self.gen = Perturber(nn.Module(), [], "gaussian", 0.0, pool_bits, seed)

    def z(self, rnd: int, g: int, k: int, like: torch.Tensor) -> torch.Tensor:
        key = (self.seed, FERRET_TAG | (rnd << 20) | k)
        flat = like.detach().reshape(-1)
        tensor = PerturbedTensor(like, g, 0)
        return self.gen.z(tensor, key, 0, flat.numel(), flat).reshape(-1).float()


def ferret_counts(deltas: Sequence[torch.Tensor], budget: int) -> list[int]:
    """Directions per tensor: max(floor(||delta_g|| / max ||delta|| * K), 2)."""
    norms = [float(d.float().norm()) for d in deltas]
    top = max(norms) if norms else 0.0
    if top == 0 or not math.isfinite(top):
        return [2] * len(deltas)
    return [max(int(n / top * budget), 2) for n in norms]


def ferret_project(
    deltas: Sequence[torch.Tensor], dirs: Directions, rnd: int, budget: int
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates c_gk = <delta_g, z_gk> / n_g of each tensor's update on its n_g directions.
    Returns (counts int32 [G], coordinates float32 [sum counts])."""
    counts = ferret_counts(deltas, budget)
    coords = []
    for g, (d, n) in enumerate(zip(deltas, counts)):
        flat = d.detach().reshape(-1).float()
        for k in range(n):
            coords.append(float(torch.dot(flat, dirs.z(rnd, g, k, d))) / n)
    return np.asarray(counts, dtype=np.int32), np.asarray(coords, dtype=np.float32)


def ferret_mean(
    tables: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean of coordinate tables, each zero-padded to the largest count per tensor
    (reconstruction is linear, so this is the mean of the reconstructed updates)."""
    counts = np.max(np.stack([c for c, _ in tables]), axis=0).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    total = float(sum(weights))
    out = np.zeros(int(offsets[-1]), dtype=np.float64)
    for (c, v), w in zip(tables, weights):
        pos = 0
        for g, n in enumerate(c):
            out[offsets[g] : offsets[g] + n] += w / total * v[pos : pos + n]
            pos += int(n)
    return counts, out.astype(np.float32)


def ferret_reconstruct(
    counts: np.ndarray, coords: np.ndarray, like: Sequence[torch.Tensor], dirs: Directions, rnd: int
) -> list[torch.Tensor]:
    """u_g = sum_k c_gk z_gk, an unbiased estimate of delta_g (E[z z^T] = I): its relative error
    is about sqrt((d_g + 1) / n_g) for a tensor of d_g entries and n_g directions."""
    out, pos = [], 0
    for g, t in enumerate(like):
        u = torch.zeros(t.numel())
        for k in range(int(counts[g])):
            c = float(coords[pos + k])
            if c:
                u.add_(dirs.z(rnd, g, k, t), alpha=c)
        pos += int(counts[g])
        out.append(u.view(t.shape))
    return out


def apply_ferret_round(
    params: Sequence[torch.Tensor],
    counts: np.ndarray,
    coords: np.ndarray,
    dirs: Directions,
    rnd: int,
    server_lr: float,
    clip: float,
) -> None:
    """theta_g -= server_lr * clip(u_g): one round of the global update, in place."""
    with torch.no_grad():
        for p, u in zip(params, ferret_reconstruct(counts, coords, params, dirs, rnd)):
            if clip > 0:
                norm = float(u.norm())
                if norm > clip:
                    u.mul_(clip / norm)
            p.copy_((p.float() - server_lr * u).to(p.dtype))
