"""Flower glue: the ServerApp and ClientApp of ``slimtune fed``, byte accounting from the
serialised messages, the simulation entry point and the deployment entry points.

Deployment: ``server_app`` and ``client_app`` below read the recipe (YAML text) from the run
config key ``recipe``; the SuperNode of a site gives its ``partition-id`` (and optionally
``data-path`` and ``memory-budget-mb``) with ``--node-config``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from typing import Any

import numpy as np
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from tqdm.auto import tqdm

from .. import checkpoint, config
from ..config import RunConfig
from ..errors import SlimtuneError
from ..loop import _check_output_dir
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

    @app.train()
    def fit(msg: Message, context: Context) -> Message:
        cfg = _recipe(context, recipe)
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


def run_server(
    grid: Grid, cfg: RunConfig, server: core.Server | None = None, node_wait: float = 300.0
) -> dict[str, Any]:
    """The federated rounds: send the global state, collect, check, aggregate, evaluate, log.
    Writes config.yaml, metrics.jsonl (one row per round), summary.json and the final
    artefacts of the global model to output_dir."""
    f = cfg.federated
    t_start = time.perf_counter()
    run_dir = _check_output_dir(cfg)
    server = server or core.Server(cfg)
    if cfg.overwrite and run_dir.is_dir():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config.dump(cfg))
    metrics = (run_dir / "metrics.jsonl").open("w")

    def write(row: dict[str, Any]) -> None:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()

    before = server.evaluate()
    write({"round": 0, "eval": before})
    rng = np.random.default_rng(f.seed)
    partitions: dict[int, int] = {}  # node id -> partition id
    ups: list[int] = []
    downs: list[int] = []
    raw_ups: list[int] = []
    pups: list[int] = []
    pdowns: list[int] = []
    dropped = 0
    bar = tqdm(
        total=f.rounds, desc=f"fed {f.strategy}", unit="round", disable=not cfg.train.progress
    )
    last_eval = before
    try:
        for rnd in range(f.rounds):
            t0 = time.perf_counter()
            want = f.clients_per_round or f.clients
            nodes = _wait_for_nodes(grid, min(want, f.clients), node_wait)
            if len(nodes) < f.min_clients:
                raise SlimtuneError(
                    f"federated: {len(nodes)} client(s) connected, fewer than "
                    f"min_clients={f.min_clients}"
                )
            _partitions(grid, nodes, partitions, node_wait)
            nodes = sorted(nodes, key=lambda n: (partitions.get(n, 1 << 62), n))
            k = min(want, len(nodes))
            # Node ids are 64-bit unsigned: choose positions, not values (numpy would cast).
            chosen = [nodes[int(i)] for i in sorted(rng.choice(len(nodes), size=k, replace=False))]
            msgs, down, payload_down = [], [], []
            for n in chosen:
                arrays, conf = server.payload(rnd, n)
                content = RecordDict({"arrays": _record(arrays), "config": ConfigRecord(conf)})
                msgs.append(
                    Message(content, dst_node_id=n, message_type="train", group_id=str(rnd + 1))
                )
                down.append(wire_bytes(msgs[-1]))
                payload_down.append(sum(a.nbytes for a in arrays.values()))
            timeout = f.round_timeout or None
            replies = list(grid.send_and_receive(msgs, timeout=timeout))
            ok, failed, up, payload_up = [], [], [], []
            for rep in replies:
                node = rep.metadata.src_node_id
                if rep.has_error():
                    why = _reason(str(rep.error.reason))
                    failed.append({"node": node, "error": why})
                    log.warning("round %d: node %s failed: %s", rnd, node, why)
                    server.delivered(node, rnd, False)
                    continue
                server.delivered(node, rnd, True)
                up.append(wire_bytes(rep))
                m = dict(rep.content["metrics"])
                got = _arrays(rep.content["arrays"])
                payload_up.append(sum(a.nbytes for a in got.values()))
                ok.append((node, got, m))
            for n in set(chosen) - {rep.metadata.src_node_id for rep in replies}:
                server.delivered(n, rnd, False)
                if "raw_bytes" in m:
                    raw_ups.append(int(m["raw_bytes"]))
            missing = len(chosen) - len(replies)
            dropped += missing + len(failed)
            result = server.aggregate(rnd, ok)
            ev = server.evaluate() if result["applied"] else last_eval
            last_eval = ev
            ups += up
            downs += down
            pups += payload_up
            pdowns += payload_down
            row = {
                "round": rnd + 1,
                "clients": chosen,
                "partitions": [partitions.get(n) for n in chosen],
                "replied": len(ok),
                "failed": failed,
                "missing": missing,
                **result,
                "bytes_up": up,
                "bytes_down": down,
                "payload_bytes_up": payload_up,
                "payload_bytes_down": payload_down,
                "client_loss": [m["loss"] for _, _, m in ok],
                "client_seconds": [m["seconds"] for _, _, m in ok],
                "client_ranks": [m.get("rank") for _, _, m in ok],
                "eval": ev,
                "seconds": time.perf_counter() - t0,
            }
            write(row)
            bar.set_postfix(
                up=f"{np.mean(up) / 1024 if up else 0:.1f}KB",
                down=f"{np.mean(down) / 1024:.1f}KB",
                acc=f"{ev.get('accuracy', float('nan')):.3f}",
                loss=f"{ev.get('loss', float('nan')):.3f}",
            )
            bar.update(1)
        bar.close()
        summary = {
            "strategy": f.strategy,
            "params": cfg.params.name,
            "optimizer": cfg.optimizer.name,
            "model": cfg.model.name,
            "rounds": f.rounds,
            "clients": f.clients,
            "local_steps": cfg.train.steps,
            "bytes_up_per_client_round": _stats(ups),
            "bytes_down_per_client_round": _stats(downs),
            "bytes_per_client_round": _stats([u + d for u, d in zip(ups, downs)]),
            "payload_bytes_up_per_client_round": _stats(pups),
            "payload_bytes_down_per_client_round": _stats(pdowns),
            "dropped_or_failed": dropped,
            "eval_before": before,
            "eval_after": last_eval,
            "wall_seconds": time.perf_counter() - t_start,
        }
        if raw_ups and ups:
            summary["uplink_compression"] = float(np.mean(raw_ups) / np.mean(ups))
        checkpoint.publish(run_dir, server.save)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
    finally:
        metrics.close()
        server.close()


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
    _check_output_dir(cfg)
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
