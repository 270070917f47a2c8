"""``slimtune bench``: methods side by side on the same recipe, each in a fresh process.

Every method runs the same recipe (model, data, seed, data order, steps, batch) with only the
``params`` / ``optimizer`` sections replaced, in its own subprocess, one after the other. The
parent measures the machine's GEMM peak first (same dtype as the model), then per method:
the loss curve (``metrics.jsonl``), the held-out metric before/after, peak memory (CPU: the
child's peak RSS from ``wait4``; CUDA: its max allocated bytes), tokens/s, model-FLOPs
utilisation against the measured GEMM peak (FLOPs per token from the planner) and the
planner's predicted peak next to the measured one. It writes a report directory:
``report.md``, ``results.json`` and three PNG plots (loss vs step, peak memory, tokens/s);
``work/`` keeps each method's log; run directories (trained weights) are removed unless asked.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SlimtuneError

GB = 1024**3


AXES = ("params", "optimizer")
OTHER = ("objective", "data", "train", "eval", "model")  # sections a method may also change
DEFAULT_METHODS = {"params": "full", "optimizer": "adamw"}


@dataclass
class Entry:
    """One method of a bench: a label, the recipe sections it replaces and the axes its spec
    names (``lora``: params; ``galore``: optimizer; ``lora+mezo``: both)."""

    label: str
    params: dict[str, Any]
    optimizer: dict[str, Any]
    named: tuple[str, ...] = AXES
    base: dict[str, Any] | None = None  # a base other than the recipe's (``lora:base=nf4``)
    # other recipe sections this method changes (``lora:data.packing=true``, ``objective=dpo``)
    other: dict[str, dict[str, Any]] = field(default_factory=dict)


def parse_methods(specs: list[str]) -> list[Entry]:
    """``params[+optimizer][:key=value;...]``: ``lora``, ``galore`` (full + galore),
    ``lora+mezo``, ``full:optimizer.lr=1e-5``, ``lora:base=nf4;base.compute_dtype=fp32``,
    ``lora:data.packing=true``, ``lora:objective=dpo;objective.beta=0.2``. Keys start with a
    recipe section (params., optimizer., base., objective., data., train., eval., model.);
    ``base=NAME`` and ``objective=NAME`` name the base and the objective."""
    from . import config
    from .plan import split_method

    out = []
    for spec in specs:
        name, _, opts = spec.partition(":")
        p, o = split_method(name.strip())
        params: dict[str, Any] = {"name": p}
        optim: dict[str, Any] = {"name": o}
        base: dict[str, Any] = {}
        other: dict[str, dict[str, Any]] = {}
        for item in filter(None, (x.strip() for x in opts.split(";"))):
            key, eq, value = item.partition("=")
            section, _, name_ = key.partition(".")
            if key == "base" and eq:
                base["name"] = value.strip()
                continue
            if key == "objective" and eq:
                other.setdefault("objective", {})["name"] = value.strip()
                continue
            if not eq or section not in ("params", "optimizer", "base", *OTHER) or not name_:
                raise SlimtuneError(
                    f"--methods: {spec!r}: options are SECTION.KEY=VALUE (sections params, "
                    f"optimizer, base, {', '.join(OTHER)}), base=NAME or objective=NAME"
                )
            target = {"params": params, "optimizer": optim, "base": base}.get(section)
            if target is None:
                target = other.setdefault(section, {})
            field_ = name_
            v = config.parse_overrides([f"x={value}"])["x"]
            if isinstance(v, str):  # YAML 1.1 reads 1e-5 as text
                with contextlib.suppress(ValueError):
                    v = float(v)
            target[field_] = v
        short = ", ".join(x.split(".", 1)[-1].strip() for x in opts.split(";") if x.strip())
        label = name.strip() + (f" ({short})" if short else "")
        named = AXES if "+" in name else ("params",) if p == name.strip() else ("optimizer",)
        if base and "name" not in base:
            raise SlimtuneError(f"--methods: {spec!r}: base options need base=NAME")
        out.append(Entry(label, params, optim, named, base or None, other))
    labels = [e.label for e in out]
    if len(set(labels)) != len(labels):
        raise SlimtuneError(f"--methods: a method is listed twice: {', '.join(labels)}")
    return out


def gemm_peak(dtype: str = "fp32", seconds: float = 2.0, n: int = 2048) -> float:
    """Best FLOP/s of an n x n matmul on this machine's default device (CPU here), over about
    ``seconds`` of repeats."""
    import torch

    from .models import DTYPES, pick_device

    device = pick_device("auto")
    a = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    a @ b  # warm-up
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def _predict(cfg: Any) -> Any:
    """The planner's breakdown for a recipe, or None where the model has no known shape."""
    from . import registry
    from .plan import shape_for, workload_for
    from .plan.planner import plan

    try:
        shape = shape_for(cfg.model.name)
    except SlimtuneError:
        return None
    # as `slimtune plan` prices it: the length the run's batches really pad to, from its data
    work = workload_for(cfg, steps=cfg.train.steps or None)
    p, o = registry.build("params", cfg.params), registry.build("optimizer", cfg.optimizer)
    return plan(shape, p, o, work, cfg.model.name)


