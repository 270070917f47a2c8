"""Quantised bases on the demo task: LoRA on fp32, bf16, NF4 (with and without double
quantisation) and int8 weights, PEQA and QST (SmolLM2-135M, CPU).

Every row is ``slimtune bench`` on the demo recipe (``src/slimtune/recipes/demo.yaml``: SST-2
prompts, batch 16, one epoch = 38 steps, the same data order and seed), each method in a fresh
process: held-out accuracy before and after, peak RSS beside the planner's prediction, step
time. The LoRA rows run the recipe's own LoRA (r 8 on q/k/v/o, AdamW 3e-4) on another base;
PEQA and QST run with their defaults and their own learning rates (``--peqa-lr``, ``--qst-lr``).

    .venv/bin/python benchmarks/quantised_bases.py --out benchmarks/results/quantised_bases_cpu

About 35 minutes on 2 cores (ten rows, about 3.5-4 minutes each with both evaluations; the
last two put adapters on every linear layer, bf16 and NF4, as the QLoRA paper does).
``--steps N`` shortens every run (the held-out numbers then say less). ``--seeds 0,1,2`` repeats
the chosen rows with each ``train.seed`` (initialisation and data order; the held-out split is
the same) and ends with each row's mean held-out accuracy over the seeds, and each row's mean
difference from the first row with its standard error over the seeds (the differences are
paired: the same seed gives both rows the same data order).

``--merge-check`` instead trains QLoRA (nf4, bf16 compute) for ``--steps`` (default 10) on the
demo recipe, merges it with ``slimtune merge`` and compares logits on held-out prompts: the
merged checkpoint against the 4-bit model with its adapter (what merging should preserve), and
the adapter merged into the original unquantised weights against the same (the quantisation
error users meet when they merge into the checkpoint they started from).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slimtune import bench, config

DEMO = Path(__file__).resolve().parent.parent / "src" / "slimtune" / "recipes" / "demo.yaml"
ALL_LINEAR = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


def methods(peqa_lr: float, qst_lr: float) -> list[str]:
    return [
        "lora",
        "lora:base=bf16",
        "lora:base=nf4",
        "lora:base=nf4;base.double_quant=false",
        "lora:base=int8",
        f"peqa:optimizer.lr={peqa_lr}",
        f"qst:optimizer.lr={qst_lr}",
        "lora:base=nf4;params.init=loftq",  # QLoRA with adapters fitted to the 4-bit error
        # QLoRA as its paper runs it: adapters on every linear layer of the blocks (it found
        # q/v-only adapters short of 16-bit quality), against LoRA on bf16 with the same ones
        f"lora:base=bf16;params.target_modules={ALL_LINEAR}",
        f"lora:base=nf4;params.target_modules={ALL_LINEAR}",
    ]


def merge_check(steps: int, work: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimtune.cli import main as cli
    from slimtune.data import load_splits
    from slimtune.loop import train
    from slimtune.models import load_model

    run, merged_dir = work / "run", work / "merged"
    cfg = config.load(
        DEMO,
        [f"output_dir={run}", f"train.steps={steps}", "base=nf4", "train.eval_before=false",
         "eval.max_examples=16", "eval.generate=0"],
    )  # fmt: skip
    result = train(cfg)
    assert cli(["merge", str(run), str(merged_dir)]) == 0
    assert cli(["merge", str(run), str(work / "merged-fp32"), "--dtype", "fp32"]) == 0
    tok = AutoTokenizer.from_pretrained(run)  # the run saved the tokenizer it trained with
    splits = load_splits(cfg.data, tok)
    prompts = [torch.tensor(e.input_ids)[None] for e in (splits.eval or splits.train)[:16]]

    def logits(model: torch.nn.Module) -> list[torch.Tensor]:
        model.eval()
        with torch.no_grad():
            return [model(input_ids=p).logits.float() for p in prompts]

    qlora = logits(result.model)
    merged = logits(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16))
    fp32 = logits(AutoModelForCausalLM.from_pretrained(work / "merged-fp32", dtype=torch.float32))
    dense, _ = load_model(cfg.model.name, dtype="bf16")
    naive = logits(PeftModel.from_pretrained(dense, run).merge_and_unload())
    for label, other in (
        ("slimtune merge (bf16, the run's model.dtype)", merged),
        ("slimtune merge --dtype fp32", fp32),
        ("the adapter merged into the original bf16 weights", naive),
    ):
        diff = max((a - b).abs().max().item() for a, b in zip(qlora, other))
        agree = sum(
            (a.argmax(-1) == b.argmax(-1)).float().mean().item() for a, b in zip(qlora, other)
        )
        print(f"{label} vs 4-bit + adapter: max |logit diff| {diff:.3f}, "
              f"top-1 agreement {agree / len(prompts):.3f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's epoch")
    parser.add_argument("--peqa-lr", type=float, default=5e-5)
    parser.add_argument("--qst-lr", type=float, default=1e-3)
    parser.add_argument("--only", default="", help="comma-separated row numbers (0-based)")
    parser.add_argument("--seeds", default="", help="comma-separated train.seed values")
    parser.add_argument("--merge-check", action="store_true")
    args = parser.parse_args()
    if args.merge_check:
        import tempfile

        merge_check(args.steps or 10, Path(tempfile.mkdtemp(prefix="qlora-merge-")))
        return
    overrides = ["output_dir=runs/quantised-bases", "train.progress=false"]
    cfg = config.load(DEMO, overrides)
    recipe = cfg.to_dict()
    if args.steps:
        recipe["train"]["steps"] = args.steps
    else:  # bench needs train.steps: one epoch of the recipe's batches
        recipe["train"]["steps"] = 600 // cfg.train.batch_size + (600 % cfg.train.batch_size > 0)
    specs = methods(args.peqa_lr, args.qst_lr)
    if args.only:
        specs = [specs[int(i)] for i in args.only.split(",")]
    if not args.seeds:
        report = bench.run(recipe, bench.parse_methods(specs), args.out)
        print(bench.markdown(report))
        return
    accuracy: dict[str, list[float]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        recipe["train"]["seed"] = seed
        report = bench.run(recipe, bench.parse_methods(specs), args.out / f"seed-{seed}")
        print(bench.markdown(report))
        for m in report["methods"]:
            accuracy.setdefault(m["label"], []).append(m["eval_after"]["accuracy"])
    print(seed_table(accuracy, args.seeds))


def seed_table(accuracy: dict[str, list[float]], seeds: str) -> str:
    """Mean held-out accuracy per row over the seeds, and the paired difference from the first
    row (mean and its standard error, sample standard deviation / sqrt(seeds))."""
    import statistics

    first = next(iter(accuracy.values()))
    lines = [
        f"Held-out accuracy over train.seed {seeds}:",
        "",
        "| method | per seed | mean | difference from the first row | its standard error |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, acc in accuracy.items():
        diff = [a - b for a, b in zip(acc, first)]
        se = statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
        lines.append(
            f"| {label} | {' '.join(f'{a:.3f}' for a in acc)} | {statistics.mean(acc):.3f} "
            f"| {statistics.mean(diff):+.3f} | {se:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
