"""Federated fine-tuning of SmolLM2-135M on SST-2 split over clients (Flower simulation).

For each strategy: bytes per client per round (up and down, from the serialised Flower
messages, and the arrays' own bytes) and the held-out metric after R rounds, beside the
zero-shot metric of the same held-out set. Each row is one ``slimtune fed`` simulation run in
its own process.

    .venv/bin/python benchmarks/federated.py --out bench-out/federated.md
    .venv/bin/python benchmarks/federated.py --rows "fedkseed;ferret" --rounds 2

Targets (issue 6): fedkseed <= 18 KB per client per round at K=4096 and 200 local steps;
ComPEFT >= 8x smaller uplink than raw adapters; every strategy above zero-shot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from tasks import demo_task  # noqa: E402

from slimtune.bench import run_worker  # noqa: E402

# each configuration runs in a fresh process: this script with --worker SPEC.json
WORKER = [sys.executable, __file__, "--worker"]

LORA = {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}

# name: (optimizer, train overrides, federated overrides)
ROWS: dict[str, tuple[dict, dict, dict]] = {
    "fedavg LoRA": ({"name": "adamw", "lr": 1e-3}, {"steps": 20}, {"strategy": "fedavg"}),
    "fedavg LoRA (A, B averaged apart)": (
        {"name": "adamw", "lr": 1e-3},
        {"steps": 20},
        {"strategy": "fedavg", "lora_aggregation": "separate"},
    ),
    "fedavg LoRA + ComPEFT": (
        {"name": "adamw", "lr": 1e-3},
        {"steps": 20},
        {"strategy": "fedavg", "compress": "compeft", "compeft_density": 0.1},
    ),
    "fedkseed": (
        {"name": "mezo", "lr": 1e-4, "eps": 1e-2},
        {"steps": 200, "batch_size": 4},
        {"strategy": "fedkseed", "seeds": 4096},
    ),
    "ferret": (
        {"name": "sgd", "lr": 1e-2},
        {"steps": 20},
        {"strategy": "ferret", "seeds": 200, "server_lr": 1.0},
    ),
}


def recipe(
    row: str, rounds: int, clients: int, eval_size: int, out: str, split: dict[str, Any]
) -> dict[str, Any]:
    optim, train, fed = ROWS[row]
    return {
        "model": {"name": "smollm2-135m"},
        "data": demo_task(192, eval_size),
        "params": LORA,
        "optimizer": optim,
        "train": {
            "batch_size": 8,
            "schedule": "constant",
            "warmup_steps": 0,
            "progress": False,
            **train,
        },
        "eval": {"batch_size": 16},
        "federated": {"rounds": rounds, "clients": clients, **split, **fed},
        "output_dir": out,
        "overwrite": True,
    }


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from slimtune import config
    from slimtune.console import quiet_libraries
    from slimtune.federated.app import simulate

    quiet_libraries()
    summary = simulate(config.from_dict(spec["recipe"]))
    Path(spec["result"]).write_text(json.dumps(summary))


def kb(x: float) -> str:
    return f"{x / 1024:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--rows", default=";".join(ROWS), help="row names separated by ;")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument(
        "--alpha", type=float, default=0.0, help="Dirichlet label skew (0: IID split)"
    )
    parser.add_argument("--work", default="bench-out/federated")
    parser.add_argument("--out", default="bench-out/federated.md")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    rows = [r.strip() for r in args.rows.split(";") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    results: dict[str, Any] = {}
    raw_file = Path(args.work) / "results.json"
    if raw_file.exists():
        results = json.loads(raw_file.read_text())
    for row in rows:
        work = Path(args.work) / row.replace(" ", "_").replace("/", "").replace(",", "")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        split = {"partition": "dirichlet", "alpha": args.alpha} if args.alpha else {}
        rec = recipe(row, args.rounds, args.clients, args.eval_size, str(work / "run"), split)
        print(f"{row}: running ({args.rounds} rounds, {args.clients} clients)", flush=True)
        res = run_worker(WORKER, row, rec, work)
        res["recipe"] = rec
        res["per_round"] = [
            json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()
        ]
        results[row] = res
        raw_file.write_text(json.dumps(results, indent=1))
        print(f"{row}: done in {res['wall_s']:.0f} s", flush=True)

    lines = [
        f"SmolLM2-135M-Instruct, SST-2 (demo task) split "
        f"{f'by Dirichlet({args.alpha}) over labels' if args.alpha else 'IID'} over "
        f"{args.clients} clients, "
        f"{args.eval_size} held-out examples scored by the label words; LoRA r 8 on q/v; "
        "Flower simulation engine. Bytes are per client per round: `wire` is the serialised "
        "Flower message (every object of the message tree once), `arrays` the payload arrays.",
        "",
        "| strategy | local steps x batch | rounds | up wire KB | up arrays KB | down wire KB "
        "| down arrays KB | up+down KB (max) | held-out acc | loss | zero-shot acc | loss "
        "| wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, res in results.items():
        rec = res["recipe"]
        up, down = res["bytes_up_per_client_round"], res["bytes_down_per_client_round"]
        pup = res["payload_bytes_up_per_client_round"]
        pdown = res["payload_bytes_down_per_client_round"]
        both = res["bytes_per_client_round"]
        b, a = res["eval_before"], res["eval_after"]
        lines.append(
            f"| {row} | {rec['train']['steps']} x {rec['train']['batch_size']} "
            f"| {res['rounds']} | {kb(up['mean'])} | {kb(pup['mean'])} | {kb(down['mean'])} "
            f"| {kb(pdown['mean'])} | {kb(both['max'])} | {a.get('accuracy', 0):.4f} "
            f"| {a.get('loss', 0):.4f} | {b.get('accuracy', 0):.4f} | {b.get('loss', 0):.4f} "
            f"| {res['wall_s']:.0f} |"
        )
    if "fedavg LoRA" in results and "fedavg LoRA + ComPEFT" in results:
        raw = results["fedavg LoRA"]["bytes_up_per_client_round"]["mean"]
        comp = results["fedavg LoRA + ComPEFT"]["bytes_up_per_client_round"]["mean"]
        lines += ["", f"ComPEFT uplink: {raw / comp:.1f}x smaller than raw adapters (wire bytes)."]
    if "fedkseed" in results:
        both = results["fedkseed"]["bytes_per_client_round"]
        lines.append(
            f"fedkseed up+down per client per round: mean {kb(both['mean'])} KB, "
            f"max {kb(both['max'])} KB (target <= 18 KB)."
        )
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
