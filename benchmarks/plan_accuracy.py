"""The memory planner against measured peaks: every registered method, fresh processes, CPU.

Each params method runs with AdamW and each optimizer method with full fine-tuning (the
method's defaults otherwise), ``--steps`` optimizer steps on SST-2 sentences packed into blocks
of ``--seq`` tokens, batch ``--batch``, fp32 weights, no evaluation. Every run is its own
process; its peak RSS is its ``ru_maxrss`` (``os.wait4``). The prediction is ``slimtune plan``'s
for the same recipe (``Workload.steps`` = the run's steps). Prints one table per model and the
worst ratio; target: every ratio within 15% (0.85-1.15).

    .venv/bin/python benchmarks/plan_accuracy.py --models smollm2-135m,gemma3-270m \\
        --out bench-out/plan_accuracy.md

About 30-60 s a row on 2 cores (model load, calibration where a method has one, 3 steps).

``--recipe FILE [--set key=value ...]`` instead measures one recipe as written (its own data,
batch and ``train.trim_memory``), with ``train.steps`` = ``--steps``, no evaluation before and a
small one after (the training peak is reached in the first steps):

    .venv/bin/python benchmarks/plan_accuracy.py --recipe src/slimtune/recipes/demo.yaml
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tasks import packed_sst2

from slimtune.bench import run_worker

# each configuration runs in a fresh process: this script with --worker SPEC.json
WORKER = [sys.executable, __file__, "--worker"]

PLAN_NAMES = {"smollm2-135m": "smollm2-135m", "gemma3-270m": "gemma-3-270m"}


def rows() -> list[tuple[str, str]]:
    from slimtune import registry

    out = [(p, "adamw") for p in registry.names("params")]
    out += [("full", o) for o in registry.names("optimizer") if o != "adamw"]
    out += [(f"lora@{b}", "adamw") for b in registry.names("base") if b != "fp32"]
    return out


def recipe(model: str, params: str, optim: str, args: argparse.Namespace, out: str) -> dict:
    """``params`` may name a base after ``@`` (``lora@nf4``): the base's compute dtype then
    holds everything else; otherwise fp32 weights. Options follow the name after ``:``,
    separated by ``;`` (``lora:ggpo=true``)."""
    from slimtune.config import parse_overrides

    params, _, base = params.partition("@")
    params, _, opts = params.partition(":")
    options = parse_overrides([o for o in opts.split(";") if o]) if opts else {}
    return {
        "model": {"name": model, "device": "cpu", **({} if base else {"dtype": "fp32"})},
        **({"base": base} if base else {}),
        "data": packed_sst2(max_seq_len=args.seq),
        "params": {"name": params, **options},
        "optimizer": {"name": optim},
        "train": {
            "steps": args.steps,
            "batch_size": args.batch,
            "schedule": "constant",
            "eval_before": False,
            "progress": False,
            "trim_memory": args.trim,
            "gradient_checkpointing": args.checkpointing,
        },
        "output_dir": out,
        "overwrite": True,
    }


def worker(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    from slimtune import config, loop
    from slimtune.memory import current_rss, peak_bytes

    cfg = config.from_dict(spec["recipe"])
    marks: list[dict[str, float]] = []

    def on_step(step: int, model: Any, row: dict[str, Any] | None) -> None:
        marks.append({"step": step, "rss": current_rss(), "peak": peak_bytes()})

    t = time.perf_counter()
    loop.train(cfg, on_step=on_step)
    out = {"seconds": time.perf_counter() - t, "marks": marks}
    Path(spec["result"]).write_text(json.dumps(out))


def predict(model: str, params: str, optim: str, args: argparse.Namespace) -> Any:
    from slimtune import config, registry
    from slimtune.plan.planner import plan, workload_of
    from slimtune.plan.shapes import load_shape

    cfg = config.from_dict(recipe(model, params, optim, args, "unused"))
    work = workload_of(cfg, steps=args.steps)
    p = registry.build("params", cfg.params)
    o = registry.build("optimizer", cfg.optimizer)
    return plan(load_shape(PLAN_NAMES.get(model, model)), p, o, work, model)


def one_recipe(args: argparse.Namespace) -> None:
    """``--recipe``: the planned and measured peak of one recipe file, in a fresh process."""
    from slimtune import config, registry
    from slimtune.plan import format_breakdown, shape_for, workload_for
    from slimtune.plan.planner import plan

    work = args.work or Path(tempfile.mkdtemp(prefix="plan-accuracy-"))
    overrides = [
        f"train.steps={args.steps}",
        "train.eval_before=false",
        "train.progress=false",
        "eval.max_examples=16",
        "eval.generate=0",
        f"output_dir={work / 'run'}",
        "overwrite=true",
        *args.set,
    ]
    cfg = config.load(args.recipe, overrides)
    work.mkdir(parents=True, exist_ok=True)
    res = run_worker(WORKER, str(args.recipe), cfg.to_dict(), work)
    p, o = registry.build("params", cfg.params), registry.build("optimizer", cfg.optimizer)
    # what `slimtune plan` prices for this recipe (its data read: the widest batch the run's
    # steps draw), over the run's length
    pred = plan(shape_for(cfg.model.name), p, o, workload_for(cfg, steps=args.steps))
    print(format_breakdown(pred))
    marks = [(m["step"], round(m["rss"] / 2**30, 3)) for m in res["marks"]]
    print(f"RSS after each step (GB): {marks}")
    print(
        f"{args.recipe} (train.trim_memory={cfg.train.trim_memory}, {args.steps} steps): "
        f"planned {pred.peak / 2**30:.3f} GB, measured {res['peak_rss'] / 2**30:.3f} GB, "
        f"ratio {pred.peak / res['peak_rss']:.3f}, {res['wall_s']:.0f} s"
    )


def read_measured(paths: list[Path]) -> dict[tuple[str, str, str], float]:
    """Measured peaks (bytes) by (model, params, optimizer) from earlier outputs."""
    out: dict[tuple[str, str, str], float] = {}
    for path in paths:
        model = "smollm2-135m"
        for line in path.read_text().splitlines():
            if line.startswith("## "):
                model = line[3:].strip()
            elif line.startswith("| ") and not line.startswith(("| params", "| ---")):
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                out[model, cells[0], cells[1]] = float(cells[3]) * 2**30
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m")
    parser.add_argument(
        "--rows",
        default="",
        help="params/optimizer pairs, e.g. lora/adamw,full/mezo; params@base runs on that base "
        "(lora@nf4/adamw)",
    )
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--trim", action="store_true", help="train.trim_memory=true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--measured",
        default="",
        help="comma-separated logs/tables of earlier runs of this script: reuse their measured "
        "peaks (later files win) and only recompute the predictions",
    )
    parser.add_argument("--recipe", type=Path, help="measure this one recipe file instead")
    parser.add_argument("--set", action="append", default=[], help="--recipe: an override")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    if args.recipe:
        one_recipe(args)
        return
    pairs = [tuple(r.split("/")) for r in args.rows.split(",") if r] or rows()
    measured = read_measured([Path(f) for f in args.measured.split(",") if f])
    work = args.work or Path(tempfile.mkdtemp(prefix="plan-accuracy-"))
    results: list[dict[str, Any]] = []
    lines = [
        f"# Planner vs measured peak (CPU, {platform.machine()}, {time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"seq {args.seq}, batch {args.batch}, {args.steps} steps, fp32 weights, no evaluation, "
        f"checkpointing {'on' if args.checkpointing else 'off'}, trim_memory "
        f"{'on' if args.trim else 'off'}; each row a fresh process (peak RSS from wait4).",
    ]
    for model in args.models.split(","):
        lines += [
            "",
            f"## {model}",
            "",
            "| params | optimizer | predicted GB | measured GB | ratio | peak phase |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for params, optim in pairs:
            d = work / model / f"{params}-{optim}"
            t = time.perf_counter()
            if (model, params, optim) in measured:
                res = {"peak_rss": measured[model, params, optim], "marks": []}
            else:
                d.mkdir(parents=True, exist_ok=True)
                rec = recipe(model, params, optim, args, str(d / "run"))
                res = run_worker(WORKER, f"{params}/{optim}", rec, d)
            pred = predict(model, params, optim, args)
            ratio = pred.peak / res["peak_rss"]
            print(
                "   marks (GB):",
                [
                    (m["step"], round(m["rss"] / 2**30, 3), round(m["peak"] / 2**30, 3))
                    for m in res["marks"]
                ],
            )
            row = {
                "model": model,
                "params": params,
                "optimizer": optim,
                "predicted": pred.peak,
                "measured": res["peak_rss"],
                "ratio": ratio,
                "phase": pred.peak_phase,
                "terms": pred.by_name(),
                "wall_s": time.perf_counter() - t,
            }
            results.append(row)
            line = (
                f"| {params} | {optim} | {pred.peak / 2**30:.3f} | {res['peak_rss'] / 2**30:.3f} "
                f"| {ratio:.3f} | {pred.peak_phase} |"
            )
            lines.append(line)
            print(line, f"({row['wall_s']:.0f} s)", flush=True)
    ratios = [r["ratio"] for r in results]
    worst = max(ratios, key=lambda x: abs(x - 1))
    ok = all(0.85 <= r <= 1.15 for r in ratios)
    lines += [
        "",
        f"Median ratio {statistics.median(ratios):.3f}; worst {worst:.3f}; "
        f"{'PASS' if ok else 'FAIL'} every ratio within 15% ({len(ratios)} rows).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
