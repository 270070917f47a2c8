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

import torch
from accelerate.utils import set_seed
from torch import nn

from .. import config as config_mod
from .. import registry
from ..assemble import RunResult
from ..config import RunConfig
from ..data import Batches, Example, Splits, load_splits
from ..errors import SlimtuneError
from ..evaluate import evaluate
from ..loop import LocalRound, train
from ..loss import find_head
from ..methods.base import PrepareContext
from ..models import load_recipe_model
from . import partition
from .strategies import Arrays, Local, Strategy
from .strategies.fedavg import lora_info

log = logging.getLogger(__name__)


def validate(cfg: RunConfig) -> None:
    """Checks of the federated section (and its fit with the rest of the recipe)."""
    f = cfg.federated
    strategy = _strategy(f.strategy)
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
        if not strategy.heterogeneous_ranks:
            raise SlimtuneError(
                "config: federated.memory_budgets_mb: heterogeneous ranks need strategy "
                + " or ".join(
                    n for n in registry.names("strategy") if _strategy(n).heterogeneous_ranks
                )
            )
    strategy.validate(cfg)
    if f.compress != "none" and f.memory_budgets_mb:
        raise SlimtuneError(
            "config: federated.compress: ComPEFT with heterogeneous ranks is not supported"
        )
    if f.compress != "none" and not strategy.compression:
        raise SlimtuneError(
            "config: federated.compress: applies to strategy "
            + " or ".join(n for n in registry.names("strategy") if _strategy(n).compression)
            + " only"
        )


def _strategy(name: str) -> type[Strategy]:
    return registry.get("strategy", name)


# --- what every party builds the same way ------------------------------------------------------


class Base:
    """The base model, tokenizer and initial trainable state of a recipe, loaded once per
    process (Flower reuses its simulation actors and ClientApp processes across rounds)."""

    _cache: dict[str, Base] = {}

    def __init__(self, cfg: RunConfig):
        self.model, self.tok = load_recipe_model(cfg.model, place=False, base=cfg.base)
        self.initial: dict[tuple, dict[str, torch.Tensor]] = {}
        self.data: dict[str, Any] = {}

    @classmethod
    def get(cls, cfg: RunConfig) -> Base:
        # asdict of a registered Config includes its name
        key = json.dumps(
            [dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.base)], sort_keys=True
        )
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


# --- heterogeneous clients ---------------------------------------------------------------------


def estimate_lora_mb(model: nn.Module, cfg: RunConfig, r: int, batch: int) -> float:
    """The planner's peak training memory (MB) of the recipe at LoRA rank ``r`` and ``batch``
    (``slimtune plan``'s estimate, on the shape of the loaded model)."""
    from ..plan.planner import plan, workload_of
    from ..plan.shapes import ModelShape

    shape = ModelShape.from_config(model.config.to_dict(), f"model {cfg.model.name!r}")
    params = registry.build("params", dataclasses.replace(cfg.params, r=r))
    optimizer = registry.build("optimizer", cfg.optimizer)
    work = workload_of(cfg, batch=batch)
    return plan(shape, params, optimizer, work, cfg.model.name).peak / 2**20


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


def _client_budget(cfg: RunConfig, pid: int, budget_mb: float | None) -> float | None:
    """The node's memory budget (MB), else the recipe's for partition ``pid``, else None."""
    f = cfg.federated
    if budget_mb is not None:
        return budget_mb
    return f.memory_budgets_mb[pid] if f.memory_budgets_mb else None


def _local_config(
    cfg: RunConfig, params: Any, optimizer: Any, batch: int, examples: int, work: Path
) -> RunConfig:
    """The recipe of the client's local run: its rank, optimizer and batch, quiet, in ``work``,
    with ``train.steps`` set (from local epochs over ``examples`` when train.steps is 0)."""
    tc = cfg.train
    local_cfg = dataclasses.replace(
        cfg,
        params=params,
        optimizer=optimizer,
        train=dataclasses.replace(tc, batch_size=batch, eval_before=False, progress=False),
        output_dir=str(work / "run"),
        overwrite=True,
        resume=False,
    )
    steps = tc.steps or max(1, math.ceil(tc.epochs * examples / (batch * tc.grad_accum)))
    local_cfg.train.steps = steps
    return local_cfg


def _train_local(
    cfg: RunConfig,
    local_cfg: RunConfig,
    strategy: Strategy,
    local: Local,
    base: Base,
    shard: list[Example],
) -> tuple[RunResult, dict[str, torch.Tensor]]:
    """Run slimtune's loop on the shard from the round's global state (the strategy loads it);
    returns the result and the trainable state the local run started from."""
    tc = local_cfg.train
    position = local.rnd * tc.steps * tc.batch_size * tc.grad_accum
    start: dict[str, torch.Tensor] = {}

    def setup(model: nn.Module, opt: torch.optim.Optimizer, method: Any) -> None:
        strategy.load(model, opt, method, local)
        for n, t in method.trainable_state(model).items():
            start[n] = t.detach().clone()

    def on_step(step: int, model: nn.Module, row: dict | None) -> None:
        strategy.on_step(step, row)

    result = train(
        local_cfg,
        splits=Splits(shard, []),
        on_step=on_step,
        local=LocalRound(
            base=(copy.deepcopy(base.model), base.tok),
            position=position,
            calibration=base.calibration(cfg),
            setup=setup,
        ),
    )
    return result, start


