"""Server-side arithmetic of the adapter strategies: checks, FedAvg, LoRA pairs of equal or
different ranks, and ComPEFT uplink compression. Pure tensor code, no Flower.

LoRA pairs are handled in *unit-scale* form: a client of rank r with scaling s (alpha/r, or
alpha/sqrt(r) with rslora) holds B (out x r) and A (r x in) and adds s B A to the weight; its unit
form is (sqrt(s) B, sqrt(s) A), whose product is the update itself. Two aggregation rules:

* ``separate`` (FS-LLM): average A and B on their own. The product of the averages is not the
  average of the products: the cross terms between clients are lost.
* ``product`` (default): average the updates s B A exactly and re-factorise the average by SVD,
  U S V^T -> B = U sqrt(S), A = sqrt(S) V^T cut to rank r. By Eckart-Young this is the best
  rank-r approximation of the true average, so its error is never larger than ``separate``'s
  (whose product is also rank r); it also gives every rank its best truncation, which is what
  heterogeneous ranks need. Cost: one SVD of an out x in matrix per adapted module and round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

State = dict[str, torch.Tensor]


def check_update(state: State, reference: State, shapes: dict[str, tuple[int, ...]] | None = None):
    """Why an update must be rejected (None: accept): missing or unknown tensors, wrong shapes,
    NaN or inf. ``shapes`` overrides the expected shape of some tensors (heterogeneous ranks)."""
    missing = sorted(set(reference) - set(state))
    if missing:
        return f"missing tensors, e.g. {missing[0]}"
    extra = sorted(set(state) - set(reference))
    if extra:
        return f"unknown tensors, e.g. {extra[0]}"
    for name, t in state.items():
        want = tuple((shapes or {}).get(name, reference[name].shape))
        if tuple(t.shape) != want:
            return f"{name}: shape {tuple(t.shape)}, expected {want}"
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"{name}: contains NaN or inf"
    return None


def fedavg(states: Sequence[State], weights: Sequence[float]) -> State:
    """Weighted average of the tensors (accumulated in fp64, returned in each tensor's dtype).
    One state is returned as it is."""
    if len(states) == 1:
        return {n: t.clone() for n, t in states[0].items()}
    total = float(sum(weights))
    out = {}
    for name, ref in states[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for st, w in zip(states, weights):
            acc.add_(st[name].double(), alpha=w / total)
        out[name] = acc.to(ref.dtype)
    return out


# --- LoRA pairs --------------------------------------------------------------------------------


def lora_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """(A name, B name) of every LoRA pair in a peft state dict."""
    keys = set(names)
    pairs = []
    for n in sorted(keys):
        if ".lora_A." in n:
            b = n.replace(".lora_A.", ".lora_B.")
            if b in keys:
                pairs.append((n, b))
    return pairs


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _rescale(t: torch.Tensor, f: float) -> torch.Tensor:
    return t.clone() if f == 1.0 else (t.double() * f).to(t.dtype)


def aggregate_lora(
    states: Sequence[State],
    weights: Sequence[float],
    scales: Sequence[float],
    ref_scale: float,
    rule: str = "product",
) -> tuple[State, list[tuple[str, str]]]:
    """Aggregate client states whose LoRA ranks may differ. Returns the global state at the
    largest rank, expressed for the scaling ``ref_scale`` (the update is ref_scale B A), with
    the non-LoRA tensors averaged as they are, and the pairs.

    With equal ranks and scalings, ``separate`` is exactly :func:`fedavg`, and one client's
    state comes back unchanged under either rule.
    """
    pairs = lora_pairs(list(states[0]))
    paired = {n for p in pairs for n in p}
    others = [{n: t for n, t in st.items() if n not in paired} for st in states]
    out = fedavg(others, weights) if others[0] else {}
    total = float(sum(weights))
    ranks = [states[c][pairs[0][0]].shape[0] for c in range(len(states))] if pairs else []
    same = len(set(ranks)) <= 1 and len(set(scales)) <= 1
    for a_name, b_name in pairs:
        if len(states) == 1 or (rule == "separate" and same):
            avg = fedavg([{a_name: st[a_name], b_name: st[b_name]} for st in states], weights)
            f = math.sqrt(scales[0] / ref_scale)
            out[a_name], out[b_name] = _rescale(avg[a_name], f), _rescale(avg[b_name], f)
            continue
        r_max = max(st[a_name].shape[0] for st in states)
        dtype = states[0][a_name].dtype
        if rule == "separate":
            # Per rank slot, average over the clients that have it (weights renormalised).
            a_sum = torch.zeros((r_max, states[0][a_name].shape[1]), dtype=torch.float64)
            b_sum = torch.zeros((states[0][b_name].shape[0], r_max), dtype=torch.float64)
            w_slot = torch.zeros(r_max, dtype=torch.float64)
            for st, w, sc in zip(states, weights, scales):
                r, f = st[a_name].shape[0], math.sqrt(sc / ref_scale)
                a_sum[:r] += w * f * st[a_name].double()
                b_sum[:, :r] += w * f * st[b_name].double()
                w_slot[:r] += w
            out[a_name] = (a_sum / w_slot[:, None]).to(dtype)
            out[b_name] = (b_sum / w_slot[None, :]).to(dtype)
            continue
        delta = torch.zeros(
            (states[0][b_name].shape[0], states[0][a_name].shape[1]), dtype=torch.float64
        )
        for st, w, sc in zip(states, weights, scales):
            delta.addmm_(st[b_name].double(), st[a_name].double(), alpha=w * sc / total)
        u, sv, vh = torch.linalg.svd(delta / ref_scale, full_matrices=False)
        root = sv[:r_max].sqrt()
        b_new = torch.zeros((delta.shape[0], r_max), dtype=torch.float64)
        a_new = torch.zeros((r_max, delta.shape[1]), dtype=torch.float64)
        k = root.numel()  # a matrix smaller than the rank leaves the extra slots at zero
        b_new[:, :k] = u[:, :k] * root
        a_new[:k] = root[:, None] * vh[:k]
        out[b_name], out[a_name] = b_new.to(dtype), a_new.to(dtype)
    return out, pairs


def client_view(
    global_state: State, pairs: list[tuple[str, str]], r: int, scale: float, ref_scale: float
) -> State:
    """The global state for a client of rank ``r`` and scaling ``scale``: the first r rank
    slots (the strongest directions after a product aggregation), rescaled."""
    out = dict(global_state)
    f = math.sqrt(ref_scale / scale)
    for a_name, b_name in pairs:
        out[a_name] = _rescale(global_state[a_name][:r], f)
        out[b_name] = _rescale(global_state[b_name][:, :r], f)
    return out


# --- ComPEFT -----------------------------------------------------------------------------------


def compeft_encode(delta: torch.Tensor, density: float) -> dict[str, np.ndarray]:
    """Top ``density`` of |delta| as a packed position bitmap, packed sign bits of the kept
    entries and one scale: the mean |delta| of the kept entries, which is the least-squares
    magnitude for a sign vector on that support."""
    flat = delta.detach().reshape(-1).float()
    k = max(1, int(round(density * flat.numel())))
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[idx] = True
    kept = flat[mask]
    scale = kept.abs().mean()
    return {
        "mask": np.packbits(mask.numpy()),
        "sign": np.packbits((kept < 0).numpy()),
        "scale": np.array([float(scale)], dtype=np.float32),
    }


def compeft_decode(parts: dict[str, np.ndarray], shape: Sequence[int]) -> torch.Tensor:
    n = int(np.prod(shape)) if len(shape) else 1
    mask = torch.from_numpy(np.unpackbits(parts["mask"], count=n).astype(bool))
    k = int(mask.sum())
    neg = torch.from_numpy(np.unpackbits(parts["sign"], count=k).astype(bool))
    out = torch.zeros(n)
    out[mask] = torch.where(neg, -1.0, 1.0) * float(parts["scale"][0])
    return out.view(tuple(shape))


def compeft_pack(deltas: dict[str, torch.Tensor], density: float) -> dict[str, np.ndarray]:
    """ComPEFT of every tensor (in name order) in three arrays: the position bitmaps, the sign
    bits and the scales, each tensor's bits starting on a byte boundary. Three arrays instead
    of three per tensor keep Flower's per-array overhead out of the uplink."""
    parts = [compeft_encode(deltas[n], density) for n in sorted(deltas)]
    return {
        "compeft.mask": np.concatenate([p["mask"] for p in parts]),
        "compeft.sign": np.concatenate([p["sign"] for p in parts]),
        "compeft.scale": np.concatenate([p["scale"] for p in parts]),
    }


def compeft_unpack(
    arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`compeft_pack` for tensors of the given shapes; ValueError when the
    arrays do not hold exactly those tensors."""
    try:
        mask, sign, scale = (arrays[f"compeft.{p}"] for p in ("mask", "sign", "scale"))
    except KeyError as e:
        raise ValueError(f"missing {e.args[0]}") from None
    if any(a.dtype != np.uint8 or a.ndim != 1 for a in (mask, sign)):
        raise ValueError("position bitmap and sign bits must be flat uint8 arrays")
    if scale.shape != (len(shapes),):
        raise ValueError(f"{scale.size} scales for {len(shapes)} tensors")
    out, m0, s0 = {}, 0, 0
    for i, name in enumerate(sorted(shapes)):
        n = int(np.prod(shapes[name])) if len(shapes[name]) else 1
        m_bytes = (n + 7) // 8
        bits = mask[m0 : m0 + m_bytes]
        if bits.size != m_bytes:
            raise ValueError("position bitmap too short")
        k = int(np.unpackbits(bits, count=n).sum())
        s_bytes = (k + 7) // 8
        if sign[s0 : s0 + s_bytes].size != s_bytes:
            raise ValueError("sign bits too short")
        part = {"mask": bits, "sign": sign[s0 : s0 + s_bytes], "scale": scale[i : i + 1]}
        out[name] = compeft_decode(part, shapes[name])
        m0, s0 = m0 + m_bytes, s0 + s_bytes
    if m0 != mask.size or s0 != sign.size:
        raise ValueError("trailing bytes")
    return out
