"""Memory planning (issue 7): model shapes from configs, the analytic planner, ``slimtune plan``.

from slimtune.plan import estimate
b = estimate("llama-3-8b", "lora", "adamw", seq=2048, batch=1, weights="bf16",
             checkpointing=True, device="cuda")
print(b.peak / 2**30, b.by_name())
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from ..errors import SlimtuneError
from .lengths import run_seq
from .planner import GB, Breakdown, Workload, device_kind, method, plan, workload_of
from .shapes import ModelShape, bundled, load_shape, read_config

__all__ = [
    "Breakdown",
    "ModelShape",
    "Workload",
    "bundled",
    "candidates",
    "estimate",
    "format_breakdown",
    "format_ranking",
    "load_shape",
    "parse_size",
    "rank",
    "read_config",
    "recipe_specs",
    "shape_for",
    "with_candidates",
    "workload_for",
]

# slimtune's bundled runnable models -> their architecture configs
ALIASES = {"gemma3-270m": "gemma-3-270m", "tiny-llama": None}


def shape_for(model: str) -> ModelShape:
    """The shape of a bundled config name, a slimtune model name, or a config.json / model dir."""
    name = ALIASES.get(model, model)
    if name is None:
        raise SlimtuneError(
            f"model {model!r}: a test model; plan a real one ({', '.join(bundled())})"
        )
    return load_shape(name)


def parse_size(text: str) -> float:
    """'24GB', '24G', '24GiB', '512MB', '24' (GB) -> bytes (GB = 2**30 bytes, as nvidia-smi)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise SlimtuneError(f"--budget: cannot read {text!r} (e.g. 24GB, 512MB)")
    unit = {"": 3, "K": 1, "M": 2, "G": 3, "T": 4}[m.group(2).upper()]
    return float(m.group(1)) * 1024**unit


def split_method(spec: str) -> tuple[str, str]:
    """'lora' -> (lora, adamw); 'galore' -> (full, galore); 'lora+mezo' -> (lora, mezo)."""
    from .. import registry

    if "+" in spec:
        p, o = spec.split("+", 1)
        return p.strip(), o.strip()
    if spec in registry.names("params"):
        return spec, "adamw"
    if spec in registry.names("optimizer"):
        return "full", spec
    registry.get("params", spec)  # raises with a suggestion
    raise AssertionError


def estimate(
    model: str | ModelShape,
    params: Any = "full",
    optimizer: Any = "adamw",
    work: Workload | None = None,
    **workload: Any,
) -> Breakdown:
    """Plan one recipe: method names or ``{name: ..., field: ...}`` specs, a bundled model name
    (or config path / shape) and the workload's fields (``seq``, ``batch``, ``weights``, ...)."""
    shape = model if isinstance(model, ModelShape) else shape_for(model)
    work = replace(work or Workload(), **workload)
    name = model if isinstance(model, str) else shape.family
    return plan(shape, method("params", params), method("optimizer", optimizer), work, name)


def candidates() -> list[tuple[str, str]]:
    """What ``--budget`` ranks: every params method with AdamW, every optimizer with full
    fine-tuning (each in its default configuration), GaLore layer-wise with 8-bit state and
    LoRA with MeZO."""
    from .. import registry

    out: list[tuple[Any, Any]] = [(p, "adamw") for p in registry.names("params")]
    out += [("full", o) for o in registry.names("optimizer") if o != "adamw"]
    galore = {"name": "galore", "layerwise": True, "state_bits": 8}
    return [*out, ("full", galore), ("lora", "mezo")]


def workload_for(
    cfg: Any = None, runtime: str | None = None, read_data: bool = True, **given: Any
) -> Workload:
    """What ``slimtune plan`` prices: the recipe's workload (:func:`workload_of`; without a recipe
    the defaults on this machine's device), with the fields ``given`` (those not None) instead
    and ``runtime`` ('0.5GB') as the framework overhead. With a recipe and no ``seq`` given,
    ``read_data`` prices the length its batches really pad to (:func:`lengths.run_seq`: the
    widest batch the run draws from its tokenised data), else ``data.max_seq_len``."""
    work = workload_of(cfg) if cfg is not None else Workload(device=device_kind())
    given = {k: v for k, v in given.items() if v is not None}
    if cfg is not None and "seq" not in given:
        if read_data:
            choice = run_seq(cfg, given.get("batch"))
            work = replace(work, seq=choice.seq, seq_source=choice.why)
        else:
            work = replace(work, seq_source="data.max_seq_len")
    work = replace(work, **given)
    if runtime is not None:
        work = replace(work, runtime=parse_size(runtime))
    return work