def _client_metrics(
    result: RunResult,
    shard: list[Example],
    steps: int,
    t0: float,
    params: Any,
    batch: int,
    est: float | None,
) -> dict[str, Any]:
    """What the client reports next to its upload."""
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
    return metrics


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
    rnd = int(conf["round"])
    strategy = _strategy(cfg.federated.strategy)(cfg)
    arrays = strategy.receive(arrays, conf, memory)
    base = Base.get(cfg)
    shard = load_shard(cfg, base, pid, data_path)
    budget = _client_budget(cfg, pid, budget_mb)
    params, batch, est = cfg.params, cfg.train.batch_size, None
    if budget is not None:
        r, batch, est = choose_rank_batch(base.model, cfg, budget, f"client {pid}")
        params = dataclasses.replace(cfg.params, r=r)
    optimizer = strategy.local_optimizer(cfg.optimizer, rnd, pid)
    work = Path(tempfile.mkdtemp(prefix=f"slimtune-client{pid}-"))
    try:  # the scratch directory goes, whatever fails
        local_cfg = _local_config(cfg, params, optimizer, batch, len(shard), work)
        steps = local_cfg.train.steps
        local = Local(cfg, pid, rnd, arrays, conf, params, budget, base.initial_state(local_cfg))
        t0 = time.perf_counter()
        result, start = _train_local(cfg, local_cfg, strategy, local, base, shard)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    end = result.method.trainable_state(result.model)
    metrics = _client_metrics(result, shard, steps, t0, params, batch, est)
    up, extra = strategy.upload(start, end, local)
    metrics.update(extra)
    return up, metrics


# --- the server --------------------------------------------------------------------------------


class Server:
    """The global state of a federated run, its aggregation and its evaluation. The strategy
    keeps its global state here (``state``, ``scalars``, ``history``, ...)."""

    def __init__(self, cfg: RunConfig):
        validate(cfg)
        self.cfg, self.f = cfg, cfg.federated
        self.strategy: Strategy = _strategy(self.f.strategy)(cfg)
        self.base = Base.get(cfg)
        self._work = tempfile.mkdtemp(prefix="slimtune-server-")
        self.theta0 = self.base.initial_state(cfg)
        self.info = lora_info(cfg)
        self.ref_rank = int(getattr(cfg.params, "r", 0) or 0)
        self.rank = self.ref_rank
        self.build(cfg)
        self.node_round: dict[int, int] = {}  # which round's payload a node holds
        self.strategy.start(self)
        self.eval_examples = load_splits(cfg.data, self.base.tok).eval
        self.sync()

    def build(self, cfg: RunConfig) -> None:
        """(Re)build the server's model and method (at the global rank)."""
        self.model, self.method = self.base.prepared(cfg, Path(self._work))
        self.head = find_head(self.model)
        self.optimizer = None
        self.strategy.on_build(self)

    # --- downlink --------------------------------------------------------------------------
    def payload(self, rnd: int, node: int | None = None) -> tuple[Arrays, dict[str, Any]]:
        """What round ``rnd`` sends to ``node`` (the strategy may send a node only what
        changed since the round it last answered)."""
        conf: dict[str, Any] = {"round": rnd, "ref_rank": self.ref_rank}
        return self.strategy.payload(self, rnd, node, conf)

    def delivered(self, node: int, rnd: int, ok: bool) -> None:
        """Record whether ``node`` answered round ``rnd`` (so it holds that round's scalars or
        tables)."""
        if ok:
            self.node_round[node] = rnd
        else:
            self.node_round.pop(node, None)

    # --- uplink ----------------------------------------------------------------------------
    def aggregate(self, rnd: int, replies: list[tuple[int, Arrays, dict[str, Any]]]) -> dict:
        """Fold the round's replies (node, arrays, metrics) into the global state. Bad updates
        are rejected and logged; with fewer than min_clients accepted the state is unchanged."""
        accepted, rejected = [], []
        # A fixed order (by partition) makes the floating-point sums independent of which
        # client answered first.
        replies = sorted(replies, key=lambda r: (r[2].get("partition", 0), r[0]))
        for node, arrays, metrics in replies:
            decoded, why = self.strategy.decode(self, arrays, metrics)
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
        self.strategy.aggregate(self, rnd, [(d, m) for _, d, m in accepted], weights)
        self.sync()
        out["applied"] = True
        return out

    # --- the global model ------------------------------------------------------------------
    def sync(self) -> None:
        """Put the global state into the server's model."""
        self.strategy.sync(self)

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
