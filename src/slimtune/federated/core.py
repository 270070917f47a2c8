"""The federated runner without the transport: what a client does in a round and what the
server does with the replies. ``app.py`` carries these payloads over Flower.

A payload is a dict of numpy arrays (what travels) plus a dict of scalars (config or metrics).
Every client runs slimtune's own loop (``loop.train`` with a :class:`~slimtune.loop.LocalRound`)
on its shard, starting from the global state of the round.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from torch import nn

from .. import config as config_mod
from .. import registry
from ..config import RunConfig
from ..data import Batches, Example, Splits, load_splits
from ..errors import SlimtuneError
from ..evaluate import evaluate
from ..loop import LocalRound, train
from ..loss import find_head
from ..methods.base import PrepareContext
from ..methods.optim.zo import rules as zo_rules
from ..models import load_recipe_model
from . import aggregate as agg
from . import partition, seeds

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


def validate(cfg: RunConfig) -> None:
    """Checks of the federated section (and its fit with the rest of the recipe)."""
    f = cfg.federated
    for name, value, low in [
        ("rounds", f.rounds, 1),
        ("clients", f.clients, 1),
        ("clients_per_round", f.clients_per_round, 0),
        ("min_clients", f.min_clients, 1),
        ("seeds", f.seeds, 1),
    ]:
        if value < low:
            raise SlimtuneError(f"config: federated.{name}: must be >= {low}, got {value}")
    if f.clients_per_round > f.clients:
        raise SlimtuneError(
            f"config: federated.clients_per_round: {f.clients_per_round} exceeds "
            f"federated.clients={f.clients}"
        )
    if f.min_clients > f.clients:
        raise SlimtuneError(
            f"config: federated.min_clients: {f.min_clients} exceeds federated.clients={f.clients}"
        )
    if not 0 < f.compeft_density <= 1:
        raise SlimtuneError("config: federated.compeft_density: must be in (0, 1]")
    if f.alpha <= 0:
        raise SlimtuneError("config: federated.alpha: must be > 0")
    if f.partition == "files" and len(f.files) != f.clients:
        raise SlimtuneError(
            f"config: federated.files: partition=files needs one file per client "
            f"({f.clients}), got {len(f.files)}"
        )
    if f.memory_budgets_mb:
        if len(f.memory_budgets_mb) != f.clients:
            raise SlimtuneError(
                f"config: federated.memory_budgets_mb: one budget per client ({f.clients}), "
                f"got {len(f.memory_budgets_mb)}"
            )
        if not hasattr(cfg.params, "r"):
            raise SlimtuneError(
                "config: federated.memory_budgets_mb: heterogeneous clients choose a LoRA rank; "
                f"params {cfg.params.name!r} has none"
            )
        if f.strategy != "fedavg":
            raise SlimtuneError(
                "config: federated.memory_budgets_mb: heterogeneous ranks need strategy fedavg"
            )
    opt_cls = registry.get("optimizer", cfg.optimizer.name)
    zeroth = getattr(opt_cls, "rule", None) is not None
    if f.strategy == "fedkseed":
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
    if f.strategy == "ferret" and zeroth:
        raise SlimtuneError(
            "config: optimizer: ferret projects first-order updates; choose a first-order "
            f"optimizer (got {cfg.optimizer.name!r})"
        )
    if f.compress != "none" and f.memory_budgets_mb:
        raise SlimtuneError(
            "config: federated.compress: ComPEFT with heterogeneous ranks is not supported"
        )
    if f.compress != "none" and f.strategy != "fedavg":
        raise SlimtuneError("config: federated.compress: applies to strategy fedavg only")


# --- what every party builds the same way ------------------------------------------------------


class Base:
    """The base model, tokenizer and initial trainable state of a recipe, loaded once per
    process (Flower reuses its simulation actors and ClientApp processes across rounds)."""

    _cache: dict[str, Base] = {}

    def __init__(self, cfg: RunConfig):
        self.model, self.tok = load_recipe_model(cfg.model, place=False)
        self.initial: dict[tuple, dict[str, torch.Tensor]] = {}
        self.data: dict[str, Any] = {}

    @classmethod
    def get(cls, cfg: RunConfig) -> Base:
        key = json.dumps([dataclasses.asdict(cfg.model)], sort_keys=True)
        if key not in cls._cache:
            cls._cache.clear()
            cls._cache[key] = cls(cfg)
        return cls._cache[key]

    def calibration(self, cfg: RunConfig):
        """Calibration batches for methods that prepare from data (CorDA, OwLore, ...): the
        recipe's own data.path, as a single-process run would draw them, read only if a method
        asks, so that every party prepares the same model."""

        def batches():
            try:
                examples = load_splits(cfg.data, self.tok).train
            except SlimtuneError as e:
                raise SlimtuneError(
                    f"params {cfg.params.name!r} calibrates on data; in a federated run every "
                    f"party reads the recipe's data.path for it: {e}"
                ) from None
            cal = Batches(examples, cfg.train.batch_size, cfg.train.seed + 1, 0, 1)
            while True:
                yield cal.next(self.tok.pad_token_id)

        return batches

    def prepared(self, cfg: RunConfig, work: Path) -> tuple[nn.Module, Any]:
        """A fresh copy of the base with the params method applied, initialised from the
        training seed alone (so server and clients agree on the initial state)."""
        method = registry.build("params", cfg.params)
        set_seed(cfg.train.seed)
        ctx = PrepareContext(
            self.tok, work, cfg.train.seed, self.calibration(cfg), extras={"total_steps": 1}
        )
        model = method.prepare(copy.deepcopy(self.model), ctx)
        model.config.use_cache = False
        return model, method

    def initial_state(self, cfg: RunConfig) -> dict[str, torch.Tensor]:
        key = (cfg.params.name, json.dumps(dataclasses.asdict(cfg.params), sort_keys=True))
        if key not in self.initial:
            with tempfile.TemporaryDirectory() as work:
                model, method = self.prepared(cfg, Path(work))
                self.initial[key] = {
                    n: t.detach().clone() for n, t in method.trainable_state(model).items()
                }
        return self.initial[key]


def load_shard(cfg: RunConfig, base: Base, pid: int, data_path: str | None = None) -> list[Example]:
    """Client ``pid``'s training examples (partitioned from data.path, or its own file)."""
    f = cfg.federated
    key = f"{pid}:{data_path}"
    if key in base.data:
        return base.data[key]
    if data_path or f.partition == "files":
        path = data_path or f.files[pid]
        dc = dataclasses.replace(cfg.data, path=path, eval_path=None, eval_size=0.0)
        shard = load_splits(dc, base.tok).train
    else:
        train_examples = load_splits(cfg.data, base.tok).train
        shard = partition.split(train_examples, f.clients, f.partition, f.alpha, f.seed)[pid]
    base.data = {key: shard}
    return shard