@dataclass
class Finished:
    """How a fresh process ended and what it used (its own ``rusage``, from ``os.wait4``:
    ``RUSAGE_CHILDREN`` would be a maximum over every child so far)."""

    returncode: int
    peak_rss: int  # bytes: the child's peak resident set (ru_maxrss)
    cpu_s: float  # the child's user + system time
    wall_s: float


def run_fresh(
    cmd: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    poll: Callable[[], None] | None = None,
    poll_s: float = 0.5,
) -> Finished:
    """Run ``cmd`` in a fresh process, its output into ``log``, and wait for it, calling ``poll``
    every ``poll_s`` seconds meanwhile (e.g. to follow its metrics). ``env``: the child's whole
    environment (default: this process's)."""
    t = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, 0 if poll is None else os.WNOHANG)
            if pid:
                break
            time.sleep(poll_s)
            poll()  # type: ignore[misc]
    proc.returncode = os.waitstatus_to_exitcode(status)
    if poll is not None:
        poll()
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # macOS: bytes, else KiB
    return Finished(proc.returncode, rss, usage.ru_utime + usage.ru_stime, time.perf_counter() - t)


def run_worker(
    cmd: list[str],
    name: str,
    recipe: dict[str, Any],
    work: Path,
    poll: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run a worker on ``recipe`` in a fresh process: ``cmd + [work/spec.json]``, where the spec
    holds the recipe and the path the worker writes its JSON result to. Returns that result plus
    ``peak_rss`` (bytes) and ``wall_s``; a failed worker raises with the tail of its log
    (``work/log.txt``)."""
    work.mkdir(parents=True, exist_ok=True)
    spec = {"recipe": recipe, "result": str(work / "result.json")}
    (work / "spec.json").write_text(json.dumps(spec))
    log = work / "log.txt"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = run_fresh([*cmd, str(work / "spec.json")], log, env, poll)
    if done.returncode != 0:
        raise SlimtuneError(f"{name} failed (log {log}):\n{log.read_text()[-2000:]}")
    res = json.loads((work / "result.json").read_text())
    res["peak_rss"], res["wall_s"] = done.peak_rss, done.wall_s
    return res


# tqdm's own rate and ETA would count the time between steps (evaluations, the process's
# exit) as step time; the postfix shows the loop's own step times instead
BAR = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


def _run_one(
    entry: Entry, recipe: dict[str, Any], work: Path, bar_desc: str, steps: int
) -> dict[str, Any]:
    """Run one method in a fresh process; follow its metrics.jsonl for the progress bar."""
    from tqdm.auto import tqdm

    metrics = Path(recipe["output_dir"]) / "metrics.jsonl"
    bar = tqdm(total=steps, desc=bar_desc, unit="step", leave=True, bar_format=BAR)
    bar.set_postfix_str("loading, evaluating")

    def follow() -> None:
        rows = _step_rows(metrics)
        done = rows[-1]["step"] if rows else 0  # train.log_every may leave steps out
        if done > bar.n:
            bar.set_postfix_str(rate(rows, steps), refresh=False)
            bar.update(done - bar.n)

    try:
        cmd = [sys.executable, "-m", "slimtune.bench"]
        return run_worker(cmd, f"bench: {entry.label}", recipe, work, poll=follow)
    finally:
        bar.close()


def _step_rows(metrics: Path) -> list[dict[str, Any]]:
    """The training-step rows of a run's metrics.jsonl so far (evaluations left out)."""
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        if line.strip() and '"eval"' not in line:
            with contextlib.suppress(ValueError):  # a line being written
                rows.append(json.loads(line))
    return [r for r in rows if "step_s" in r]


def rate(rows: list[dict[str, Any]], steps: int) -> str:
    """'2.1 s/step, 250 tokens/s, ETA 15 s' from the loop's own step times (``step_s``: the
    optimizer step alone, no evaluation, loading or checkpointing), not the wall clock."""
    dt = sum(r["step_s"] for r in rows)
    tokens = sum(r["tokens_per_s"] * r["step_s"] for r in rows)
    per = dt / len(rows)
    left = max(steps - rows[-1]["step"], 0)
    eta = f", ETA {per * left:.0f} s" if left else ""
    return f"{per:.2f} s/step, {tokens / dt:.0f} tokens/s{eta}"


def worker(spec_path: str) -> None:
    """The child: run the recipe, write the summary and the loss curve."""
    from . import config
    from .console import quiet_libraries
    from .loop import train

    quiet_libraries()
    spec = json.loads(Path(spec_path).read_text())
    cfg = config.from_dict(spec["recipe"])
    result = train(cfg)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["loss"]) for r in rows if "loss" in r and "eval" not in r]
    Path(spec["result"]).write_text(json.dumps({"summary": result.summary, "curve": curve}))


