"""GPU benchmark (issue 21): slimtune's methods against peft + ``transformers.Trainer`` on a
random-weight model of a bundled architecture, every configuration in a fresh process.

The model is built from ``src/slimtune/plan/configs/ARCH.json`` with random weights in the
benchmark dtype, directly on the device, and saved under ``--work`` (tmpfs, ``/dev/shm``, by
default) with slimtune's byte-level test tokenizer; the data are blocks of exactly ``--seq``
tokens of seeded random text, loaded by slimtune's own loader for both sides (the Trainer gets
slimtune's blocks). Per row: s/step (median after ``--warmup`` steps), tokens/s, model-FLOPs
utilisation against a bf16/fp32 GEMM peak measured in the same run, peak CUDA memory allocated
and reserved (reset in each process), and the planner's prediction. ``forward`` times a plain
no-grad forward of the same batch (the unit zeroth-order steps are priced in).

On the GPU machine (``../shared/GPU.md``: bring transformers, peft and datasets as wheels)::

    PYTHONUNBUFFERED=1 python benchmarks/gpu.py --arch llama-2-7b --batch 4 --seq 1024 \
        --steps 10 --out benchmarks/results/gpu_h200.md

A row that runs past ``--row-timeout`` seconds is reported as such (exact-SVD layer-wise GaLore
at 7B did that). A CPU dry run of the whole script (the test suite runs one)::

    python benchmarks/gpu.py --arch tiny --device cpu --dtype fp32 --batch 1 --seq 32 \
        --steps 2 --warmup 0 --rows lora,peft-trainer,forward
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tasks import train_recording, write_report

ROOT = Path(__file__).resolve().parents[1]
LORA = {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
ADAMW = {"name": "adamw", "lr": 1e-4}
# row -> (params, optimizer, train options); None: a side other than slimtune's loop
ROWS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None] = {
    "lora": (LORA, ADAMW, {}),
    "lora+ckpt": (LORA, ADAMW, {"gradient_checkpointing": True}),
    "peft-trainer": None,
    "peft-trainer+ckpt": None,
    "lisa": ({"name": "lisa", "layers": 2}, ADAMW, {}),
    "mezo": ({"name": "full"}, {"name": "mezo", "lr": 1e-6, "eps": 1e-3}, {}),
    "galore-layerwise-randomized": (
        {"name": "full"},
        {"name": "galore", "rank": 128, "layerwise": True, "basis": "randomized", "lr": 1e-5},
        {},
    ),
    "galore-layerwise": (
        {"name": "full"},
        {"name": "galore", "rank": 128, "layerwise": True, "lr": 1e-5},
        {},
    ),
    "full": ({"name": "full"}, {"name": "adamw", "lr": 1e-5}, {}),
    "forward": None,
}
DEFAULT_ROWS = ",".join(ROWS)
TINY = {  # --arch tiny: a CPU dry run of the script
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 259,
    "max_position_embeddings": 512,
}


# --- the parent: model, data, GEMM peak, rows ---------------------------------------------------
def build_model(arch: str, dtype: str, device: str, out: Path) -> None:
    """A random-weight model of ``arch`` saved to ``out`` with the byte-level tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimtune.models import DTYPES, tiny_tokenizer

    path = ROOT / f"src/slimtune/plan/configs/{arch}.json"
    spec = dict(TINY) if arch == "tiny" else json.loads(path.read_text())
    cfg = AutoConfig.for_model(**spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[dtype])
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    del model


