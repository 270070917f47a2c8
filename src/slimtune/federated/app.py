"""Flower glue: the ServerApp and ClientApp of ``slimtune fed``, byte accounting from the
serialised messages, the simulation entry point and the deployment entry points.

Deployment: ``server_app`` and ``client_app`` below read the recipe (YAML text) from the run
config key ``recipe``; the SuperNode of a site gives its ``partition-id`` (and optionally
``data-path`` and ``memory-budget-mb``) with ``--node-config``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from tqdm.auto import tqdm

from .. import checkpoint, config, registry, rundir
from ..config import FederatedConfig, RunConfig
from ..errors import SlimtuneError
from . import core

log = logging.getLogger(__name__)


def wire_bytes(msg: Message) -> int:
    """Bytes of a message as Flower ships it: every object of its tree (the message, its
    records, their arrays) serialised, each distinct object once."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


def _record(arrays: core.Arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _arrays(rec: ArrayRecord) -> core.Arrays:
    return {k: a.numpy() for k, a in rec.items()}


def _recipe(context: Context, recipe: dict | None) -> RunConfig:
    if recipe is None:
        text = context.run_config.get("recipe")
        if not text:
            raise SlimtuneError("run config: 'recipe' (the recipe's YAML text) is required")
        recipe = yaml.safe_load(str(text))
    return config.from_dict(recipe)


# --- client ------------------------------------------------------------------------------------


_MEMORY = "slimtune.memory"


def _load_memory(context: Context) -> dict[str, Any]:
    """What this node kept from earlier rounds (Flower keeps ``context.state`` per node)."""
    if _MEMORY + ".arrays" not in context.state:
        return {}
    meta = dict(context.state[_MEMORY + ".meta"])
    return {**_arrays(context.state[_MEMORY + ".arrays"]), **meta}


def _store_memory(context: Context, memory: dict[str, Any]) -> None:
    if not memory:
        return
    arrays = {k: v for k, v in memory.items() if isinstance(v, np.ndarray)}
    meta = {k: v for k, v in memory.items() if not isinstance(v, np.ndarray)}
    context.state[_MEMORY + ".arrays"] = _record(arrays)  # may be empty: the version counts
    context.state[_MEMORY + ".meta"] = ConfigRecord(meta)


def make_client_app(recipe: dict | None = None) -> ClientApp:
    """The ClientApp; ``recipe`` None reads it from the run config (deployment)."""
    app = ClientApp()
    # Bound here so that a strategy registered outside slimtune (a plug-in, a test) reaches the
    # simulation's worker processes: unpickling this app imports the strategy's module, which
    # registers it there before the recipe is read.
    strategy = None
    if recipe is not None:
        strategy = registry.get("strategy", config.from_dict(recipe).federated.strategy)

    @app.train()
    def fit(msg: Message, context: Context) -> Message:
        cfg = _recipe(context, recipe)
        assert strategy is None or cfg.federated.strategy == strategy.name
        node = context.node_config
        pid = int(node.get("partition-id", 0))
        data_path = node.get("data-path") or None
        budget = node.get("memory-budget-mb")
        memory = _load_memory(context)
        up, metrics = core.client_round(
            cfg,
            pid,
            _arrays(msg.content["arrays"]),
            dict(msg.content["config"]),
            data_path=str(data_path) if data_path else None,
            budget_mb=float(budget) if budget is not None else None,
            memory=memory,
        )
        _store_memory(context, memory)
        metrics["partition"] = pid
        content = RecordDict({"arrays": _record(up), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.query()
    def which(msg: Message, context: Context) -> Message:
        pid = int(context.node_config.get("partition-id", 0))
        return Message(RecordDict({"node": ConfigRecord({"partition": pid})}), reply_to=msg)

    return app


# --- server ------------------------------------------------------------------------------------


def _wait_for_nodes(grid: Grid, want: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < want and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
    return nodes


def _partitions(grid: Grid, nodes: list[int], known: dict[int, int], timeout: float) -> None:
    """Ask nodes not seen before for their partition id (a small query message), so that
    client sampling and aggregation order follow partitions, not Flower's random node ids."""
    new = [n for n in nodes if n not in known]
    if not new:
        return
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in new]
    for rep in grid.send_and_receive(msgs, timeout=timeout):
        if not rep.has_error():
            known[rep.metadata.src_node_id] = int(rep.content["node"]["partition"])


def _reason(text: str) -> str:
    """The line of a client's error report that says what went wrong (Flower and ray wrap it
    in their own tracebacks)."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    found = [x for x in lines if re.search(r"\w*(Error|Exception): ", x)]
    return (found[-1] if found else (lines[-1] if lines else text))[:500]


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "max": 0.0, "total": 0.0}
    return {"mean": float(np.mean(values)), "max": float(max(values)), "total": float(sum(values))}


def _raw_bytes(metrics: dict[str, Any]) -> int | None:
    """The dense size a client reports for its compressed update (``raw_bytes``), or None when
    it reports none or something that is not a byte count."""
    raw = metrics.get("raw_bytes")
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return None
    return int(raw) if math.isfinite(raw) and raw >= 0 else None


def traffic(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The byte and participation fields of summary.json, from the rounds' metrics.jsonl rows
    (so the summary and the rows cannot disagree).

    Per chosen client and round: ``bytes_down``/``payload_bytes_down`` (what was sent to it).
    Per client that replied without an error (``replied_clients``, in the same order):
    ``bytes_up``/``payload_bytes_up`` and ``raw_bytes_up`` (the dense size of its update as an
    uncompressed upload would carry it, None when the strategy does not compress).
    ``bytes_*`` are serialised Flower messages, ``payload_*`` the tensor bytes inside them.

    ``uplink_compression`` is raw tensor bytes / tensor bytes sent, both summed over the same
    replies (those that reported a raw size), so clients that dropped, failed or never
    compressed weigh on neither side; it is absent when no reply reported a raw size."""
    ups, downs, pups, pdowns, per_client = [], [], [], [], []
    raw_sum = sent_sum = compressed = 0
    missing = failed = rejected = 0
    for row in rounds:
        up_of = dict(zip(row["replied_clients"], row["bytes_up"]))
        ups += row["bytes_up"]
        downs += row["bytes_down"]
        pups += row["payload_bytes_up"]
        pdowns += row["payload_bytes_down"]
        per_client += [d + up_of.get(n, 0) for n, d in zip(row["clients"], row["bytes_down"])]
        for raw, sent in zip(row["raw_bytes_up"], row["payload_bytes_up"]):
            if raw is not None:
                raw_sum, sent_sum, compressed = raw_sum + raw, sent_sum + sent, compressed + 1
        missing += row["missing"]
        failed += len(row["failed"])
        rejected += len(row.get("rejected", []))
    out: dict[str, Any] = {
        "bytes_up_per_client_round": _stats(ups),
        "bytes_down_per_client_round": _stats(downs),
        # down + up per chosen client and round (up 0 when it did not reply)
        "bytes_per_client_round": _stats(per_client),
        "payload_bytes_up_per_client_round": _stats(pups),
        "payload_bytes_down_per_client_round": _stats(pdowns),
        "dropped_or_failed": missing + failed,
        "missing": missing,  # no reply within round_timeout
        "failed": failed,  # an error reply
        "rejected": rejected,  # replied, but the update failed the server's checks
    }
    if compressed and sent_sum:
        out["uplink_compression"] = raw_sum / sent_sum
        out["uplink_compression_basis"] = {
            "replies": compressed,
            "raw_bytes": raw_sum,
            "sent_payload_bytes": sent_sum,
        }
    return out


def _own_output_dir(cfg: RunConfig, server: core.Server) -> rundir.RunDir:
    """Take output_dir for the run's life, as a training run does (rundir.RunDir): a second
    run on it is refused, and overwrite empties it only now that set-up succeeded."""
    try:
        owner = rundir.RunDir.acquire(cfg)
    except BaseException:
        server.close()
        raise
    if cfg.overwrite:
        owner.clear()
    return owner


def _write_row(metrics: IO[str], row: dict[str, Any]) -> None:
    metrics.write(json.dumps(row) + "\n")
    metrics.flush()


def _choose(
    grid: Grid,
    f: FederatedConfig,
    rng: np.random.Generator,
    partitions: dict[int, int],
    node_wait: float,
) -> list[int]:
    """The round's clients: wait for enough nodes, learn their partitions, sample in partition
    order."""
    want = f.clients_per_round or f.clients
    nodes = _wait_for_nodes(grid, min(want, f.clients), node_wait)
    if len(nodes) < f.min_clients:
        raise SlimtuneError(
            f"federated: {len(nodes)} client(s) connected, fewer than min_clients={f.min_clients}"
        )
    _partitions(grid, nodes, partitions, node_wait)
    nodes = sorted(nodes, key=lambda n: (partitions.get(n, 1 << 62), n))
    k = min(want, len(nodes))
    # Node ids are 64-bit unsigned: choose positions, not values (numpy would cast).
    return [nodes[int(i)] for i in sorted(rng.choice(len(nodes), size=k, replace=False))]


def _downlink(
    server: core.Server, rnd: int, chosen: list[int]
) -> tuple[list[Message], list[int], list[int]]:
    """The round's train messages, their wire sizes and their tensor payload sizes."""
    msgs, down, payload_down = [], [], []
    for n in chosen:
        arrays, conf = server.payload(rnd, n)
        content = RecordDict({"arrays": _record(arrays), "config": ConfigRecord(conf)})
        msgs.append(Message(content, dst_node_id=n, message_type="train", group_id=str(rnd + 1)))
        down.append(wire_bytes(msgs[-1]))
        payload_down.append(sum(a.nbytes for a in arrays.values()))
    return msgs, down, payload_down


def _exchange(
    grid: Grid, msgs: list[Message], chosen: list[int], timeout: float | None
) -> list[Message]:
    """Send the round's messages and collect the replies, in chosen order (not arrival
    order: the row's lists are reproducible)."""
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    position = {n: i for i, n in enumerate(chosen)}
    replies.sort(key=lambda r: position.get(r.metadata.src_node_id, len(chosen)))
    return replies


@dataclass
class _Uplink:
    """The round's replies sorted out: good updates, error replies, silent nodes, byte counts."""

    ok: list[tuple[int, core.Arrays, dict[str, Any]]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    up: list[int] = field(default_factory=list)
    payload_up: list[int] = field(default_factory=list)
    raw_up: list[int | None] = field(default_factory=list)


def _uplink(server: core.Server, rnd: int, chosen: list[int], replies: list[Message]) -> _Uplink:
    """Sort the replies out, telling the server which nodes answered."""
    got = _Uplink()
    answered = {rep.metadata.src_node_id for rep in replies}
    for rep in replies:
        node = rep.metadata.src_node_id
        if rep.has_error():
            why = _reason(str(rep.error.reason))
            got.failed.append({"node": node, "error": why})
            log.warning("round %d: node %s failed: %s", rnd, node, why)
            server.delivered(node, rnd, False)
            continue
        server.delivered(node, rnd, True)
        m = dict(rep.content["metrics"])
        arrays = _arrays(rep.content["arrays"])
        got.up.append(wire_bytes(rep))
        got.payload_up.append(sum(a.nbytes for a in arrays.values()))
        got.raw_up.append(_raw_bytes(m))
        got.ok.append((node, arrays, m))
    got.missing = [n for n in chosen if n not in answered]
    for n in got.missing:
        log.warning("round %d: node %s sent no reply within the round", rnd, n)
        server.delivered(n, rnd, False)
    return got


def _round(
    grid: Grid,
    cfg: RunConfig,
    server: core.Server,
    rnd: int,
    rng: np.random.Generator,
    partitions: dict[int, int],
    node_wait: float,
    last_eval: dict[str, Any],
) -> dict[str, Any]:
    """One round: choose, send, collect, aggregate, evaluate; returns its metrics.jsonl row
    (its ``eval`` is ``last_eval`` when the global model did not change)."""
    t0 = time.perf_counter()
    chosen = _choose(grid, cfg.federated, rng, partitions, node_wait)
    msgs, down, payload_down = _downlink(server, rnd, chosen)
    replies = _exchange(grid, msgs, chosen, cfg.federated.round_timeout or None)
    got = _uplink(server, rnd, chosen, replies)
    ok = got.ok
    result = server.aggregate(rnd, ok)
    ev = server.evaluate() if result["applied"] else last_eval
    return {
        "round": rnd + 1,
        "clients": chosen,
        "partitions": [partitions.get(n) for n in chosen],
        "replied": len(ok),
        "replied_clients": [n for n, _, _ in ok],
        "failed": got.failed,
        "missing": len(got.missing),
        "missing_clients": got.missing,
        **result,
        "bytes_up": got.up,
        "bytes_down": down,
        "payload_bytes_up": got.payload_up,
        "payload_bytes_down": payload_down,
        "raw_bytes_up": got.raw_up,
        "client_loss": [m.get("loss") for _, _, m in ok],
        "client_steps": [m.get("steps") for _, _, m in ok],
        "client_seconds": [m.get("seconds") for _, _, m in ok],
        "client_ranks": [m.get("rank") for _, _, m in ok],
        "eval": ev,
        "seconds": time.perf_counter() - t0,
    }


def _show(bar: tqdm, up: list[int], down: list[int], ev: dict[str, Any]) -> None:
    bar.set_postfix(
        up=f"{np.mean(up) / 1024 if up else 0:.1f}KB",
        down=f"{np.mean(down) / 1024:.1f}KB",
        acc=f"{ev.get('accuracy', float('nan')):.3f}",
        loss=f"{ev.get('loss', float('nan')):.3f}",
    )
    bar.update(1)


def _summary(
    cfg: RunConfig,
    rows: list[dict[str, Any]],
    before: dict[str, Any],
    last_eval: dict[str, Any],
    t_start: float,
) -> dict[str, Any]:
    """summary.json."""
    f = cfg.federated
    return {
        "strategy": f.strategy,
        "params": cfg.params.name,
        "optimizer": cfg.optimizer.name,
        "model": cfg.model.name,
        "rounds": f.rounds,
        "clients": f.clients,
        "local_steps": cfg.train.steps,  # 0: local_epochs passes over each shard
        **({} if cfg.train.steps else {"local_epochs": cfg.train.epochs}),
        **traffic(rows),
        "eval_before": before,
        "eval_after": last_eval,
        "wall_seconds": time.perf_counter() - t_start,
    }


def run_server(
    grid: Grid, cfg: RunConfig, server: core.Server | None = None, node_wait: float = 300.0
) -> dict[str, Any]:
    """The federated rounds: send the global state, collect, check, aggregate, evaluate, log.
    Writes config.yaml, metrics.jsonl (one row per round), summary.json and the final
    artefacts of the global model to output_dir."""
    f = cfg.federated
    t_start = time.perf_counter()
    run_dir = rundir.check(cfg)
    server = server or core.Server(cfg)
    owner = _own_output_dir(cfg, server)
    metrics = None
    try:  # whatever fails from here on, the lock, the file and the work directory are let go
        (run_dir / "config.yaml").write_text(config.dump(cfg))
        metrics = (run_dir / "metrics.jsonl").open("w")
        before = server.evaluate()
        _write_row(metrics, {"round": 0, "eval": before})
        rng = np.random.default_rng(f.seed)
        partitions: dict[int, int] = {}  # node id -> partition id
        rows: list[dict[str, Any]] = []
        bar = tqdm(
            total=f.rounds, desc=f"fed {f.strategy}", unit="round", disable=not cfg.train.progress
        )
        last_eval = before
        for rnd in range(f.rounds):
            row = _round(grid, cfg, server, rnd, rng, partitions, node_wait, last_eval)
            last_eval = row["eval"]
            _write_row(metrics, row)
            rows.append(row)
            _show(bar, row["bytes_up"], row["bytes_down"], last_eval)
        bar.close()
        summary = _summary(cfg, rows, before, last_eval, t_start)
        checkpoint.publish(run_dir, server.save)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
    finally:
        if metrics is not None:
            metrics.close()
        server.close()
        owner.release()


def make_server_app(
    recipe: dict | None = None, out: dict | None = None, server: core.Server | None = None
) -> ServerApp:
    """The ServerApp; ``recipe`` None reads it from the run config (deployment). ``out``
    receives the summary and ``server`` may be built beforehand (simulation: the ServerApp
    runs in the caller's process)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = _recipe(context, recipe)
        try:
            summary = run_server(grid, cfg, server)
        except SlimtuneError as e:
            if out is not None:
                out["error"] = str(e)
            raise
        if out is not None:
            out["summary"] = summary

    return app


def simulate(cfg: RunConfig) -> dict[str, Any]:
    """Run a recipe on Flower's simulation engine (ray): federated.clients virtual SuperNodes."""
    from flwr.simulation import run_simulation

    core.validate(cfg)
    rundir.check(cfg)
    server = core.Server(cfg)  # bad model or data fail here, before Flower starts
    recipe = cfg.to_dict()
    out: dict[str, Any] = {}
    run_simulation(
        server_app=make_server_app(recipe, out, server),
        client_app=make_client_app(recipe),
        num_supernodes=cfg.federated.clients,
        backend_config={
            "client_resources": {"num_cpus": cfg.federated.cpus_per_client, "num_gpus": 0.0},
            "init_args": {"logging_level": logging.ERROR, "log_to_driver": False},
        },
    )
    if "summary" not in out:
        raise SlimtuneError(
            "federated: " + out.get("error", "the simulation ended without a result (see the log)")
        )
    return out["summary"]


# Deployment: `flwr run` loads these (the recipe comes from the run config).
server_app = make_server_app()
client_app = make_client_app()