def _own(cfg_dict: dict[str, Any], axis: str) -> dict[str, Any]:
    """The recipe's section of a method axis as a ``{name: ..., option: ...}`` spec."""
    value = cfg_dict.get(axis)
    if isinstance(value, str):
        return {"name": value}
    return {"name": DEFAULT_METHODS[axis], **(value or {})}


def sections(cfg_dict: dict[str, Any], e: Entry) -> dict[str, dict[str, Any]]:
    """The params and optimizer sections ``e`` runs with on the recipe ``cfg_dict``.

    An axis whose method is the recipe's own keeps the recipe's options (the entry's options
    over them) when the entry names that method, or when every method the entry names is the
    recipe's own: ``lora`` on a LoRA + AdamW recipe runs that recipe's LoRA with its AdamW,
    ``lora+mezo`` its LoRA with MeZO's defaults. Any other method starts from its defaults,
    as ``config.merge`` treats an axis that names another method; so ``full`` on a LoRA +
    AdamW recipe does not inherit a learning rate chosen for LoRA."""
    own = {ax: _own(cfg_dict, ax) for ax in AXES}
    mine = {"params": e.params, "optimizer": e.optimizer}
    same = {ax: own[ax]["name"] == mine[ax]["name"] for ax in AXES}
    whole = all(same[ax] for ax in e.named)
    return {
        ax: {**own[ax], **mine[ax]} if same[ax] and (ax in e.named or whole) else dict(mine[ax])
        for ax in AXES
    }