def write_data(path: Path, seq: int, rows: int) -> None:
    """Seeded random text: with the byte-level tokenizer, one token per character."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": "".join(rng.choice(letters) for _ in range(seq))}) + "\n")


def recipe(row: str, args: argparse.Namespace, model: Path, data: Path, out: Path) -> dict:
    params, optim, train = ROWS[row] or (LORA, ADAMW, {})
    if row.startswith("peft-trainer"):
        train = {"gradient_checkpointing": row.endswith("+ckpt")}
    return {
        "model": {"name": str(model), "dtype": args.dtype, "device": args.device},
        "data": {"path": str(data), "format": "text", "max_seq_len": args.seq},
        "params": params,
        "optimizer": optim,
        "train": {
            "steps": args.steps + args.warmup,
            "batch_size": args.batch,
            "schedule": "constant",
            "warmup_steps": 0,
            "eval_before": False,
            "progress": False,
            "max_grad_norm": 1.0,
            **train,
        },
        "output_dir": str(out),
        "overwrite": True,
    }


def run_row(row: str, args: argparse.Namespace, work: Path, model: Path, data: Path) -> dict:
    """One row in a fresh process, stopped after ``--row-timeout`` seconds."""
    rdir = work / row.replace("+", "_")
    rdir.mkdir(parents=True, exist_ok=True)
    spec = {
        "row": row,
        "recipe": recipe(row, args, model, data, rdir / "run"),
        "warmup": args.warmup,
        "result": str(rdir / "result.json"),
    }
    (rdir / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    t = time.perf_counter()
    with (rdir / "log.txt").open("w") as log:
        try:
            done = subprocess.run(
                [sys.executable, __file__, "--worker", str(rdir / "spec.json")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=args.row_timeout,
            )
        except subprocess.TimeoutExpired:
            return {"row": row, "status": f"timeout after {args.row_timeout} s"}
    if done.returncode != 0:
        tail = (rdir / "log.txt").read_text()[-1500:]
        return {"row": row, "status": "failed", "log": tail}
    res = json.loads((rdir / "result.json").read_text())
    res["wall_s"] = time.perf_counter() - t
    return res


# --- the worker: one row --------------------------------------------------------------------------
def peak_memory() -> dict[str, float]:
    import torch

    if not torch.cuda.is_available():
        from slimtune.memory import peak_bytes

        return {"allocated": float(peak_bytes()), "reserved": float(peak_bytes())}
    return {
        "allocated": float(torch.cuda.max_memory_allocated()),
        "reserved": float(torch.cuda.max_memory_reserved()),
    }


def worker(spec_path: Path) -> None:
    import torch

    spec = json.loads(spec_path.read_text())
    row = spec["row"]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    from slimtune import config
    from slimtune.bench import _predict

    cfg = config.from_dict(spec["recipe"])
    pred = _predict(cfg)
    if row == "forward":
        step_s, losses = forward_only(cfg)
    elif row.startswith("peft-trainer"):
        step_s, losses = peft_trainer(cfg)
    else:
        step_s, losses = slimtune_row(cfg)
    out = {
        "row": row,
        "status": "ok",
        "step_s": step_s,
        "losses": losses,
        "peak": peak_memory(),
        "planned": pred.peak if pred is not None and row != "forward" else None,
        "flops_per_token": pred.flops_per_token if pred is not None else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    Path(spec["result"]).write_text(json.dumps(out))


def slimtune_row(cfg: Any) -> tuple[list[float], list[float]]:
    _, step_s, losses = train_recording(cfg)
    return step_s, losses


def blocks(cfg: Any) -> list[list[int]]:
    """slimtune's own blocks, in the order its loop draws them."""
    from transformers import AutoTokenizer

    from slimtune.data import index_stream, load_splits

    tok = AutoTokenizer.from_pretrained(cfg.model.name)
    train = load_splits(cfg.data, tok).train
    order = index_stream(len(train), cfg.train.seed)
    n = cfg.train.steps * cfg.train.batch_size
    return [train[next(order)].input_ids for _ in range(n)]


