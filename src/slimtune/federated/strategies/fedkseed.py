"""FedKSeed (Qin et al., 2024, https://arxiv.org/abs/2312.06353): clients run MeZO steps whose
perturbations come from K candidate seeds shared by everyone, so an update is a list of
{seed index: accumulated -lr * g} pairs and the global model is the initial one plus the
replay of K scalars. The server sends the K scalars, or only the changed ones; a client keeps
its copy between rounds (Flower's per-node state)."""

from __future__ import annotations

import numpy as np

from ...errors import SlimtuneError
from ...methods.optim.zo import rules as zo_rules
from ...registry import build, get, register
from .. import seeds
from . import Local, Strategy


@register("strategy", "fedkseed")
class FedKSeed(Strategy):
    @classmethod
    def validate(cls, cfg) -> None:
        f = cfg.federated
        opt_cls = get("optimizer", cfg.optimizer.name)
        zeroth = getattr(opt_cls, "rule", None) is not None
        if not zeroth or opt_cls.rule is not zo_rules.SGD or hasattr(cfg.optimizer, "sparsity"):
            raise SlimtuneError(
                "config: optimizer: federated.strategy fedkseed runs MeZO steps; set optimizer "
                f"to mezo (got {cfg.optimizer.name!r})"
            )
        o = cfg.optimizer
        if o.samples != 1 or o.blockwise or o.mask_ratio or o.estimator != "two-point":
            raise SlimtuneError(
                "config: optimizer: fedkseed needs one two-point perturbation per step "
                "(samples 1, blockwise false, mask_ratio 0, estimator two-point)"
            )
        if o.weight_decay:
            raise SlimtuneError(
                "config: optimizer.weight_decay: fedkseed rebuilds the weights from seeds and "
                "scalars only; set it to 0"
            )
        if f.seeds >= 1 << 20:
            raise SlimtuneError("config: federated.seeds: at most 1048575 candidate seeds")

    # --- client ----------------------------------------------------------------------------
    def receive(self, arrays, conf, memory):
        scalars = resolve_scalars(arrays, conf, memory)
        if memory is not None:
            memory["scalars"], memory["version"] = scalars, int(conf["round"])
        return {"scalars": scalars}

    def local_optimizer(self, spec, rnd, pid):
        return spec  # the perturbations come from the shared seeds, not the optimizer's seed

    def load(self, model, opt, method, local: Local) -> None:
        f = self.f
        method.load_trainable_state(model, local.theta0)
        scalars = local.arrays["scalars"]
        seeds.rebuild_fedkseed(opt, scalars, f.seed)
        probs = seeds.pro_probabilities(scalars) if f.seed_sampling == "pro" else None
        rng = np.random.default_rng([f.seed, local.rnd, local.pid])
        self.picks: dict[int, float] = {}  # seed index -> accumulated -lr * g
        self.pending: list[tuple[int, int, float]] = []  # (step, seed index, lr)
        pending = self.pending

        def key_source(step: int) -> tuple[int, int]:
            if not pending or pending[-1][0] != step:  # the lr this step's update uses
                idx = int(rng.choice(f.seeds, p=probs))
                pending.append((step, idx, opt.param_groups[0]["lr"]))
            return seeds.candidate_key(f.seed, pending[-1][1])

        opt.key_source = key_source
        self.opt = opt

    def on_step(self, step, row) -> None:
        if row is None:
            return
        (_, g, _), (_, idx, lr) = self.opt.last_terms[0], self.pending[-1]
        self.picks[idx] = self.picks.get(idx, 0.0) - lr * g

    def upload(self, start, end, local):
        idx = np.array(sorted(self.picks), dtype=np.int64)
        vals = np.array([self.picks[int(i)] for i in idx], dtype=np.float32)
        return {"picks": seeds.pack_pairs(idx, vals)}, {}

    # --- server ----------------------------------------------------------------------------
    def start(self, server) -> None:
        server.scalars = np.zeros(self.f.seeds, dtype=np.float64)
        server.snapshots = {-1: np.zeros(self.f.seeds, dtype=np.float32)}  # sent per round

    def on_build(self, server) -> None:
        groups = server.method.param_groups(server.model, 0.0)
        server.optimizer = build("optimizer", self.cfg.optimizer).build(groups, server.model)

    def payload(self, server, rnd, node, conf):
        """The K scalars, or only those that changed since the round whose scalars the node
        holds, whichever is smaller."""
        cur = server.snapshots.setdefault(rnd, server.scalars.astype(np.float32))
        # A node that never answered holds the initial scalars, all zero (round -1).
        held = server.node_round.get(node, -1) if node is not None else None
        if held is not None and held in server.snapshots:
            diff = np.flatnonzero(cur != server.snapshots[held])
            if diff.size * 8 < cur.nbytes:
                sync = seeds.pack_pairs(diff, cur[diff])
                return {"sync": sync}, {**conf, "base": held, "seeds": cur.size}
        return {"scalars": cur}, conf

    def decode(self, server, arrays, metrics):
        if "picks" not in arrays:
            return None, "missing tensors, e.g. picks"
        try:
            idx, val = seeds.unpack_pairs(arrays["picks"])
        except ValueError as e:
            return None, f"picks: {e}"
        if len(idx) and (idx.min() < 0 or idx.max() >= self.f.seeds):
            return None, f"seed index outside 0..{self.f.seeds - 1}"
        if not np.isfinite(val).all():
            return None, "val contains NaN or inf"
        return (idx.astype(np.int64), val.astype(np.float64)), None

    def aggregate(self, server, rnd, updates, weights) -> None:
        total = sum(weights)
        for ((idx, val), _), w in zip(updates, weights):
            np.add.at(server.scalars, idx, w / total * val)

    def sync(self, server) -> None:
        server.method.load_trainable_state(server.model, server.theta0)
        seeds.rebuild_fedkseed(server.optimizer, server.scalars.astype(np.float32), self.f.seed)


def resolve_scalars(arrays, conf, memory):
    """FedKSeed's K scalars from a dense download, or from the client's stored copy plus the
    entries that changed since the round it was stored (``sync``: packed pairs)."""
    if "scalars" in arrays:
        return np.asarray(arrays["scalars"], dtype=np.float32)
    base = int(conf.get("base", -1))
    if base == -1:  # changes since the initial scalars (all zero), which need no memory
        memory = {"version": -1, "scalars": np.zeros(int(conf["seeds"]), dtype=np.float32)}
    if memory is None or memory.get("version") != base:
        raise SlimtuneError(
            f"fedkseed: the server sent changes since round {base}, but this client holds "
            f"round {None if memory is None else memory.get('version')}"
        )
    idx, val = seeds.unpack_pairs(arrays["sync"])
    out = np.array(memory["scalars"], dtype=np.float32, copy=True)
    out[idx] = val
    return out
