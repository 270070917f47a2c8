"""THE training loop. Methods reach it only through their hooks (methods/base.py).

Read top to bottom: set-up (model, data, method, optimizer, accelerate), then one optimizer step
per iteration: gather ``grad_accum`` micro-batches, normalise the loss by the number of target
tokens of the whole step (so batch 8 == batch 4 x accumulation 2), backward, clip, step, log,
evaluate, checkpoint. Then the final artefacts and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from . import checkpoint, config, registry, rundir
from .config import RunConfig
from .data import Example, Splits, collate, index_stream, load_splits
from .errors import SlimtuneError, TrainingDiverged
from .evaluate import evaluate
from .loss import Head, causal_lm_loss, find_head
from .memory import fmt_bytes, optimizer_state_bytes, peak_bytes, trim_after_blocks, trim_heap
from .methods.base import ParamsMethod, PrepareContext
from .models import load_model, pick_device

log = logging.getLogger(__name__)

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    model: torch.nn.Module  # trained, unwrapped (adapters not merged)
    tokenizer: Any
    method: ParamsMethod
    optimizer: torch.optim.Optimizer | None = None


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


def _last_good(ckpt_root: Path) -> str:
    good = checkpoint.list_checkpoints(ckpt_root)
    return f"last good checkpoint: {good[-1]}" if good else "no checkpoint was written"


def _check_finite(
    state: dict[str, torch.Tensor], step: int, ckpt_root: Path, bar: Any, metrics_file: Any
) -> None:
    """No checkpoint and no final artefact may hold a non-finite weight. A finite loss and
    gradient can still give one (an update that overflows, e.g. a huge learning rate); the run
    then stops here, before writing, and the last checkpoint stays the last good one."""
    bad = next((n for n, t in state.items() if not bool(torch.isfinite(t).all())), None)
    if bad is None:
        return
    if bar is not None:
        bar.close()
    if metrics_file:
        metrics_file.close()
    raise TrainingDiverged(
        f"training stopped after step {step}: weight {bad!r} is no longer finite (the update "
        f"overflowed; lower optimizer.lr or set train.max_grad_norm); {_last_good(ckpt_root)}"
    )


def _apply_hyperparameters(
    optimizer: torch.optim.Optimizer, scheduler: Any, fresh: list[dict[str, Any]]
) -> None:
    """A resume allowed to change optimizer fields (``resume_changes``): the checkpoint's state
    dict brought back the old hyperparameters; put the recipe's back, and its learning rate
    where the schedule now stands."""
    for group, new in zip(optimizer.param_groups, fresh):
        group.update(new)
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def total_steps(cfg: RunConfig, n_train: int, world: int) -> int:
    if cfg.train.steps:
        return cfg.train.steps
    per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    return max(1, math.ceil(cfg.train.epochs * n_train / per_step))


class Batches:
    """Deterministic global micro-batches; each process takes its own slice of each one.

    ``position`` counts examples consumed by all processes together, so it alone (with the data
    seed) determines what comes next: that is what a checkpoint stores for an exact resume.
    """

    def __init__(self, examples: list[Example], batch: int, seed: int, rank: int, world: int):
        self.examples, self.batch, self.rank, self.world = examples, batch, rank, world
        self.seed, self.position = seed, 0
        self._stream = index_stream(len(examples), seed)

    def seek(self, position: int) -> None:
        self.position = position
        self._stream = index_stream(len(self.examples), self.seed, position)

    def next(self, pad_id: int) -> dict[str, torch.Tensor]:
        idx = [next(self._stream) for _ in range(self.batch * self.world)]
        self.position += len(idx)
        mine = idx[self.rank * self.batch : (self.rank + 1) * self.batch]
        return collate([self.examples[i] for i in mine], pad_id)


def train(
    cfg: RunConfig,
    *,
    on_step: Callable[[int, torch.nn.Module, dict[str, Any] | None], None] | None = None,
    splits: Splits | None = None,
    local: LocalRound | None = None,
) -> RunResult:
    """Run a recipe. Bad input raises SlimtuneError before anything is written.

    ``on_step(step, model, row)`` is called once before the first update (``row`` None) and after
    every optimizer step (and any checkpoint of that step): for progress displays and tests.
    """
    t_start = time.perf_counter()
    run_dir, tc = rundir.check(cfg), cfg.train
    device = pick_device(cfg.model.device)
    # accelerate keeps one process-wide state; a second run in the same process (a notebook, a
    # benchmark) with other precision or device settings must start from a clean one. The
    # distributed part (PartialState) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=tc.mixed_precision,
        log_with=tc.report_to or None,
        project_dir=str(run_dir),
    )
    # Every process has checked output_dir (rundir.check) before the main one takes it: it
    # creates it if needed and holds a lock on it for the run's life. Process group creation is
    # not a barrier with every backend (e.g. lazily initialised NCCL), hence the explicit one.
    accelerator.wait_for_everyone()
    owner = rundir.RunDir.acquire(cfg) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    phase = {"started": False}
    try:
        return _run(cfg, accelerator, owner, phase, t_start, on_step, splits, local)
    except BaseException:
        # Until the run has started (set-up done, checkpoint loaded, first evaluation done), a
        # failure takes back what this run wrote: a directory it created goes, an overwritten
        # run is still there if set-up failed (it is emptied only once set-up succeeded). After
        # it, checkpoints and metrics stay for the diagnosis and the resume.
        work = Path(cfg.output_dir) / rundir.WORK
        shutil.rmtree(
            work if owner is not None else work / f"rank{accelerator.process_index}",
            ignore_errors=True,
        )
        if owner is not None and not phase["started"]:
            owner.abandon()
        raise
    finally:
        if owner is not None:
            owner.release()


def _run(
    cfg: RunConfig,
    accelerator: Accelerator,
    owner: rundir.RunDir | None,
    phase: dict[str, bool],
    t_start: float,
    on_step: Callable[[int, torch.nn.Module, dict[str, Any] | None], None] | None,
    splits: Splits | None,
    local: LocalRound | None,
) -> RunResult:
    # --- set-up; nothing is written until all of it has succeeded ---------------------------
    run_dir, tc = Path(cfg.output_dir), cfg.train
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(tc.seed)
    if local is not None:
        model, tok = local.base
    else:
        model, tok = load_model(
            cfg.model.name,
            cfg.model.dtype,
            device=None,
            trust_remote_code=cfg.model.trust_remote_code,
            attn_implementation=cfg.model.attn_implementation,
        )
    splits = splits or load_splits(cfg.data, tok)
    batches = Batches(splits.train, tc.batch_size, tc.seed, rank, world)
    if local is not None and local.position:
        batches.seek(local.position)
    steps = total_steps(cfg, len(splits.train), world)

    method: ParamsMethod = registry.get("params", cfg.params.name)(cfg.params)
    if tc.gradient_checkpointing and not method.supports_checkpointing:
        raise SlimtuneError(
            f"params: {cfg.params.name} cannot be combined with "
            "train.gradient_checkpointing=true (its cached prefixes are applied again "
            "when a block is recomputed); set it to false"
        )
    optim_method = registry.get("optimizer", cfg.optimizer.name)(cfg.optimizer)
    work_dir = run_dir / rundir.WORK / f"rank{rank}"  # prepare() scratch, per process

    def calibration():
        cal = Batches(splits.train, tc.batch_size, tc.seed + 1, 0, 1)
        while True:
            yield cal.next(tok.pad_token_id)

    model.to(accelerator.device)
    source = local.calibration if local is not None and local.calibration else calibration
    ctx = PrepareContext(tok, work_dir, tc.seed, source, extras={"total_steps": steps})
    work_dir.mkdir(parents=True, exist_ok=True)
    model = method.prepare(model, ctx)
    model.config.use_cache = False
    if tc.gradient_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    if n_trainable == 0:
        raise SlimtuneError(f"params: method {cfg.params.name!r} left no trainable parameter")
    groups = method.param_groups(model, cfg.optimizer.weight_decay)
    optimizer = optim_method.build(groups, model)
    # An optimizer that updates inside backward (layer-wise GaLore) clips and reports the norm
    # itself; the loop tells it which micro-batch is the last (methods/base.py).
    in_backward = bool(getattr(optimizer, "steps_in_backward", False))
    if in_backward:
        if world > 1:
            raise SlimtuneError(
                f"optimizer: {cfg.optimizer.name}: layerwise updates run in a single process "
                f"only (this run has {world}); set optimizer.layerwise=false"
            )
        if tc.mixed_precision == "fp16":
            raise SlimtuneError(
                f"optimizer: {cfg.optimizer.name}: layerwise updates cannot be combined with "
                "train.mixed_precision=fp16 (its loss scaling unscales gradients at step(), after "
                "they were applied); use bf16 or no"
            )
        optimizer.max_grad_norm = tc.max_grad_norm
    zeroth = bool(getattr(optimizer, "zeroth_order", False))
    if zeroth:
        if tc.mixed_precision == "fp16":
            raise SlimtuneError(
                f"optimizer: {cfg.optimizer.name}: zeroth-order steps take no fp16 loss "
                "scaling; use train.mixed_precision=bf16 or no"
            )
        optimizer.loss_chunk_tokens = tc.loss_chunk_tokens
    raw_optimizer = optimizer
    if local is not None and local.setup is not None:
        local.setup(model, optimizer, method)
    scheduler = get_scheduler(
        SCHEDULES[tc.schedule],
        optimizer,
        num_warmup_steps=tc.warmup_steps,
        num_training_steps=steps,
    )
    # Resolve the head before accelerate wraps forward in autocast: the check compares the
    # model's own logits with head(final hidden state) in the model's dtype.
    head: Head = find_head(model)
    trims = []
    if tc.trim_memory and accelerator.device.type == "cpu":
        trims = trim_after_blocks(model)
        if not trims:
            log.warning("train.trim_memory: not glibc or no transformer blocks; no effect")
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    plain = accelerator.unwrap_model(model)

    # --- the run directory -------------------------------------------------------------------
    step, tokens_seen, train_seconds = 0, 0, 0.0
    ckpt_root = run_dir / "checkpoints"
    changes: dict[str, list[Any]] = {}
    if cfg.resume:
        last = checkpoint.list_checkpoints(ckpt_root)[-1]
        changes = rundir.resume_changes(cfg, run_dir)
        # The freshly built hyperparameters, before the checkpoint's replace them.
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        state = checkpoint.restore(
            last,
            load_trainable=lambda p: method.load_trainable(plain, p),
            optimizer=optimizer,
            scheduler=scheduler,
        )
        if any(k.startswith("optimizer.") for k in changes):
            _apply_hyperparameters(optimizer, scheduler, fresh)
        step, tokens_seen = state["step"], state["tokens"]
        train_seconds = state["train_seconds"]
        batches.seek(state["position"])
        log.warning("resumed from %s (step %d)", last, step)
    main = accelerator.is_main_process
    if main:
        if cfg.overwrite and not cfg.resume:
            owner.clear()
        owner.tidy()
        if cfg.resume:
            rundir.truncate_metrics(run_dir, step)
        (run_dir / "config.yaml").write_text(config.dump(cfg))
    metrics_file = (run_dir / "metrics.jsonl").open("a") if main else None
    if main and changes:
        metrics_file.write(
            json.dumps({"event": "resume", "from_step": step, "changes": changes}) + "\n"
        )
    if tc.report_to:
        accelerator.init_trackers("slimtune", config=cfg.to_dict())

    def write(row: dict[str, Any]) -> None:
        if main:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            if tc.report_to:
                accelerator.log(
                    {k: v for k, v in row.items() if isinstance(v, (int, float))},
                    step=row.get("step"),
                )

    def run_eval(tag: str) -> dict[str, Any]:
        if not splits.eval or not main:
            return {}
        t = time.perf_counter()
        result = evaluate(
            plain,
            tok,
            head,
            splits.eval,
            cfg.eval,
            tc.loss_chunk_tokens,
            progress=tc.progress,
            desc=f"eval {tag}",
        )
        result["seconds"] = time.perf_counter() - t
        write({"step": step, "eval": tag, **{k: v for k, v in result.items() if k != "samples"}})
        return result

    eval_before = run_eval("before") if tc.eval_before and not cfg.resume else {}
    # From here on the directory holds a run worth keeping (metrics, soon checkpoints): a
    # failure leaves it for the diagnosis and the resume; before, it is taken back.
    phase["started"] = True
    accelerator.wait_for_everyone()

    # --- the loop ----------------------------------------------------------------------------
    if on_step is not None:
        on_step(step, plain, None)
    bar = tqdm(
        total=steps, initial=step, disable=not (main and tc.progress), desc="train", unit="step"
    )
    last_loss = float("nan")
    while step < steps:
        method.on_step_start(plain, step, optimizer)
        t0 = time.perf_counter()
        micro = [batches.next(tok.pad_token_id) for _ in range(tc.grad_accum)]
        # Normalise by the target tokens of the whole step on all processes, so that the update
        # does not depend on how the step is split into micro-batches or processes.
        mine = torch.tensor([sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)])
        n_targets = int(accelerator.reduce(mine.to(accelerator.device), "sum").item())
        step_tokens = torch.tensor([sum(int(b["attention_mask"].sum()) for b in micro)])
        step_tokens = int(accelerator.reduce(step_tokens.to(accelerator.device), "sum").item())
        loss_sum = torch.zeros((), device=accelerator.device)
        for i, b in enumerate(() if zeroth else micro):
            b = {k: v.to(accelerator.device) for k, v in b.items()}
            sync = nullcontext() if i == len(micro) - 1 else accelerator.no_sync(model)
            if in_backward:
                raw_optimizer.accumulating = i < len(micro) - 1
            with sync, accelerator.autocast():
                ce, _ = causal_lm_loss(model, head, b, tc.loss_chunk_tokens)
                accelerator.backward(ce * world / max(n_targets, 1))
            loss_sum += ce.detach().float()
        loss = float(accelerator.reduce(loss_sum, "sum")) / max(n_targets, 1)
        grad_norm = None
        if zeroth:  # forward passes only; the optimizer perturbs, estimates and updates

            def losses(
                forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                micro: list[dict[str, torch.Tensor]] = micro,
                n_targets: int = n_targets,
            ) -> torch.Tensor:
                device = accelerator.device
                total = sum(forward({k: v.to(device) for k, v in b.items()}) for b in micro)
                return accelerator.reduce(total, "sum") / max(n_targets, 1)

            with torch.no_grad(), accelerator.autocast():
                loss = float(raw_optimizer.step(losses))
        elif in_backward:  # already clipped and applied inside backward
            grad_norm = raw_optimizer.grad_norm()
        else:
            params = [p for p in model.parameters() if p.requires_grad]
            if tc.max_grad_norm > 0:
                grad_norm = float(accelerator.clip_grad_norm_(params, tc.max_grad_norm))
            else:  # no clipping, but a non-finite gradient must still never reach the weights
                grads = [p.grad for p in params if p.grad is not None]
                grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            # Stop before the optimizer step: the weights and the last checkpoint stay good
            # (a layer-wise optimizer has applied the finite parts already: the checkpoint is).
            optimizer.zero_grad(set_to_none=True)
            bar.close()
            if metrics_file:
                metrics_file.close()
            raise TrainingDiverged(
                f"training stopped at step {step + 1}: loss is {loss}, grad norm {grad_norm}; "
                f"{_last_good(ckpt_root)}"
            )
        if not zeroth:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if trims:
            trim_heap()
        step += 1
        dt = time.perf_counter() - t0
        train_seconds += dt
        tokens_seen += step_tokens
        last_loss = loss
        row = {
            "step": step,
            "loss": loss,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens": tokens_seen,
            "tokens_per_s": step_tokens / dt,
            "step_s": dt,
            "peak_mem_mb": peak_bytes(accelerator.device) / 2**20,
        }
        if zeroth:
            row.update(raw_optimizer.step_info)
        if step % tc.log_every == 0 or step == steps:
            write(row)
        bar.set_postfix(
            loss=f"{loss:.4f}",
            tok_s=f"{row['tokens_per_s']:.0f}",
            peak=fmt_bytes(peak_bytes(accelerator.device)),
        )
        bar.update(1)
        if tc.eval_every and step % tc.eval_every == 0 and step < steps:
            run_eval(f"step-{step}")
        if tc.save_every and step % tc.save_every == 0:
            _check_finite(method.trainable_state(plain), step, ckpt_root, bar, metrics_file)
            if main:
                checkpoint.save(
                    ckpt_root,
                    step,
                    save_trainable=lambda p: method.save_trainable(plain, p),
                    optimizer=optimizer,
                    scheduler=scheduler,
                    state={
                        "step": step,
                        "position": batches.position,
                        "tokens": tokens_seen,
                        "train_seconds": train_seconds,
                    },
                    keep=tc.keep_checkpoints,
                )
            accelerator.wait_for_everyone()
        if on_step is not None:
            on_step(step, plain, row)
    bar.close()
    for handle in trims:
        handle.remove()

    # --- results -----------------------------------------------------------------------------
    eval_after = run_eval("after")
    summary = {
        "params": cfg.params.name,
        "optimizer": cfg.optimizer.name,
        "model": cfg.model.name,
        "steps": step,
        "processes": world,
        "train_loss": last_loss,
        "trainable_params": n_trainable,
        "total_params": n_total,
        "trainable_fraction": n_trainable / n_total,
        "tokens": tokens_seen,
        "train_seconds": train_seconds,
        "tokens_per_s": tokens_seen / train_seconds if train_seconds else 0.0,
        "peak_memory_bytes": peak_bytes(accelerator.device),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "device": str(accelerator.device),
        "eval_before": eval_before,
        "eval_after": eval_after,
        "wall_seconds": time.perf_counter() - t_start,
    }
    _check_finite(method.trainable_state(plain), step, ckpt_root, None, metrics_file)
    if main and local is None:
        checkpoint.publish(run_dir, lambda out: method.save(plain, tok, out))
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        metrics_file.close()
        shutil.rmtree(run_dir / ".work", ignore_errors=True)
    if tc.report_to:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return RunResult(run_dir, summary, plain, tok, method, raw_optimizer)
