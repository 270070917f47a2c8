"""Seeded partitioners: which training examples each client holds."""

from __future__ import annotations

import numpy as np

from ..data import Example
from ..errors import SlimtuneError


def iid(n: int, clients: int, seed: int) -> list[list[int]]:
    """A seeded shuffle cut into ``clients`` parts whose sizes differ by at most one."""
    order = np.random.default_rng(seed).permutation(n)
    return [sorted(part.tolist()) for part in np.array_split(order, clients)]


def dirichlet(labels: list[int], clients: int, alpha: float, seed: int) -> list[list[int]]:
    """Label skew: the examples of each label are split over the clients in proportions drawn
    from Dirichlet(alpha) (small alpha: each client sees few labels). A client left empty takes
    one example from the largest client, so every client can train."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(clients)]
    labels_arr = np.asarray(labels)
    for label in np.unique(labels_arr):
        idx = rng.permutation(np.flatnonzero(labels_arr == label))
        share = rng.dirichlet([alpha] * clients)
        cuts = (np.cumsum(share)[:-1] * len(idx)).round().astype(int)
        for c, piece in enumerate(np.split(idx, cuts)):
            parts[c].extend(piece.tolist())
    for c in range(clients):
        if not parts[c]:
            donor = max(range(clients), key=lambda i: len(parts[i]))
            if len(parts[donor]) < 2:
                raise SlimtuneError(
                    f"federated: {clients} clients but only {len(labels)} training examples"
                )
            parts[c].append(parts[donor].pop())
    return [sorted(p) for p in parts]


def split(
    examples: list[Example], clients: int, how: str, alpha: float, seed: int
) -> list[list[Example]]:
    """Partition examples for ``how`` in {iid, dirichlet}; raises SlimtuneError on bad input."""
    if len(examples) < clients:
        raise SlimtuneError(
            f"federated.clients: {clients} clients but only {len(examples)} training examples"
        )
    if how == "iid":
        parts = iid(len(examples), clients, seed)
    elif how == "dirichlet":
        labels = [ex.answer for ex in examples]
        if any(label is None for label in labels):
            raise SlimtuneError(
                "federated.partition: dirichlet splits by label and needs labelled examples "
                "(data.format: classification)"
            )
        parts = dirichlet(labels, clients, alpha, seed)  # type: ignore[arg-type]
    else:
        raise SlimtuneError(f"federated.partition: {how!r} is not split from one file")
    return [[examples[i] for i in part] for part in parts]
