"""Ferret (Shu et al., 2024, https://arxiv.org/abs/2409.06277): clients take first-order
steps and send their round's update as coordinates on random directions shared through seeds;
the server averages the coordinates and every party replays the tables of all past rounds. The
server sends only the tables a node has not seen."""

from __future__ import annotations

import numpy as np

from ...errors import SlimtuneError
from ...registry import get, register
from .. import seeds
from . import Arrays, Local, Strategy


@register("strategy", "ferret")
class Ferret(Strategy):
    @classmethod
    def validate(cls, cfg) -> None:
        if getattr(get("optimizer", cfg.optimizer.name), "rule", None) is not None:
            raise SlimtuneError(
                "config: optimizer: ferret projects first-order updates; choose a first-order "
                f"optimizer (got {cfg.optimizer.name!r})"
            )

    # --- client ----------------------------------------------------------------------------
    def receive(self, arrays, conf, memory):
        arrays = resolve_history(arrays, conf, memory)
        if memory is not None:
            memory.clear()
            memory.update(arrays, version=int(conf["round"]))
        return arrays

    def load(self, model, opt, method, local: Local) -> None:
        method.load_trainable_state(model, local.theta0)
        rebuild_ferret(list(method.trainable_state(model).values()), local.arrays, self.f)

    def upload(self, start, end, local):
        deltas = [start[n].float() - end[n].float() for n in start]
        counts, coords = seeds.ferret_project(
            deltas, seeds.Directions(self.f.seed), local.rnd, self.f.seeds
        )
        return {"counts": counts, "coords": coords}, {}

    # --- server ----------------------------------------------------------------------------
    def start(self, server) -> None:
        server.history = {}  # aggregated coordinates of every round

    def payload(self, server, rnd, node, conf):
        """The coordinate tables of the rounds the node has not seen (a node that answered
        round h holds those of rounds 0..h-1)."""
        held = server.node_round.get(node, -1) if node is not None else -1
        first = max(held, 0)
        tables = {k: v for k, v in server.history.items() if int(k.split(".")[0][1:]) >= first}
        return tables, {**conf, "base": held}

    def decode(self, server, arrays, metrics):
        counts, coords = arrays.get("counts"), arrays.get("coords")
        n_tensors = len(server.theta0)
        if counts is None or coords is None or counts.shape != (n_tensors,):
            return None, f"expected counts of {n_tensors} tensors and coords"
        if counts.min() < 0 or int(counts.sum()) != coords.shape[0]:
            return None, "coords do not match counts"
        if not np.isfinite(coords).all():
            return None, "coords contain NaN or inf"
        return (counts, coords), None

    def aggregate(self, server, rnd, updates, weights) -> None:
        counts, coords = seeds.ferret_mean([d for d, _ in updates], weights)
        server.history[f"r{rnd}.counts"] = counts
        server.history[f"r{rnd}.coords"] = coords

    def sync(self, server) -> None:
        server.method.load_trainable_state(server.model, server.theta0)
        tensors = list(server.method.trainable_state(server.model).values())
        rebuild_ferret(tensors, server.history, self.f)


def resolve_history(arrays: Arrays, conf, memory):
    """Ferret's coordinate tables of every past round: those sent now, after the ones the
    client kept from the round it last answered (``base``; -1: all were sent)."""
    base = int(conf.get("base", -1))
    if base == -1:
        return dict(arrays)
    if memory is None or memory.get("version") != base:
        raise SlimtuneError(
            f"ferret: the server sent the tables since round {base}, but this client holds "
            f"round {None if memory is None else memory.get('version')}"
        )
    kept = {k: v for k, v in memory.items() if isinstance(v, np.ndarray)}
    return {**kept, **arrays}


def rebuild_ferret(tensors, arrays: Arrays, f) -> None:
    """Apply every past round's aggregated coordinates (``r{i}.counts`` / ``r{i}.coords``)."""
    dirs = seeds.Directions(f.seed)
    rounds = sorted({int(k.split(".")[0][1:]) for k in arrays if k.startswith("r")})
    for i in rounds:
        seeds.apply_ferret_round(
            tensors, arrays[f"r{i}.counts"], arrays[f"r{i}.coords"], dirs, i, f.server_lr, f.clip
        )