def peft_trainer(cfg: Any) -> tuple[list[float], list[float]]:
    """The peer: peft's LoRA (the same rank, alpha, targets) in transformers.Trainer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from slimtune.models import DTYPES

    ids = blocks(cfg)
    dtype = DTYPES[cfg.model.dtype]
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name, dtype=dtype)
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    data = [{"input_ids": torch.tensor(x), "labels": torch.tensor(x)} for x in ids]
    ends: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    start = [0.0]

    class Start(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            if not start[0]:
                start[0] = time.perf_counter()

    targs = TrainingArguments(
        output_dir=str(Path(cfg.output_dir) / "trainer"),
        per_device_train_batch_size=cfg.train.batch_size,
        max_steps=cfg.train.steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        bf16=cfg.model.dtype == "bf16" and torch.cuda.is_available(),
        use_cpu=cfg.model.device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    sequential = torch.utils.data.SequentialSampler
    trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[Start(), Clock()])
    trainer._get_train_sampler = lambda *a, **k: sequential(data)  # slimtune's order
    trainer.train()
    step_s = [b - a for a, b in zip([start[0], *ends[:-1]], ends)]
    return step_s, losses


def forward_only(cfg: Any) -> tuple[list[float], list[float]]:
    """A plain forward of one batch, no gradients: the unit of zeroth-order cost."""
    import torch
    from transformers import AutoModelForCausalLM

    from slimtune.models import DTYPES

    device = torch.device(
        "cuda" if torch.cuda.is_available() and cfg.model.device != "cpu" else "cpu"
    )
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name, dtype=DTYPES[cfg.model.dtype])
    model.to(device).eval()
    ids = torch.tensor(blocks(cfg)[: cfg.train.batch_size], device=device)
    times = []
    with torch.no_grad():
        for _ in range(cfg.train.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return times, []


# --- the table ------------------------------------------------------------------------------------
def render(results: list[dict], args: argparse.Namespace, peak_flops: float) -> list[str]:
    tokens = args.batch * args.seq
    lines = [
        "| row | s/step | tokens/s | MFU | peak allocated GB | peak reserved GB | planned GB | last loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if r.get("status") != "ok":
            lines.append(f"| {r['row']} | {r['status']} | | | | | | |")
            continue
        times = r["step_s"][args.warmup :] or r["step_s"]
        med = statistics.median(times)
        rate = tokens / med
        mfu = (
            f"{r['flops_per_token'] * rate / peak_flops:.1%}"
            if r.get("flops_per_token") and r["row"] != "forward"
            else ""
        )
        planned = f"{r['planned'] / 1e9:.1f}" if r.get("planned") else ""
        loss = f"{r['losses'][-1]:.4f}" if r["losses"] else ""
        lines.append(
            f"| {r['row']} | {med:.3f} | {rate:,.0f} | {mfu} | {r['peak']['allocated'] / 1e9:.1f} "
            f"| {r['peak']['reserved'] / 1e9:.1f} | {planned} | {loss} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama-2-7b", help="a bundled config, or tiny")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="steps run and not measured")
    parser.add_argument("--rows", default=DEFAULT_ROWS)
    parser.add_argument("--row-timeout", type=int, default=150)
    parser.add_argument("--work", type=Path, default=None, help="default: /dev/shm or a tmp dir")
    parser.add_argument("--out", type=Path, default=Path("bench-out/gpu.md"))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    import torch

    from slimtune.bench import gemm_peak

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {DEFAULT_ROWS}")
    shm = Path("/dev/shm")
    base = args.work or (shm if shm.is_dir() and os.access(shm, os.W_OK) else None)
    work = Path(tempfile.mkdtemp(prefix="slimtune-gpu-", dir=base))
    t = time.perf_counter()
    build_model(args.arch, args.dtype, args.device, work / "model")
    write_data(work / "data.jsonl", args.seq, args.batch * (args.steps + args.warmup) + 8)
    print(f"model {args.arch} built and saved in {time.perf_counter() - t:.0f} s", flush=True)
    peak = gemm_peak(args.dtype)
    print(f"GEMM peak {peak / 1e12:.1f} TFLOP/s ({args.dtype})", flush=True)
    results = []
    for row in rows:
        res = run_row(row, args, work, work / "model", work / "data.jsonl")
        results.append(res)
        status = res.get("status")
        if status == "ok":
            med = statistics.median(res["step_s"][args.warmup :] or res["step_s"])
            print(
                f"{row}: {med:.3f} s/step, peak {res['peak']['allocated'] / 1e9:.1f} GB", flush=True
            )
        else:
            print(f"{row}: {status}", flush=True)
    device = next((r["device"] for r in results if r.get("device")), args.device)
    lines = [
        f"# slimtune on {device}: {args.arch}, random weights, {args.dtype}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}; torch {torch.__version__}; "
        f"batch {args.batch} x {args.seq} tokens, {args.warmup} warm-up + {args.steps} measured "
        f"steps (median); LoRA r 8 alpha 16 on q_proj, v_proj, AdamW; each row a fresh process. "
        f"GEMM peak measured in this run: {peak / 1e12:.1f} TFLOP/s. MFU: the planner's model "
        "FLOPs per token x tokens/s / that peak.",
        "",
        *render(results, args, peak),
        "",
    ]
    write_report(args.out, lines, results)


if __name__ == "__main__":
    main()
