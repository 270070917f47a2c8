"""Zeroth-order optimizers against inference and full AdamW fine-tuning (SmolLM2-135M, CPU).

Two parts, each configuration in a fresh subprocess (its peak RSS is its own ``ru_maxrss``,
taken with ``os.wait4``):

1. ``--table``: 1024 tokens per step (batch 4 x 256, packed SST-2 validation sentences), fp32.
   Rows: inference only (the training loss under ``torch.no_grad``, model in eval mode, the
   same chunked loss), mezo, sparse-mezo, zo-adam, full AdamW. In every zeroth-order row, two
   plain inference forwards of the first batch are timed after each training step, so "step
   vs two forwards" compares medians measured interleaved in the same process (timings on
   this 2-core machine vary by up to 1.5x from one minute to the next). Those timing forwards
   are not part of training, and their activations on top of the zeroth-order step's heap set
   the process's peak, so each zeroth-order row's peak RSS comes from a second fresh process
   that trains the same steps without them.
2. ``--demo``: the demo task (``slimtune demo``'s data and prompt): held-out accuracy and loss
   zero-shot and after MeZO over LoRA, over full weights, and sparse MeZO over full weights, at
   equal steps.

    .venv/bin/python benchmarks/zo_family.py --table --out bench-out/zo.md
    .venv/bin/python benchmarks/zo_family.py --demo --out bench-out/zo-demo.md
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

MODEL = "smollm2-135m"

TABLE_ROWS: dict[str, dict[str, Any] | None] = {
    "inference (no_grad forward)": None,
    "mezo": {"name": "mezo", "lr": 1e-6, "eps": 1e-3},
    "sparse-mezo": {"name": "sparse-mezo", "lr": 1e-6, "eps": 1e-3},
    "zo-adam": {"name": "zo-adam", "lr": 1e-5, "eps": 1e-3},
    "full AdamW": {"name": "adamw", "lr": 1e-5},
}

# Demo rows: (params, optimizer). lr/eps follow MeZO's defaults scaled for a small model.
DEMO_ROWS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "zero-shot": ({"name": "full"}, {"name": "mezo", "lr": 0.0}),
    "mezo over LoRA r8 q/k/v/o": (
        {
            "name": "lora",
            "r": 8,
            "alpha": 16,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        },
        {"name": "mezo", "lr": 1e-4, "eps": 1e-2},
    ),
    "mezo over full weights": ({"name": "full"}, {"name": "mezo", "lr": 5e-6, "eps": 1e-3}),
    "sparse-mezo over full weights": (
        {"name": "full"},
        {"name": "sparse-mezo", "lr": 5e-6, "eps": 1e-3, "sparsity": 0.75},
    ),
}


def table_recipe(optim: dict[str, Any] | None, steps: int, out: str) -> dict[str, Any]:
    return {
        "model": {"name": MODEL, "dtype": "fp32", "device": "cpu"},
        "data": packed_sst2(),
        "params": {"name": "full"},
        "optimizer": optim or {"name": "mezo"},
        "train": {
            "steps": steps,
            "batch_size": 4,
            "schedule": "constant",
            "warmup_steps": 0,
            "progress": False,
            "eval_before": False,
        },
        "output_dir": out,
        "overwrite": True,
    }


def demo_recipe(row: str, steps: int, eval_size: int, out: str) -> dict[str, Any]:
    params, optim = DEMO_ROWS[row]
    return {
        "model": {"name": MODEL, "dtype": "fp32", "device": "cpu"},
        "data": demo_task(192, eval_size),
        "params": params,
        "optimizer": optim,
        "train": {
            "steps": 1 if row == "zero-shot" else steps,
            "batch_size": 8,
            "schedule": "constant",
            "warmup_steps": 0,
            "progress": False,
            "eval_before": False,
        },
        "eval": {"batch_size": 16, "generate": 0},
        "output_dir": out,
        "overwrite": True,
    }


class TwoForwards:
    """Times two plain no_grad forwards (the training loss, model in eval mode) of the first
    training batch; called between training steps, so both are measured in the same process
    under the same conditions."""

    def __init__(self, rec: dict[str, Any]):
        from transformers import AutoTokenizer

        from slimtune import config
        from slimtune.data import collate, load_splits
        from slimtune.models import resolve

        cfg = config.from_dict(rec)
        tok = AutoTokenizer.from_pretrained(str(resolve(cfg.model.name)))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        splits = load_splits(cfg.data, tok)
        self.batch = collate(splits.train[: cfg.train.batch_size], tok.pad_token_id)
        self.chunk = cfg.train.loss_chunk_tokens
        self.times: list[float] = []
        self.head = None

    def __call__(self, model: Any) -> None:
        import torch

        from slimtune.loss import causal_lm_loss, find_head

        if self.head is None:
            self.head = find_head(model)
        was = model.training
        model.eval()
        with torch.no_grad():
            t = time.perf_counter()
            for _ in range(2):
                causal_lm_loss(model, self.head, self.batch, self.chunk)
            self.times.append(time.perf_counter() - t)
        model.train(was)


def worker(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    rec, kind = spec["recipe"], spec["recipe"].pop("_kind")
    out: dict[str, Any] = {}
    from slimtune import config, loop

    if kind == "inference":
        from slimtune.models import load_recipe_model

        cfg = config.from_dict(rec)
        model, _ = load_recipe_model(cfg.model, place=False)
        model.config.use_cache = False
        timer = TwoForwards(rec)
        for _ in range(rec["train"]["steps"]):
            timer(model)
        out["two_forwards_s"] = timer.times[1:]
        Path(spec["result"]).write_text(json.dumps(out))
        return
    timer = TwoForwards(rec) if kind == "zo" else None

    def on_step(step: int, model: Any, row: dict[str, Any] | None) -> None:
        if timer is not None and row is not None:
            timer(model)

    result = loop.train(config.from_dict(rec), on_step=on_step)
    rows = [
        json.loads(x)
        for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()
        if '"eval"' not in x
    ]
    after = result.summary.get("eval_after") or {}
    out.update(
        step_s=[r["step_s"] for r in rows],
        state_bytes=result.summary["optimizer_state_bytes"],
        train_loss=result.summary["train_loss"],
        eval_loss=after.get("loss"),
        eval_accuracy=after.get("accuracy"),
        seconds=result.summary["train_seconds"],
    )
    if timer is not None:
        out["two_forwards_s"] = timer.times[1:]
    Path(spec["result"]).write_text(json.dumps(out))


def run(name: str, rec: dict[str, Any], kind: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="zo-bench-") as tmp:
        work = Path(tmp)
        rec = {**rec, "output_dir": str(work / "run"), "_kind": kind}
        return run_worker(WORKER, name, rec, work)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--demo", action="store_true")
    parser.add_argument("--steps", type=int, default=8, help="table: steps per row (1 warm-up)")
    parser.add_argument("--demo-steps", type=int, default=150)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--rows", default=None, help="comma-separated subset of rows")
    parser.add_argument("--out", type=Path, default=Path("bench-out/zo_family.md"))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    if not (args.table or args.demo):
        parser.error("choose --table, --demo or both")
    import torch

    lines = [
        "# Zeroth-order optimizers (SmolLM2-135M, CPU)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()}, {os.cpu_count()} CPUs; "
        f"torch {torch.__version__}; fp32 weights; each row a fresh process.",
        "",
    ]
    raw: dict[str, Any] = {}
    pick = set(args.rows.split(",")) if args.rows else None
    if args.table:
        res: dict[str, dict[str, Any]] = {}
        for name, optim in TABLE_ROWS.items():
            if pick and name not in pick:
                continue
            kind = "inference" if optim is None else "zo" if optim["name"] != "adamw" else "fo"
            res[name] = run(name, table_recipe(optim, args.steps, ""), kind)
            if kind == "zo":  # the peak of training alone, without the timing forwards
                alone = run(name, table_recipe(optim, args.steps, ""), "fo")
                res[name]["peak_rss_with_timing"] = res[name]["peak_rss"]
                res[name]["peak_rss"] = alone["peak_rss"]
            print(f"{name}: peak {res[name]['peak_rss'] / 1e9:.2f} GB", flush=True)
        raw["table"] = res
        inf = res.get("inference (no_grad forward)")
        lines += [
            f"## Memory and speed: batch 4 x 256 tokens packed (1024 tokens/step), "
            f"{args.steps} steps (first one not counted)",
            "",
            "| row | peak RSS (GB) | peak vs inference | optimizer state (GB) | s/step (median) "
            "| two forwards, same process (s) | step vs two forwards |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        checks = []
        for name, r in res.items():
            peak = r["peak_rss"] / 1e9
            vs = f"{r['peak_rss'] / inf['peak_rss']:.2f}x" if inf else ""
            step = statistics.median(r["step_s"][1:]) if "step_s" in r else None
            two = statistics.median(r["two_forwards_s"]) if "two_forwards_s" in r else None
            ratio = step / two if step and two else None
            lines.append(
                f"| {name} | {peak:.2f} | {vs} | "
                f"{r['state_bytes'] / 1e9 if 'state_bytes' in r else 0:.2f} | "
                f"{f'{step:.2f}' if step else ''} | {f'{two:.2f}' if two else ''} | "
                f"{f'{ratio:.2f}x' if ratio else ''} |"
            )
            if name == "mezo" and inf:
                p = r["peak_rss"] / inf["peak_rss"]
                checks.append(
                    f"- {'PASS' if p <= 1.1 else 'FAIL'} mezo peak <= 1.1x inference: {p:.2f}x"
                )
                checks.append(
                    f"- {'PASS' if ratio <= 1.2 else 'FAIL'} mezo step <= 1.2x two forwards "
                    f"(same process): {ratio:.2f}x ({step:.2f} vs {two:.2f} s)"
                )
        timed = [
            f"{n} {r['peak_rss_with_timing'] / 1e9:.2f} GB"
            for n, r in res.items()
            if "peak_rss_with_timing" in r
        ]
        if timed:
            lines += [
                "",
                "Zeroth-order peaks are of training alone (a second fresh process without the "
                "timing forwards); the timed processes peaked at " + ", ".join(timed) + ".",
            ]
        lines += ["", "Targets:", "", *checks, ""]
    if args.demo:
        res = {}
        for name in DEMO_ROWS:
            if pick and name not in pick:
                continue
            res[name] = run(name, demo_recipe(name, args.demo_steps, args.eval_size, ""), "fo")
            r = res[name]
            print(f"{name}: acc {r['eval_accuracy']:.4f} loss {r['eval_loss']:.4f}", flush=True)
        raw["demo"] = res
        lines += [
            f"## Demo task: held-out accuracy after {args.demo_steps} steps (batch 8, constant lr)",
            "",
            f"SST-2 prompt and label words (`slimtune demo`'s task), {args.eval_size} held-out "
            "examples, fp32, model in eval mode for every forward. Zero-shot = the untrained "
            "model (a run with lr 0).",
            "",
            "| run | params | optimizer, lr, eps | steps | held-out acc | held-out loss | train s |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, r in res.items():
            params, optim = DEMO_ROWS[name]
            steps = 0 if name == "zero-shot" else args.demo_steps
            lines.append(
                f"| {name} | {params['name']} | {optim['name']}, {optim['lr']}, "
                f"{optim.get('eps', '')} | {steps} | {r['eval_accuracy']:.4f} | "
                f"{r['eval_loss']:.4f} | {r['seconds']:.0f} |"
            )
        lines.append("")
    write_report(args.out, lines, raw)


if __name__ == "__main__":
    main()
