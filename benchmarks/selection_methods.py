"""Layer and parameter selection methods against full fine-tuning and LoRA (SmolLM2-135M, CPU).

Every row fine-tunes the bundled fp32 SmolLM2-135M-Instruct with AdamW (OwLore+GaLore: GaLore)
for the same number of steps, twice, each run in a fresh subprocess (peak RSS = its own
``ru_maxrss`` via ``os.wait4``):

1. memory and speed: batch 4 x 256 tokens packed from the SST-2 validation sentences, so every
   step has the same shape and only what a method keeps can move the peak; no evaluation.
   LISA and OwLore re-sample every ``--interval`` steps; the run is long enough for
   ``--switches`` switches, and the table compares the peak RSS at the end with the peak at the
   end of the first interval (from ``metrics.jsonl``, where ``peak_mem_mb`` is the high-water
   mark so far).
2. held-out metric: the demo task (SST-2 prompt and label words, batch 4, at most 256 tokens),
   the same number of steps, then held-out accuracy and loss.

``train.trim_memory`` is on for every row, so that heap fragmentation does not mask what each
method keeps.

    .venv/bin/python benchmarks/selection_methods.py --out bench-out/selection.md

About 3 minutes a row on 2 cores at the defaults (21 steps, 128 held-out examples).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tasks import demo_task, packed_sst2, write_report

from slimtune.bench import run_worker

# each configuration runs in a fresh process: this script with --worker SPEC.json
WORKER = [sys.executable, __file__, "--worker"]

ROWS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # row -> (params, optimizer)
    "full AdamW": ({"name": "full"}, {"name": "adamw", "lr": 1e-5}),
    "LoRA r8 q/k/v/o": (
        {
            "name": "lora",
            "r": 8,
            "alpha": 16,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        },
        {"name": "adamw", "lr": 3e-4},
    ),
    "LISA (gamma 2)": ({"name": "lisa", "layers": 2}, {"name": "adamw", "lr": 2e-5}),
    "OwLore (gamma 2)": ({"name": "owlore", "layers": 2}, {"name": "adamw", "lr": 2e-5}),
    "OwLore+GaLore (gamma 2)": (
        {"name": "owlore", "layers": 2},
        {"name": "galore", "lr": 2e-5, "rank": 8, "scale": 4.0},
    ),
    "HFT": ({"name": "hft"}, {"name": "adamw", "lr": 1e-5}),
    "S2FT": ({"name": "s2ft"}, {"name": "adamw", "lr": 2e-4}),
    "SpIEL (density 0.01)": (
        {"name": "spiel", "density": 0.01, "update_every": 5, "grow_window": 2},
        {"name": "adamw", "lr": 2e-4},
    ),
}
SAMPLED = {"LISA (gamma 2)", "OwLore (gamma 2)", "OwLore+GaLore (gamma 2)"}


def recipe(
    row: str, part: str, steps: int, interval: int, eval_size: int, out: str
) -> dict[str, Any]:
    params, optim = (dict(x) for x in ROWS[row])
    if row in SAMPLED:
        params["interval"] = interval
    if part == "memory":
        data = packed_sst2(eval_size=0)
    else:
        data = demo_task(256, eval_size)
    return {
        "model": {"name": "smollm2-135m", "dtype": "fp32", "device": "cpu"},
        "data": data,
        "params": params,
        "optimizer": optim,
        "train": {
            "steps": steps,
            "batch_size": 4,
            "schedule": "constant",
            "warmup_steps": 0,
            "progress": False,
            "eval_before": False,
            "trim_memory": True,
        },
        "eval": {"batch_size": 16, "generate": 0},
        "output_dir": out,
        "overwrite": True,
    }


def worker(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    from slimtune import config, loop

    retained: list[float] = []

    def on_step(step: int, model: Any, row: dict[str, Any] | None) -> None:
        if row is not None:  # resident memory between steps: what the method keeps
            retained.append(int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20)

    result = loop.train(config.from_dict(spec["recipe"]), on_step=on_step)
    rows = [
        json.loads(x)
        for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()
        if '"eval"' not in x
    ]
    after = result.summary.get("eval_after") or {}
    out = {
        "step_s": [r["step_s"] for r in rows],
        "peak_mb": [r["peak_mem_mb"] for r in rows],
        "retained_mb": retained,
        "trainable_fraction": result.summary["trainable_fraction"],
        "eval_loss": after.get("loss"),
        "eval_accuracy": after.get("accuracy"),
    }
    Path(spec["result"]).write_text(json.dumps(out))


def run_row(row: str, args: argparse.Namespace, reuse: dict[str, Any] | None) -> dict[str, Any]:
    """The memory/speed run, then the held-out-metric run, each in a fresh process (the metric
    taken from ``reuse``, an earlier result of the same metric recipe, when given)."""
    res: dict[str, Any] = {}
    steps = {
        "memory": args.interval * args.switches + 1 if row in SAMPLED else args.fixed_steps,
        "metric": args.metric_steps,
    }
    for part in ("memory", "metric"):
        if part == "metric" and reuse is not None:
            res[part] = reuse
            continue
        with tempfile.TemporaryDirectory(prefix="selection-bench-") as tmp:
            work = Path(tmp)
            rec = recipe(row, part, steps[part], args.interval, args.eval_size, str(work / "run"))
            res[part] = run_worker(WORKER, row, rec, work)
    m = res["memory"]
    return {
        **{k: m[k] for k in ("step_s", "peak_mb", "retained_mb", "trainable_fraction", "peak_rss")},
        "eval_loss": res["metric"]["eval_loss"],
        "eval_accuracy": res["metric"]["eval_accuracy"],
        "metric_reused": reuse is not None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=int, default=5, help="LISA/OwLore steps per sample")
    parser.add_argument("--switches", type=int, default=10)
    parser.add_argument(
        "--fixed-steps", type=int, default=11, help="memory/speed steps of the other rows"
    )
    parser.add_argument("--metric-steps", type=int, default=21, help="steps before the metric")
    parser.add_argument(
        "--metric-from",
        type=Path,
        help="JSON of an earlier run: take the held-out metric of rows not sampling layers "
        "from it (their metric recipe does not depend on --interval)",
    )
    parser.add_argument("--eval-size", type=int, default=128)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--out", type=Path, default=Path("bench-out/selection_methods.md"))
    parser.add_argument(
        "--metric-reuse-all",
        action="store_true",
        help="with --metric-from: reuse the metric of the layer-sampling rows too (their earlier "
        "run may have used another --interval; the table says so)",
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    earlier = json.loads(args.metric_from.read_text()) if args.metric_from else {}
    results: dict[str, dict[str, Any]] = {}
    for row in rows:
        t = time.perf_counter()
        reuse = earlier.get(row) if args.metric_reuse_all or row not in SAMPLED else None
        results[row] = run_row(row, args, reuse)
        r = results[row]
        print(
            f"{row}: peak {r['peak_rss'] / 1e9:.2f} GB, acc {r['eval_accuracy']:.4f}, "
            f"{time.perf_counter() - t:.0f} s",
            flush=True,
        )
    lines = [
        "# Layer and parameter selection methods (SmolLM2-135M, CPU)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()}, {os.cpu_count()} CPUs; "
        "fp32, constant lr, train.trim_memory on, each run a fresh process. Peak RSS and "
        "s/step: batch 4 x 256 tokens packed (SST-2 sentences), no evaluation, "
        f"{args.interval * args.switches + 1} steps for LISA/OwLore (re-sampling every "
        f"{args.interval} steps: {args.switches} switches), {args.fixed_steps} for the others; "
        "retained = resident memory between steps (what a method keeps), peak = high-water "
        f"mark. Held-out accuracy/loss: a second run of {args.metric_steps} steps on the demo "
        f"task (SST-2 prompt, batch 4, at most 256 tokens), {args.eval_size} held-out examples"
        + (
            f" (from {args.metric_from.name}: {'all rows, LISA/OwLore there with their own interval' if args.metric_reuse_all else 'rows without layer sampling, same recipe'})."
            if args.metric_from
            else "."
        ),
        "",
        "| method | trainable | peak RSS (GB) | peak vs full | s/step (median) | vs full "
        "| held-out acc | held-out loss | peak after switches / first interval "
        "| retained after switches / first interval |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    full = results.get("full AdamW")
    checks = []
    for row, r in results.items():
        med = statistics.median(r["step_s"][1:])
        ratio_peak = r["peak_rss"] / full["peak_rss"] if full else float("nan")
        ratio_time = med / statistics.median(full["step_s"][1:]) if full else float("nan")
        growth = kept = ""
        if row in SAMPLED:
            first = r["peak_mb"][args.interval - 1]
            g = r["peak_mb"][-1] / first
            growth = f"{g:.3f}x"
            kept = f"{r['retained_mb'][-1] / max(r['retained_mb'][: args.interval]):.3f}x"
            checks.append(
                f"- {'PASS' if g <= 1.05 else 'FAIL'} {row}: peak after {args.switches} switches "
                f"<= 1.05x its first-interval peak: {g:.3f}x; vs full FT {ratio_peak:.2f}x"
            )
        lines.append(
            f"| {row} | {r['trainable_fraction']:.2%} | {r['peak_rss'] / 1e9:.2f} | "
            f"{ratio_peak:.2f}x | {med:.2f} | {ratio_time:.2f}x | {r['eval_accuracy']:.4f} | "
            f"{r['eval_loss']:.4f} | {growth} | {kept} |"
        )
    if full and "S2FT" in results:
        s = statistics.median(results["S2FT"]["step_s"][1:])
        f = statistics.median(full["step_s"][1:])
        checks.append(
            f"- {'PASS' if s < f else 'FAIL'} S2FT faster per step than full FT: {s:.2f} vs {f:.2f} s"
        )
    lines += ["", "Targets:", "", *checks, ""]
    write_report(args.out, lines, results)


if __name__ == "__main__":
    main()