def lora_info(cfg: RunConfig) -> tuple[float, bool] | None:
    """(alpha, rslora) when the params method is LoRA-like (has a rank), else None."""
    p = cfg.params
    if hasattr(p, "r") and hasattr(p, "alpha"):
        return float(p.alpha), bool(getattr(p, "rslora", False))
    return None


# --- heterogeneous clients ---------------------------------------------------------------------


def estimate_lora_mb(model: nn.Module, cfg: RunConfig, r: int, batch: int) -> float:
    """A coarse training-memory estimate (MB) of LoRA rank ``r`` at ``batch``: the weights,
    adapter weights + gradients + two AdamW moments, and the activations autograd keeps for
    the blocks (about 16 hidden-size fp32 vectors and 2 MLP-size vectors per token and layer)."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    targets = list(getattr(cfg.params, "target_modules", []) or ["q_proj", "v_proj"])
    adapter = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and any(
            t == "all-linear" or name.endswith(t) for t in targets
        ):
            if name.endswith("lm_head"):
                continue
            adapter += r * (mod.in_features + mod.out_features)
    hidden = getattr(c, "hidden_size", 0)
    inter = getattr(c, "intermediate_size", 4 * hidden)
    layers = getattr(c, "num_hidden_layers", 1)
    tokens = batch * cfg.data.max_seq_len
    acts = tokens * layers * (16 * hidden + 2 * inter) * 4
    logits = min(cfg.train.loss_chunk_tokens, tokens) * getattr(c, "vocab_size", 0) * 4 * 2
    return (weights + adapter * 16 + acts + logits) / 2**20


def choose_rank_batch(
    model: nn.Module, cfg: RunConfig, budget_mb: float, where: str
) -> tuple[int, int, float]:
    """The largest rank in federated.ranks, then the largest batch in federated.batch_sizes,
    whose estimate fits ``budget_mb``; (rank, batch, estimate MB)."""
    f = cfg.federated
    for r in sorted(f.ranks, reverse=True):
        for b in sorted(f.batch_sizes, reverse=True):
            need = estimate_lora_mb(model, cfg, r, b)
            if need <= budget_mb:
                return r, b, need
    least = estimate_lora_mb(model, cfg, min(f.ranks), min(f.batch_sizes))
    raise SlimtuneError(
        f"{where}: memory budget {budget_mb:.0f} MB is below the smallest configuration "
        f"(rank {min(f.ranks)}, batch {min(f.batch_sizes)}: about {least:.0f} MB)"
    )


# --- the client --------------------------------------------------------------------------------


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.contiguous().numpy()


def _np_nbytes(t: torch.Tensor) -> int:
    """``_np(t).nbytes`` without the copy."""
    return t.numel() * (4 if t.dtype == torch.bfloat16 else t.element_size())


def _torch(a: np.ndarray, like: torch.Tensor | None = None) -> torch.Tensor:
    t = torch.from_numpy(np.array(a, copy=True))
    return t.to(like.dtype) if like is not None else t


def client_round(
    cfg: RunConfig,
    pid: int,
    arrays: Arrays,
    conf: dict[str, Any],
    data_path: str | None = None,
    budget_mb: float | None = None,
    memory: dict[str, Any] | None = None,
) -> tuple[Arrays, dict[str, Any]]:
    """One round of client ``pid``: rebuild the global state from ``arrays``, run
    ``train.steps`` local steps on its shard, return what the strategy uploads.

    ``memory`` is what the client keeps between rounds (Flower's per-node context state):
    FedKSeed keeps its copy of the K scalars there and Ferret the coordinate tables of past
    rounds, so the server sends only what changed."""
    f = cfg.federated
    rnd = int(conf["round"])
    if f.strategy == "fedkseed":
        arrays = {"scalars": resolve_scalars(arrays, conf, memory)}
        if memory is not None:
            memory["scalars"], memory["version"] = arrays["scalars"], rnd
    elif f.strategy == "ferret":
        arrays = resolve_history(arrays, conf, memory)
        if memory is not None:
            memory.clear()
            memory.update(arrays, version=rnd)
    base = Base.get(cfg)
    shard = load_shard(cfg, base, pid, data_path)
    tc = cfg.train
    budget = (
        budget_mb
        if budget_mb is not None
        else (f.memory_budgets_mb[pid] if f.memory_budgets_mb else None)
    )
    params, batch, est = cfg.params, tc.batch_size, None
    if budget is not None:
        r, batch, est = choose_rank_batch(base.model, cfg, budget, f"client {pid}")
        params = dataclasses.replace(cfg.params, r=r)
    optimizer = cfg.optimizer
    if f.strategy != "fedkseed" and hasattr(optimizer, "seed"):  # fresh noise every round
        optimizer = dataclasses.replace(optimizer, seed=optimizer.seed + 7919 * rnd + 104729 * pid)
    work = Path(tempfile.mkdtemp(prefix=f"slimtune-client{pid}-"))
    local_cfg = dataclasses.replace(
        cfg,
        params=params,
        optimizer=optimizer,
        train=dataclasses.replace(tc, batch_size=batch, eval_before=False, progress=False),
        output_dir=str(work / "run"),
        overwrite=True,
        resume=False,
    )
    steps = tc.steps or max(1, math.ceil(tc.epochs * len(shard) / (batch * tc.grad_accum)))
    local_cfg.train.steps = steps
    theta0 = base.initial_state(local_cfg)
    start: dict[str, torch.Tensor] = {}
    picks: dict[int, float] = {}  # fedkseed: seed index -> accumulated -lr * g
    pending: list[tuple[int, int, float]] = []  # (step, seed index, lr)
    holder: list[torch.optim.Optimizer] = []

    def setup(model: nn.Module, opt: torch.optim.Optimizer, method: Any) -> None:
        if f.strategy == "fedavg":
            state = {n: _torch(arrays[n]) for n in arrays}
            info = lora_info(cfg)
            if info is not None and budget is not None:
                pairs = agg.lora_pairs(list(state))
                ref = agg.lora_scale(info[0], int(conf["ref_rank"]), info[1])
                mine = agg.lora_scale(info[0], params.r, info[1])
                view = agg.client_view(state, pairs, params.r, mine, ref)
                for a_name, b_name in pairs:  # slots the global state lacks: own fresh init
                    have = view[a_name].shape[0]
                    if have < params.r:
                        view[a_name] = torch.cat([view[a_name], theta0[a_name][have:]])
                        view[b_name] = torch.cat([view[b_name], theta0[b_name][:, have:]], 1)
                state = view
            method.load_trainable_state(model, state)
        elif f.strategy == "fedkseed":
            method.load_trainable_state(model, theta0)
            seeds.rebuild_fedkseed(opt, arrays["scalars"], f.seed)
            probs = seeds.pro_probabilities(arrays["scalars"]) if f.seed_sampling == "pro" else None
            rng = np.random.default_rng([f.seed, rnd, pid])

            def key_source(step: int) -> tuple[int, int]:
                if not pending or pending[-1][0] != step:  # the lr this step's update uses
                    idx = int(rng.choice(f.seeds, p=probs))
                    pending.append((step, idx, opt.param_groups[0]["lr"]))
                return seeds.candidate_key(f.seed, pending[-1][1])

            opt.key_source = key_source
            holder.append(opt)
        else:  # ferret
            method.load_trainable_state(model, theta0)
            tensors = list(method.trainable_state(model).values())
            rebuild_ferret(tensors, arrays, f)
        for n, t in method.trainable_state(model).items():
            start[n] = t.detach().clone()

    def on_step(step: int, model: nn.Module, row: dict | None) -> None:
        if row is None or not holder:
            return
        (_, g, _), (_, idx, lr) = holder[0]._last_terms[0], pending[-1]
        picks[idx] = picks.get(idx, 0.0) - lr * g

    t0 = time.perf_counter()
    try:
        result = train(
            local_cfg,
            splits=Splits(shard, []),
            on_step=on_step,
            local=LocalRound(
                base=(copy.deepcopy(base.model), base.tok),
                position=rnd * steps * batch * tc.grad_accum,
                calibration=base.calibration(cfg),
                setup=setup,
            ),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    end = result.method.trainable_state(result.model)
    metrics: dict[str, Any] = {
        "num_examples": len(shard),
        "loss": float(result.summary["train_loss"]),
        "steps": steps,
        "seconds": time.perf_counter() - t0,
        "tokens_per_s": float(result.summary["tokens_per_s"]),
        "peak_memory_mb": result.summary["peak_memory_bytes"] / 2**20,
        "rank": int(getattr(params, "r", 0) or 0),
        "batch_size": batch,
    }
    if est is not None:
        metrics["estimate_mb"] = est
    if f.strategy == "fedavg":
        if f.compress == "compeft":
            deltas = {n: t.float() - start[n].float() for n, t in end.items()}
            # What the dense update would weigh as compress=none sends it (_np: bf16 as fp32).
            metrics["raw_bytes"] = sum(_np_nbytes(t) for t in end.values())
            return agg.compeft_pack(deltas, f.compeft_density), metrics
        return {n: _np(t) for n, t in end.items()}, metrics
    if f.strategy == "fedkseed":
        idx = np.array(sorted(picks), dtype=np.int64)
        vals = np.array([picks[int(i)] for i in idx], dtype=np.float32)
        return {"picks": seeds.pack_pairs(idx, vals)}, metrics
    deltas = [start[n].float() - end[n].float() for n in start]
    counts, coords = seeds.ferret_project(deltas, seeds.Directions(f.seed), rnd, f.seeds)
    return {"counts": counts, "coords": coords}, metrics


def resolve_scalars(arrays: Arrays, conf: dict[str, Any], memory: dict[str, Any] | None):
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


def resolve_history(arrays: Arrays, conf: dict[str, Any], memory: dict[str, Any] | None):
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


def rebuild_ferret(tensors: list[torch.Tensor], arrays: Arrays, f: Any) -> None:
    """Apply every past round's aggregated coordinates (``r{i}.counts`` / ``r{i}.coords``)."""
    dirs = seeds.Directions(f.seed)
    rounds = sorted({int(k.split(".")[0][1:]) for k in arrays if k.startswith("r")})
    for i in rounds:
        seeds.apply_ferret_round(
            tensors, arrays[f"r{i}.counts"], arrays[f"r{i}.coords"], dirs, i, f.server_lr, f.clip
        )


# --- the server --------------------------------------------------------------------------------


class Server:
    """The global state of a federated run, its aggregation and its evaluation."""

    def __init__(self, cfg: RunConfig):
        validate(cfg)
        self.cfg, self.f = cfg, cfg.federated
        self.base = Base.get(cfg)
        self._work = tempfile.mkdtemp(prefix="slimtune-server-")
        self.theta0 = self.base.initial_state(cfg)
        self.info = lora_info(cfg)
        self.ref_rank = int(getattr(cfg.params, "r", 0) or 0)
        self.rank = self.ref_rank
        self._build(cfg)
        self.state = {n: t.clone() for n, t in self.theta0.items()}  # fedavg
        self.scalars = np.zeros(self.f.seeds, dtype=np.float64)  # fedkseed
        self.history: Arrays = {}  # ferret: aggregated coordinates of every round
        self.snapshots: dict[int, np.ndarray] = {}  # fedkseed: the scalars sent in each round
        self.node_round: dict[int, int] = {}  # fedkseed: which round's scalars a node holds
        self.snapshots[-1] = np.zeros(self.f.seeds, dtype=np.float32)
        self.eval_examples = load_splits(cfg.data, self.base.tok).eval
        self.sync()

    def _build(self, cfg: RunConfig) -> None:
        self.model, self.method = self.base.prepared(cfg, Path(self._work))
        self.head = find_head(self.model)
        self.optimizer = None
        if self.f.strategy == "fedkseed":
            groups = self.method.param_groups(self.model, 0.0)
            self.optimizer = registry.build("optimizer", cfg.optimizer).build(groups, self.model)

    # --- downlink --------------------------------------------------------------------------
    def payload(self, rnd: int, node: int | None = None) -> tuple[Arrays, dict[str, Any]]:
        """What round ``rnd`` sends to ``node``. FedKSeed sends the K scalars, or only those
        that changed since the round whose scalars the node holds, whichever is smaller;
        Ferret sends the coordinate tables the node has not seen."""
        conf: dict[str, Any] = {"round": rnd, "ref_rank": self.ref_rank}
        if self.f.strategy == "fedavg":
            return {n: _np(t) for n, t in self.state.items()}, conf
        if self.f.strategy == "fedkseed":
            cur = self.snapshots.setdefault(rnd, self.scalars.astype(np.float32))
            # A node that never answered holds the initial scalars, all zero (round -1).
            held = self.node_round.get(node, -1) if node is not None else None
            if held is not None and held in self.snapshots:
                diff = np.flatnonzero(cur != self.snapshots[held])
                if diff.size * 8 < cur.nbytes:
                    sync = seeds.pack_pairs(diff, cur[diff])
                    return {"sync": sync}, {**conf, "base": held, "seeds": cur.size}
            return {"scalars": cur}, conf
        # Ferret: the coordinate tables of the rounds the node has not seen (a node that
        # answered round h holds those of rounds 0..h-1).
        held = self.node_round.get(node, -1) if node is not None else -1
        first = max(held, 0)
        tables = {k: v for k, v in self.history.items() if int(k.split(".")[0][1:]) >= first}
        return tables, {**conf, "base": held}

    def delivered(self, node: int, rnd: int, ok: bool) -> None:
        """Record whether ``node`` answered round ``rnd`` (so it holds that round's scalars or
        tables)."""
        if ok:
            self.node_round[node] = rnd
        else:
            self.node_round.pop(node, None)

    # --- uplink ----------------------------------------------------------------------------
    def _expected(self, metrics: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """Shapes of a fedavg reply: the global ones, with LoRA pairs at the client's rank."""
        shapes = {n: tuple(t.shape) for n, t in self.theta0.items()}
        if self.info is not None:
            r = int(metrics.get("rank", self.ref_rank))
            for a_name, b_name in agg.lora_pairs(list(shapes)):
                shapes[a_name] = (r, shapes[a_name][1])
                shapes[b_name] = (shapes[b_name][0], r)
        return shapes

    def _decode(self, arrays: Arrays, metrics: dict[str, Any]) -> tuple[Any, str | None]:
        f = self.f
        if f.strategy == "fedavg":
            shapes = self._expected(metrics)
            if f.compress == "compeft":
                try:
                    deltas = agg.compeft_unpack(arrays, shapes)
                except ValueError as e:
                    return None, f"undecodable ComPEFT update: {e}"
                state = {n: self.state[n].float() + d for n, d in deltas.items()}
            else:
                state = {n: _torch(a) for n, a in arrays.items()}
            ref = self.theta0
            why = agg.check_update(state, ref, shapes)
            return state, why
        if f.strategy == "fedkseed":
            if "picks" not in arrays:
                return None, "missing tensors, e.g. picks"
            try:
                idx, val = seeds.unpack_pairs(arrays["picks"])
            except ValueError as e:
                return None, f"picks: {e}"
            if len(idx) and (idx.min() < 0 or idx.max() >= f.seeds):
                return None, f"seed index outside 0..{f.seeds - 1}"
            if not np.isfinite(val).all():
                return None, "val contains NaN or inf"
            return (idx.astype(np.int64), val.astype(np.float64)), None
        counts, coords = arrays.get("counts"), arrays.get("coords")
        n_tensors = len(self.theta0)
        if counts is None or coords is None or counts.shape != (n_tensors,):
            return None, f"expected counts of {n_tensors} tensors and coords"
        if counts.min() < 0 or int(counts.sum()) != coords.shape[0]:
            return None, "coords do not match counts"
        if not np.isfinite(coords).all():
            return None, "coords contain NaN or inf"
        return (counts, coords), None

    def aggregate(self, rnd: int, replies: list[tuple[int, Arrays, dict[str, Any]]]) -> dict:
        """Fold the round's replies (node, arrays, metrics) into the global state. Bad updates
        are rejected and logged; with fewer than min_clients accepted the state is unchanged."""
        accepted, rejected = [], []
        # A fixed order (by partition) makes the floating-point sums independent of which
        # client answered first.
        replies = sorted(replies, key=lambda r: (r[2].get("partition", 0), r[0]))
        for node, arrays, metrics in replies:
            decoded, why = self._decode(arrays, metrics)
            if why is not None:
                log.warning("round %d: update of node %s rejected: %s", rnd, node, why)
                rejected.append({"node": node, "reason": why})
                continue
            accepted.append((node, decoded, metrics))
        out: dict[str, Any] = {"accepted": len(accepted), "rejected": rejected}
        if len(accepted) < self.f.min_clients:
            log.warning(
                "round %d: %d accepted update(s), fewer than min_clients=%d: global model unchanged",
                rnd,
                len(accepted),
                self.f.min_clients,
            )
            out["applied"] = False
            return out
        weights = [float(m["num_examples"]) for _, _, m in accepted]
        f = self.f
        if f.strategy == "fedavg":
            states = [d for _, d, _ in accepted]
            if self.info is not None:
                alpha, rs = self.info
                scales = [agg.lora_scale(alpha, int(m["rank"]), rs) for _, _, m in accepted]
                ref = agg.lora_scale(alpha, self.ref_rank, rs)
                self.state, pairs = agg.aggregate_lora(
                    states, weights, scales, ref, f.lora_aggregation
                )
                self.rank = self.state[pairs[0][0]].shape[0] if pairs else self.rank
            else:
                self.state = agg.fedavg(states, weights)
        elif f.strategy == "fedkseed":
            total = sum(weights)
            for (_, (idx, val), _), w in zip(accepted, weights):
                np.add.at(self.scalars, idx, w / total * val)
        else:
            counts, coords = seeds.ferret_mean([d for _, d, _ in accepted], weights)
            self.history[f"r{rnd}.counts"] = counts
            self.history[f"r{rnd}.coords"] = coords
        self.sync()
        out["applied"] = True
        return out

    # --- the global model ------------------------------------------------------------------
    def sync(self) -> None:
        """Put the global state into the server's model."""
        f = self.f
        if f.strategy == "fedavg":
            state = self.state
            if self.info is not None:
                pairs = agg.lora_pairs(list(state))
                if pairs and self.rank != getattr(self.method.cfg, "r", self.rank):
                    params = dataclasses.replace(self.cfg.params, r=self.rank)
                    self._build(dataclasses.replace(self.cfg, params=params))
                alpha, rs = self.info
                scale = agg.lora_scale(alpha, self.rank, rs)
                ref = agg.lora_scale(alpha, self.ref_rank, rs)
                state = agg.client_view(state, pairs, self.rank, scale, ref)
            self.method.load_trainable_state(self.model, state)
            return
        self.method.load_trainable_state(self.model, self.theta0)
        if f.strategy == "fedkseed":
            seeds.rebuild_fedkseed(self.optimizer, self.scalars.astype(np.float32), f.seed)
        else:
            tensors = list(self.method.trainable_state(self.model).values())
            rebuild_ferret(tensors, self.history, f)

    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in self.method.trainable_state(self.model).items()}

    def evaluate(self) -> dict[str, Any]:
        if not self.eval_examples:
            return {}
        ev = dataclasses.replace(self.cfg.eval, generate=0)
        return evaluate(
            self.model,
            self.base.tok,
            self.head,
            self.eval_examples,
            ev,
            self.cfg.train.loss_chunk_tokens,
        )

    def save(self, out_dir: Path) -> None:
        self.method.save(self.model, self.base.tok, out_dir)

    def close(self) -> None:
        shutil.rmtree(self._work, ignore_errors=True)


def config_text(cfg: RunConfig) -> str:
    return config_mod.dump(cfg)