def recipe_specs(cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A recipe's params and optimizer sections as ``{name: ..., field: ...}`` specs."""
    from dataclasses import asdict

    p, o = cfg.params, cfg.optimizer
    return {"name": p.name, **asdict(p)}, {"name": o.name, **asdict(o)}


def with_candidates(mine: tuple[Any, Any]) -> list[tuple[Any, Any]]:
    """``mine`` (a recipe's pair of specs), then every other of :func:`candidates`."""

    def names(p: Any, o: Any) -> tuple[str, str]:
        return (p if isinstance(p, str) else p["name"], o if isinstance(o, str) else o["name"])

    own = names(*mine)
    return [mine] + [(p, o) for p, o in candidates() if names(p, o) != own]


def label(spec: Any) -> str:
    """'lora' or {'name': 'galore', 'layerwise': True} -> 'galore(layerwise=True)'."""
    if isinstance(spec, str):
        return spec
    opts = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"{spec['name']}({opts})" if opts else spec["name"]


@dataclass
class Ranked:
    params: Any
    optimizer: Any
    breakdown: Breakdown
    checkpointing: bool
    fits: bool


def rank(
    shape: ModelShape,
    work: Workload,
    budget: float,
    pairs: list[tuple[Any, Any]] | None = None,
    allow_checkpointing: bool = True,
    name: str = "",
    fewest_processes: bool = False,
) -> list[Ranked]:
    """Every pair priced under ``work``; where it does not fit and ``allow_checkpointing``, again
    with activation checkpointing. Fitting ones first, by trainable parameters (largest first),
    then the rest by peak. ``fewest_processes`` (sharded work): each pair on the fewest
    processes (1, 2, 4, ... 1024) whose share fits, before checkpointing is tried."""
    out = []
    for p, o in pairs or candidates():
        try:
            b = plan(shape, method("params", p), method("optimizer", o), work, name)
            n = 1
            while fewest_processes and b.peak > budget and n < 1024:
                n *= 2
                b = plan(
                    shape,
                    method("params", p),
                    method("optimizer", o),
                    replace(work, processes=n),
                    name,
                )
        except SlimtuneError:
            continue  # a combination the methods refuse (e.g. nothing to train)
        ckpt = work.checkpointing
        if b.peak > budget and allow_checkpointing and not ckpt:
            b2 = plan(
                shape,
                method("params", p),
                method("optimizer", o),
                replace(b.work, checkpointing=True),
                name,
            )
            if b2.peak < b.peak:
                b, ckpt = b2, True
        out.append(Ranked(p, o, b, ckpt, b.peak <= budget))
    fit = sorted(
        (r for r in out if r.fits), key=lambda r: (-r.breakdown.trainable_params, r.breakdown.peak)
    )
    rest = sorted((r for r in out if not r.fits), key=lambda r: r.breakdown.peak)
    return fit + rest


def _gb(n: float) -> str:
    return f"{n / GB:.2f}"


def format_breakdown(b: Breakdown) -> str:
    w = b.work
    lines = [
        f"{b.params} + {b.optimizer} on {b.model}: {b.trainable_params:,} of "
        f"{b.total_params:,} parameters train ({100 * b.trainable_params / b.total_params:.2f}%)",
        f"workload: batch {w.batch} x seq {w.seq}, weights {w.weights}, mixed precision "
        f"{w.mixed_precision}, checkpointing {'on' if w.checkpointing else 'off'}, loss chunk "
        f"{w.loss_chunk or 'off'}, attention {w.attention}, device {w.device}",
        *([f"seq {w.seq}: {w.seq_source}"] if w.seq_source else []),
        "",
        f"{'component':<22}{'GB':>9}  {'when':<9} note",
    ]
    for t in b.terms:
        lines.append(f"{t.name:<22}{_gb(t.bytes):>9}  {t.phase:<9} {t.note}")
    ph = b.phases
    lines += [
        "",
        f"always held {_gb(b.total('always'))} GB + largest phase ({b.peak_phase}) "
        f"{_gb(max(ph.values()))} GB",
        f"predicted peak: {_gb(b.peak)} GB",
    ]
    lines += [f"note: {n}" for n in b.notes]
    return "\n".join(lines)


def format_ranking(
    ranked: list[Ranked], model: str, work: Workload, budget: float, mine: Any = None
) -> str:
    """``slimtune plan --budget``'s table: one row per ranked pair (``mine``, the recipe's own
    pair, named as the recipe names it), then how many fit."""
    lines = [
        f"{model}: batch {work.batch} x seq {work.seq}, weights {work.weights}, "
        f"{work.device}; budget {budget / GB:.2f} GB",
        f"{'fits':<6}{'params + optimizer':<44}{'peak GB':>9}{'trainable':>16}  notes",
    ]
    for r in ranked:
        b = r.breakdown
        mark = "yes" if r.fits else "no"
        notes = ["checkpointing"] if r.checkpointing and not work.checkpointing else []
        if b.work.sharding == "fsdp":
            notes.append(f"per process, {b.work.processes} processes")
        if mine is not None and r.params is mine[0]:
            name = f"{mine[0]['name']} + {mine[1]['name']}"
            notes.append("your recipe")
        else:
            name = label(r.params) + " + " + label(r.optimizer)
        note = ", ".join(notes)
        lines.append(f"{mark:<6}{name:<44}{b.peak / GB:>9.2f}{b.trainable_params:>16,}  {note}")
    n_fit = sum(r.fits for r in ranked)
    lines.append(f"{n_fit} of {len(ranked)} fit, largest trainable capacity first")
    return "\n".join(lines)