def _recipes(
    cfg_dict: dict[str, Any], entries: list[Entry], out_dir: Path
) -> tuple[list[dict[str, Any]], list[Any], int]:
    """Every method's recipe, validated before anything runs or is written; (recipes, their
    RunConfigs, train.steps)."""
    from . import config

    if out_dir.exists() and any(out_dir.iterdir()):
        raise SlimtuneError(f"bench: --out {str(out_dir)!r} is not empty")
    recipes, cfgs = [], []
    for e in entries:
        r = {**cfg_dict, **sections(cfg_dict, e)}
        if e.base:  # the base's own dtype (a quantised base's compute dtype) holds the rest
            r["base"] = dict(e.base)
            r["model"] = {k: v for k, v in r.get("model", {}).items() if k != "dtype"}
        for section, values in e.other.items():
            own = r.get(section) or {}
            own = {"name": own} if isinstance(own, str) else dict(own)
            r[section] = {**own, **values}
        cfgs.append(config.from_dict(r))
        recipes.append(r)
    steps = cfgs[0].train.steps
    if not steps:
        raise SlimtuneError("bench: train.steps must be set (--steps N)")
    return recipes, cfgs, steps


def _result(e: Entry, res: dict[str, Any], r: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """One method's entry of results.json, from its worker's result, its recipe ``r`` and the
    planner (``utilisation`` is filled in once the GEMM peak is final)."""
    s = res["summary"]
    pred = _predict(cfg)
    cuda = s["device"].startswith("cuda")
    measured = s["peak_memory_bytes"] if cuda else res["peak_rss"]
    flops = pred.flops_per_token if pred is not None else None
    steps = cfg.train.steps or max(len(res["curve"]), 1)
    return {
        "label": e.label,
        "params": r["params"],  # as run: the recipe's own options where the method is its own
        "optimizer": r["optimizer"],
        "from_recipe": [ax for ax in AXES if r[ax] != getattr(e, ax)],
        "curve": res["curve"],
        "final_loss": s["train_loss"],
        "eval_before": s["eval_before"],
        "eval_after": s["eval_after"],
        "peak_bytes": measured,
        "peak_kind": "max allocated" if cuda else "peak RSS",
        "predicted_peak_bytes": pred.peak if pred is not None else None,
        "tokens_per_s": s["tokens_per_s"],  # the loop's: optimizer steps only, no evaluation
        "s_per_step": s["train_seconds"] / steps,
        "flops_per_token": flops,
        "utilisation": None,
        "trainable_params": s["trainable_params"],
        "train_seconds": s["train_seconds"],
        "wall_seconds": res["wall_s"],
        "device": s["device"],
    }


def artefact_bytes(run_dir: Path) -> int:
    """Bytes of the weights a run saved (its safetensors files, checkpoints left out): what
    the method ships, without the tokenizer every method writes alike."""
    return sum(
        f.stat().st_size
        for f in run_dir.rglob("*.safetensors")
        if "checkpoints" not in f.relative_to(run_dir).parts
    )


def _run_all(
    entries: list[Entry],
    recipes: list[dict[str, Any]],
    cfgs: list[Any],
    out_dir: Path,
    steps: int,
    keep_runs: bool,
) -> list[dict[str, Any]]:
    """Run the methods one after the other, each in a fresh process; their results."""
    runs = out_dir / "runs"
    results = []
    t0 = time.perf_counter()
    for i, (e, r, c) in enumerate(zip(entries, recipes, cfgs)):
        slug = f"{i:02d}-" + "".join(ch if ch.isalnum() else "-" for ch in e.label)[:40]
        r = {**r, "output_dir": str(runs / slug), "overwrite": True}
        r["train"] = {**r.get("train", {}), "progress": False}
        elapsed = time.perf_counter() - t0
        eta = "" if not i else f", ETA {elapsed / i * (len(entries) - i):.0f} s"
        res = _run_one(
            e, r, out_dir / "work" / slug, f"[{i + 1}/{len(entries)}] {e.label}{eta}", steps
        )
        size = artefact_bytes(Path(r["output_dir"]))
        if not keep_runs:  # the trained weights of every method would fill the disk
            shutil.rmtree(r["output_dir"], ignore_errors=True)
        results.append({**_result(e, res, r, c), "artefact_bytes": size})
    return results


def run(
    cfg_dict: dict[str, Any],
    entries: list[Entry],
    out_dir: Path,
    gemm_seconds: float = 2.0,
    keep_runs: bool = False,
) -> dict[str, Any]:
    """Run the bench; write and return the results (see the module docstring)."""
    recipes, cfgs, steps = _recipes(cfg_dict, entries, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = cfgs[0].model.dtype
    print(f"bench: measuring the GEMM peak ({dtype}) ...", flush=True)
    peak = gemm_peak(dtype, gemm_seconds)
    print(f"bench: GEMM peak {peak / 1e9:.0f} GFLOP/s; {len(entries)} methods x {steps} steps")
    results = _run_all(entries, recipes, cfgs, out_dir, steps, keep_runs)
    # measured again after the runs: a peak taken while something else shared the cores would
    # be low and the utilisation too high; the larger of the two is the machine's
    peak = max(peak, gemm_peak(dtype, gemm_seconds))
    for m in results:
        if m["flops_per_token"]:
            m["utilisation"] = m["flops_per_token"] * m["tokens_per_s"] / peak
    report = {
        "model": cfgs[0].model.name,
        "dtype": dtype,
        "steps": steps,
        "batch_size": cfgs[0].train.batch_size,
        "max_seq_len": cfgs[0].data.max_seq_len,
        "data": cfgs[0].data.path,
        "seed": cfgs[0].train.seed,
        "gemm_peak_flops": peak,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "methods": results,
    }
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    plots(report, out_dir)
    (out_dir / "report.md").write_text(markdown(report))
    return report


def _metric(ev: dict[str, Any] | None) -> str:
    if not ev:
        return "-"
    if "accuracy" in ev:
        return f"{ev['accuracy']:.3f}"
    return f"{ev.get('loss', float('nan')):.3f}"


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.3f}" if n < 2**20 else f"{n / 2**20:.1f}"


def markdown(report: dict[str, Any]) -> str:
    ms = report["methods"]
    metric = "accuracy" if any("accuracy" in (m["eval_after"] or {}) for m in ms) else "loss"
    lines = [
        f"# slimtune bench: {report['model']} ({report['date']})",
        "",
        f"{report['steps']} steps of batch {report['batch_size']} x {report['max_seq_len']} "
        f"tokens, {report['dtype']} weights, data `{report['data']}`, seed {report['seed']}; "
        f"each method in a fresh process, same data order. GEMM peak measured in this run: "
        f"{report['gemm_peak_flops'] / 1e9:.0f} GFLOP/s.",
        "",
        f"| method | trainable | final loss | held-out {metric} before | after | peak GB "
        "| planned GB | artefact MB | s/step | tokens/s | utilisation | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in ms:
        pred, util = m["predicted_peak_bytes"], m["utilisation"]
        planned = f"{pred / GB:.2f}" if pred is not None else "-"
        lines.append(
            f"| {m['label']} | {m['trainable_params']:,} | {m['final_loss']:.4f} "
            f"| {_metric(m['eval_before'])} | {_metric(m['eval_after'])} "
            f"| {m['peak_bytes'] / GB:.2f} | {planned} | {_mb(m.get('artefact_bytes'))} "
            f"| {m.get('s_per_step', 0):.2f} "
            f"| {m['tokens_per_s']:.0f} | {f'{100 * util:.1f}%' if util is not None else '-'} "
            f"| {m['wall_seconds']:.0f} |"
        )
    inherited = [
        f"{m['label']} ({', '.join(m['from_recipe'])})" for m in ms if m.get("from_recipe")
    ]
    lines += [
        "",
        *([f"Run with the recipe's own options: {'; '.join(inherited)}.", ""] if inherited else []),
        f"Peak: {ms[0]['peak_kind']} of the method's process (evaluation included). Planned: "
        "`slimtune plan` for the same recipe, which prices the widest batch the run draws "
        "from its data (and, on CPU, the recipe's train.trim_memory setting). s/step and "
        "tokens/s: the optimizer steps alone (evaluation, loading and saving excluded). "
        "Utilisation: model FLOPs per token (planner) x tokens/s / GEMM peak (the larger of "
        "two measurements, before and after the methods); tokens/s counts non-padding tokens. "
        "Artefact: the safetensors files the run saved (adapter or weights; tokenizer and "
        "checkpoints left out).",
        "",
        "![loss](loss.png)",
        "",
        "![peak memory](memory.png)",
        "",
        "![tokens/s](speed.png)",
        "",
    ]
    return "\n".join(lines)


def _plot_loss(plt: Any, ms: list[dict[str, Any]], title: str, width: float, out_dir: Path) -> None:
    fig, ax = plt.subplots(figsize=(width, 4.8))
    colours = plt.get_cmap("tab10").colors
    for i, m in enumerate(ms):  # ten colours, then a new line style and marker: no two alike
        steps, losses = zip(*m["curve"]) if m["curve"] else ((), ())
        ax.plot(steps, losses, color=colours[i % 10], linestyle=("-", "--", ":", "-.")[i // 10 % 4],
                marker="osv^D"[i // 10 % 5], markersize=3, label=m["label"])  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"Loss vs step ({title})")
    ax.grid(alpha=0.3)
    if len(ms) > 6:  # beside the axes, so no curve hides behind it
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=len(ms) // 16 + 1)
    else:
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=120)
    plt.close(fig)


def _plot_memory(
    plt: Any, ms: list[dict[str, Any]], title: str, width: float, out_dir: Path
) -> None:
    labels, many = [m["label"] for m in ms], len(ms) > 6
    fig, ax = plt.subplots(figsize=(width, 4.8))
    x = range(len(ms))
    ax.bar(x, [m["peak_bytes"] / GB for m in ms], color="tab:blue", label=ms[0]["peak_kind"])
    planned = [
        (i, m["predicted_peak_bytes"] / GB) for i, m in enumerate(ms) if m["predicted_peak_bytes"]
    ]
    if planned:
        ax.scatter(*zip(*planned), color="tab:red", marker="_", s=900, linewidths=2.5,
                   label="planned (slimtune plan)", zorder=3)  # fmt: skip
    ax.set_xticks(list(x), labels, rotation=60 if many else 20, ha="right", fontsize=8)
    ax.set_ylabel("GB")
    ax.set_title(f"Peak memory ({title})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "memory.png", dpi=120)
    plt.close(fig)


def _plot_speed(
    plt: Any, ms: list[dict[str, Any]], title: str, width: float, out_dir: Path
) -> None:
    labels, many = [m["label"] for m in ms], len(ms) > 6
    fig, ax = plt.subplots(figsize=(width, 4.8))
    x = range(len(ms))
    bars = ax.bar(x, [m["tokens_per_s"] for m in ms], color="tab:green")
    for b, m in zip(bars, ms):
        if m["utilisation"] is not None:
            ax.annotate(f"{100 * m['utilisation']:.0f}%", (b.get_x() + b.get_width() / 2,
                        b.get_height()), ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set_xticks(list(x), labels, rotation=60 if many else 20, ha="right", fontsize=8)
    ax.set_ylabel("training tokens / s")
    ax.set_title(f"Throughput ({title})\nlabels: model FLOPs as % of the measured GEMM peak",
                 fontsize=10)  # fmt: skip
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "speed.png", dpi=120)
    plt.close(fig)


def plots(report: dict[str, Any], out_dir: Path) -> None:
    """loss.png, memory.png and speed.png of a report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = report["methods"]
    title = f"{report['model']}, batch {report['batch_size']} x {report['max_seq_len']}"
    width = max(7.0, 0.45 * len(ms) + 2)
    _plot_loss(plt, ms, title, width, out_dir)
    _plot_memory(plt, ms, title, width, out_dir)
    _plot_speed(plt, ms, title, width, out_dir)


if __name__ == "__main__":
    worker(sys.argv[1])
