"""A run's parts, assembled before its first step: the methods (checked against the loop's
settings), the model and tokenizer, the data and its order, the prepared model, the optimizer
and its schedule, the output head and accelerate's wrapping.

Nothing is written here but the methods' scratch space (``work_dir``, for ``prepare()``), which
the loop removes whatever happens; the run directory stays as it was until all of it succeeded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from transformers import get_scheduler

from . import registry
from .config import RunConfig
from .data import Batches, Splits, Tokenise, load_splits, total_steps
from .errors import SlimtuneError
from .loss import Head, find_head
from .memory import optimizer_state_bytes, peak_bytes, trim_after_blocks
from .methods.base import (
    Objective,
    ObjectiveContext,
    OptimizerMethod,
    ParamsMethod,
    PrepareContext,
)
from .models import dense_weights, load_recipe_model, pick_device
from .plan.planner import device_kind
from .sharding import shard

log = logging.getLogger(__name__)

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def make_accelerator(cfg: RunConfig, run_dir: Path) -> Accelerator:
    device = pick_device(cfg.model.device)
    # accelerate keeps one process-wide state; a second run in the same process (a notebook, a
    # benchmark) with other precision or device settings must start from a clean one. The
    # distributed part (PartialState) is kept.
    AcceleratorState._reset_state()
    return Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=cfg.train.mixed_precision,
        log_with=cfg.train.report_to or None,
        project_dir=str(run_dir),
    )


@dataclass
class LocalRound:
    """How a federated client runs the loop for one round (see ``federated/``).

    ``base`` is a loaded (model, tokenizer) pair the run may modify (the caller passes a copy);
    ``position`` is where the client's data order continues from; ``calibration`` replaces the
    run's own calibration batches (every party must prepare the model alike);
    ``setup(model, optimizer, method)`` runs once before the first step (it loads the round's
    start state); no final artefacts are written.
    """

    base: tuple[torch.nn.Module, Any]
    position: int = 0
    calibration: Callable[[], Any] | None = None
    setup: Callable[[torch.nn.Module, torch.optim.Optimizer, ParamsMethod], None] | None = None


@dataclass
class RunResult:
    """What :func:`slimtune.loop.train` returns."""

    run_dir: Path
    summary: dict[str, Any]
    model: torch.nn.Module  # trained, unwrapped (adapters not merged)
    tokenizer: Any
    method: ParamsMethod
    optimizer: torch.optim.Optimizer | None = None


@dataclass
class Parts:
    method: ParamsMethod
    optim_method: OptimizerMethod
    objective: Objective
    tok: Any
    splits: Splits
    batches: Batches  # the training order; a checkpoint stores its position
    steps: int  # optimizer steps of the whole run
    model: torch.nn.Module  # as prepared by accelerate (DDP-wrapped under several processes)
    plain: torch.nn.Module  # the same model unwrapped: what methods save and evaluate
    optimizer: Any  # as prepared by accelerate
    raw_optimizer: torch.optim.Optimizer  # the optimizer method's own object
    scheduler: Any
    head: Head
    trims: list[Any]  # train.trim_memory's hooks, removed when the loop ends
    n_trainable: int
    n_total: int


def assemble(
    cfg: RunConfig,
    acc: Accelerator,
    work_dir: Path,
    splits: Splits | None,
    local: LocalRound | None,
) -> Parts:
    """Every part of a run, in the order that keeps runs reproducible from ``train.seed``
    (model loading, data, ``prepare`` and the optimizer draw from the seeded generators)."""
    tc, world = cfg.train, acc.num_processes
    set_seed(tc.seed)
    method, optim_method = _methods(cfg, world)
    if local is not None:
        model, tok = local.base
    else:
        model, tok = load_recipe_model(cfg.model, place=False, base=cfg.base)  # accelerate places
    splits = splits or load_splits(cfg.data, tok)
    if cfg.data.chat_template:  # the saved tokenizer carries the template the run trained with
        tok.chat_template = Tokenise(tok, cfg.data).template
    batches = Batches(splits.train, tc.batch_size, tc.seed, acc.process_index, world)
    if local is not None and local.position:
        batches.seek(local.position)
    steps = total_steps(cfg, len(splits.train), world)

    own = local.calibration if local is not None else None
    source = own or (lambda: _calibration(splits, tc.batch_size, tc.seed + 1, tok.pad_token_id))
    ctx = PrepareContext(tok, work_dir, tc.seed, source, extras={"total_steps": steps})
    storage = registry.build("base", cfg.base)
    if storage.quantised:  # what the base replaced, for inits that compare (LoftQ)
        ctx.extras["dense_weight"] = dense_weights(cfg.model.name)
        ctx.extras["quantised_weight"] = storage.dense_weight
    model = _prepare(cfg, acc, method, model, ctx)
    # Resolve the head before accelerate wraps forward in autocast: the check compares the
    # model's own logits with head(final hidden state) in the model's dtype.
    head = find_head(model)
    # The objective sees the model as prepared, before a federated round loads its start
    # state: a preference reference is the run's initial model, in every round.
    objective = registry.build("objective", cfg.objective)
    objective.setup(
        ObjectiveContext(
            model, method, splits, head, tc.loss_chunk_tokens, cfg.eval.batch_size,
            tok.pad_token_id, progress=tc.progress and acc.is_main_process,
            optimizer=optim_method, tokenizer=tok, main=acc.is_main_process,
        )
    )  # fmt: skip
    if tc.sharding == "fsdp":  # before the optimizer: it must hold the shards
        model = shard(model, acc.device, world)
    raw = optim_method.build(method.param_groups(model, cfg.optimizer.weight_decay), model)
    if local is not None and local.setup is not None:
        local.setup(model, raw, method)
    scheduler = get_scheduler(
        SCHEDULES[tc.schedule], raw, num_warmup_steps=tc.warmup_steps, num_training_steps=steps
    )
    trims = _trims(model) if tc.trim_memory and acc.device.type == "cpu" else []
    model.train()
    if tc.sharding == "fsdp":  # FSDP synchronises gradients itself: no DDP wrapper
        wrapped, optimizer = model, acc.prepare(raw)
    else:
        wrapped, optimizer = acc.prepare(model, raw)
    return Parts(
        method=method,
        optim_method=optim_method,
        objective=objective,
        tok=tok,
        splits=splits,
        batches=batches,
        steps=steps,
        model=wrapped,
        plain=acc.unwrap_model(wrapped),
        optimizer=optimizer,
        raw_optimizer=raw,
        scheduler=scheduler,
        head=head,
        trims=trims,
        n_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        n_total=sum(p.numel() for p in model.parameters()),
    )


def _methods(cfg: RunConfig, world: int) -> tuple[ParamsMethod, OptimizerMethod]:
    """The recipe's params and optimizer methods, refusing settings they cannot honour before
    anything is loaded."""
    method = registry.build("params", cfg.params)
    optim_method = registry.build("optimizer", cfg.optimizer)
    storage = registry.build("base", cfg.base)
    storage.check(method, optim_method)
    device = device_kind(cfg.model.device)
    storage.check_device(device)
    optim_method.check_device(device)
    optim_method.check(cfg.train, world)
    method.check_optimizer(optim_method)
    if not optim_method.supports_objective(cfg.objective.name):
        raise SlimtuneError(
            f"optimizer: {cfg.optimizer.name} cannot minimise objective {cfg.objective.name!r}; "
            "choose a first-order optimizer (e.g. adamw) or objective causal-lm"
        )
    objective = registry.get("objective", cfg.objective.name)
    if objective.pairs and cfg.data.format != "preference":
        raise SlimtuneError(
            f"objective: {cfg.objective.name} learns from preference pairs; data.format is "
            f"{cfg.data.format!r} (set data.format: preference: prompt, chosen, rejected)"
        )
    if cfg.data.packing and not method.supports_packing:
        raise SlimtuneError(
            f"data.packing: params {cfg.params.name} puts virtual tokens before each row, so "
            "packed examples could not be kept apart in attention; set data.packing: false"
        )
    if cfg.data.packing and cfg.objective.name != "causal-lm":
        raise SlimtuneError(
            f"data.packing: objective {cfg.objective.name} scores each example's sequences on "
            "their own; set data.packing: false"
        )
    if cfg.train.sharding == "fsdp":
        _check_sharding(cfg, method, optim_method, storage)
    if cfg.train.gradient_checkpointing and not method.supports_checkpointing:
        raise SlimtuneError(
            f"params: {cfg.params.name} cannot be combined with "
            "train.gradient_checkpointing=true (its cached prefixes are applied again "
            "when a block is recomputed); set it to false"
        )
    return method, optim_method


def _check_sharding(
    cfg: RunConfig, method: ParamsMethod, optim_method: OptimizerMethod, storage: Any
) -> None:
    """train.sharding: fsdp takes what is tested to equal one process (tests/test_sharding.py);
    the rest is refused here, before anything loads, with what to use instead."""
    instead = "set train.sharding: none (each process holds the whole model)"
    for what, why in (
        (f"params: {cfg.params.name}", method.sharding_refusal()),
        (f"optimizer: {cfg.optimizer.name}", optim_method.sharding_refusal()),
    ):
        if why is not None:
            raise SlimtuneError(f"train.sharding: fsdp: {what} {why}; {instead}")
    if storage.quantised:
        raise SlimtuneError(
            f"train.sharding: fsdp: base {cfg.base.name} stores packed 4/8-bit weights that "
            f"FSDP cannot split; {instead}"
        )
    unsupported = {
        "objective": cfg.objective.name != "causal-lm",
        "train.gradient_checkpointing": cfg.train.gradient_checkpointing,
        "train.mixed_precision": cfg.train.mixed_precision != "no",
    }
    for key, on in unsupported.items():
        if on:
            raise SlimtuneError(
                f"train.sharding: fsdp with {key} is not tested yet; {instead}, or leave "
                f"{key} at its default"
            )


def _prepare(
    cfg: RunConfig,
    acc: Accelerator,
    method: ParamsMethod,
    model: torch.nn.Module,
    ctx: PrepareContext,
) -> torch.nn.Module:
    """The params method's form of the model, on the run's device, ready to train."""
    model.to(acc.device)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    model = method.prepare(model, ctx)
    model.config.use_cache = False
    if cfg.train.gradient_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise SlimtuneError(f"params: method {cfg.params.name!r} left no trainable parameter")
    return model


def _calibration(
    splits: Splits, batch: int, seed: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Training batches in their own seeded order, for methods that calibrate on data."""
    cal = Batches(splits.train, batch, seed, 0, 1)
    while True:
        yield cal.next(pad_id)


def _trims(model: torch.nn.Module) -> list[Any]:
    """train.trim_memory: give freed heap pages back after every block (glibc, CPU)."""
    trims = trim_after_blocks(model)
    if not trims:
        log.warning("train.trim_memory: not glibc or no transformer blocks; no effect")
    return trims


def run_summary(
    cfg: RunConfig,
    p: Parts,
    acc: Accelerator,
    steps: int,
    train_loss: float,
    tokens: int,
    train_seconds: float,
) -> dict[str, Any]:
    """summary.json's account of the training itself: what ran, how far, how fast and in how
    much memory (the loop adds the held-out evaluations and the wall time)."""
    n = p.n_trainable
    return {
        "params": cfg.params.name,
        "optimizer": cfg.optimizer.name,
        "model": cfg.model.name,
        "steps": steps,
        "processes": acc.num_processes,
        "train_loss": train_loss,
        "trainable_params": n,
        "total_params": p.n_total,
        "trainable_fraction": n / p.n_total,
        "tokens": tokens,
        "train_seconds": train_seconds,
        "tokens_per_s": tokens / train_seconds if train_seconds else 0.0,
        "peak_memory_bytes": peak_bytes(acc.device),
        "optimizer_state_bytes": optimizer_state_bytes(p.optimizer),
        "device": str(acc.device),
    }
