"""THE training loop. Methods reach it only through their hooks (methods/base.py).

A run is a :class:`Run` whose phases are called in order by :func:`train`: ``setup`` (model,
data, methods, optimizer, accelerate), ``resume`` (a checkpoint's state), ``open`` (the run
directory), then ``fit``: one optimizer step per iteration (the optimizer method owns the step:
``OptimizerMethod.step``), ``log``, ``evaluate`` and ``save`` around it; ``finish`` writes the
final artefacts and ``summary.json``. The loop knows no method family by name.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from . import checkpoint, rundir
from .assemble import LocalRound, RunResult, assemble, make_accelerator, run_summary
from .config import RunConfig
from .data import Splits
from .errors import Interrupted, TrainingDiverged
from .evaluate import evaluate
from .interrupt import GracefulStop
from .memory import fmt_bytes, peak_bytes, trim_heap
from .methods.base import StepContext
from .sharding import full_weights, is_sharded
from .trackers import tracker_config, tracker_row


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
    run_dir = rundir.check(cfg)
    accelerator = make_accelerator(cfg, run_dir)
    # Every process has checked output_dir (rundir.check) before the main one takes it: it
    # creates it if needed and holds a lock on it for the run's life. Process group creation is
    # not a barrier with every backend (e.g. lazily initialised NCCL), hence the explicit one.
    accelerator.wait_for_everyone()
    owner = rundir.RunDir.acquire(cfg) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    run = Run(cfg, accelerator, owner, on_step, local)
    try:
        run.setup(splits)
        run.open(run.resume())
        run.fit()
        return run.finish(t_start)
    except BaseException:
        run.abandon()
        raise
    finally:
        if owner is not None:
            owner.release()


def step_tokens(batch: dict[str, torch.Tensor], pairs: bool) -> int:
    """Tokens a step's forward runs for ``batch`` (with ``pairs``: the rejected rows too)."""
    n = int(batch["attention_mask"].sum())
    return n + int(batch["rejected_attention_mask"].sum()) if pairs else n


class Run:
    """One training run; :func:`train` calls its phases in order."""

    def __init__(self, cfg: RunConfig, accelerator: Accelerator, owner, on_step, local):
        self.cfg, self.tc, self.acc, self.owner = cfg, cfg.train, accelerator, owner
        self.on_step, self.local = on_step, local
        self.run_dir = Path(cfg.output_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.main = accelerator.is_main_process
        self.work_dir = self.run_dir / rundir.WORK / f"rank{accelerator.process_index}"
        self.started = False  # the directory holds a run worth keeping (see abandon)
        self.step, self.tokens_seen, self.train_seconds = 0, 0, 0.0
        self.metrics_file: Any = None  # metrics.jsonl, main process only, once open
        self.bar: Any = None  # the training progress bar, once fitting
        self.eval_before: dict[str, Any] = {}

    # --- set-up: nothing is written until all of it has succeeded ---------------------------
    def setup(self, splits: Splits | None) -> None:
        self.p = assemble(self.cfg, self.acc, self.work_dir, splits, self.local)

    # --- resume and the run directory --------------------------------------------------------
    def resume(self) -> dict[str, list[Any]]:
        """Load the newest checkpoint (resume=true); returns the recipe changes it allowed."""
        if not self.cfg.resume:
            return {}
        state, changes = checkpoint.resume(self.p, self.cfg)
        self.step, self.tokens_seen = state["step"], state["tokens"]
        self.train_seconds = state["train_seconds"]
        return changes

    def open(self, changes: dict[str, list[Any]]) -> None:
        if self.main:
            self.metrics_file = self.owner.open(self.cfg, self.step, changes)
        if self.tc.report_to:
            self.acc.init_trackers("slimtune", config=tracker_config(self.cfg))

    def log(self, row: dict[str, Any]) -> None:
        if not self.main:
            return
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.tc.report_to:
            self.acc.log(tracker_row(row), step=row.get("step"))

    def evaluate(self, tag: str) -> dict[str, Any]:
        # sharded weights are gathered from every process, so every process evaluates (the
        # same examples, the same results); the main process alone otherwise
        sharded = is_sharded(self.p.plain)
        if not self.p.splits.eval or not (self.main or sharded):
            return {}
        t, p, tc = time.perf_counter(), self.p, self.tc
        data = (p.plain, p.tok, p.head, p.splits.eval, self.cfg.eval, tc.loss_chunk_tokens)
        with full_weights(p.plain, blocks=False):
            result = evaluate(
                *data, progress=tc.progress, desc=f"eval {tag}", objective=p.objective
            )
        if not self.main:
            return {}
        result["seconds"] = time.perf_counter() - t
        metrics = {k: v for k, v in result.items() if k != "samples"}
        self.log({"step": self.step, "eval": tag, **metrics})
        return result

    # --- the loop ----------------------------------------------------------------------------
    def fit(self) -> None:
        tc = self.tc
        if tc.eval_before and not self.cfg.resume:
            self.eval_before = self.evaluate("before")
        # From here on the directory holds a run worth keeping (metrics, soon checkpoints): a
        # failure leaves it for the diagnosis and the resume; before, it is taken back.
        self.started = True
        self.acc.wait_for_everyone()
        if self.on_step is not None:
            self.on_step(self.step, self.p.plain, None)
        show = self.main and tc.progress
        self.bar = tqdm(
            total=self.p.steps, initial=self.step, disable=not show, desc="train", unit="step"
        )
        self.last_loss = float("nan")
        # Ctrl-C / SIGTERM: stop after this step with a checkpoint (a federated round has none)
        with GracefulStop(enabled=self.local is None) as stop:
            while self.step < self.p.steps:
                row = self.train_step()
                if self.step % tc.log_every == 0 or self.step == self.p.steps:
                    self.log(row)
                peak = fmt_bytes(peak_bytes(self.acc.device))
                tok_s = f"{row['tokens_per_s']:.0f}"
                self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=tok_s, peak=peak)
                self.bar.update(1)
                if tc.eval_every and self.step % tc.eval_every == 0 and self.step < self.p.steps:
                    self.evaluate(f"step-{self.step}")
                saved = bool(tc.save_every) and self.step % tc.save_every == 0
                if saved:
                    self.save()
                if self.on_step is not None:
                    self.on_step(self.step, self.p.plain, row)
                if stop.requested(self.acc):
                    self.stop(saved)
        self.bar.close()
        for handle in self.p.trims:
            handle.remove()

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (the optimizer method's own), then the schedule; its metrics row."""
        acc, tc = self.acc, self.tc
        self.p.method.on_step_start(self.p.plain, self.step, self.p.optimizer)
        self.p.objective.on_step_start(self.step, self.p.steps, self.p.plain, self.run_dir)
        t0 = time.perf_counter()
        micro = [self.p.batches.next(self.p.tok.pad_token_id) for _ in range(tc.grad_accum)]
        # Normalise by the target tokens of the whole step on all processes, so that the update
        # does not depend on how the step is split into micro-batches or processes.
        n_targets = self.count(micro, self.p.objective.targets)
        # every sequence the step runs: a pair objective's rejected ones too
        pairs = self.p.objective.sequences_per_example == 2
        tokens = self.count(micro, lambda b: step_tokens(b, pairs))
        head, chunk = self.p.head, tc.loss_chunk_tokens
        method, plain = self.p.method, self.p.plain
        # the params method's own loss term, once per step: each micro-batch adds its share,
        # scaled so that dividing the step's sum by its target count leaves the term itself
        share = n_targets / (acc.num_processes * len(micro))
        terms: list[torch.Tensor] = []  # each micro-batch's regulariser, for the metrics row

        def loss_sum(m: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
            out = self.p.objective.loss_sum(m, head, b, chunk)
            extra = method.regulariser(plain)
            if extra is None:
                return out
            terms.append(extra.detach())  # read once after the step (no sync per micro-batch)
            return out + extra.to(out.dtype) * share

        result = self.p.optim_method.step(
            StepContext(
                accelerator=acc,
                model=self.p.model,
                optimizer=self.p.optimizer,
                raw=self.p.raw_optimizer,
                micro=micro,
                n_targets=n_targets,
                loss_sum=loss_sum,
                max_grad_norm=tc.max_grad_norm,
                loss_chunk_tokens=chunk,
                guard=self.guard,
                objective=self.p.objective,
            )
        )
        method.after_update(plain, self.step)
        self.p.scheduler.step()
        self.p.optimizer.zero_grad(set_to_none=True)
        if self.p.trims:
            trim_heap()
        self.step += 1
        dt = time.perf_counter() - t0
        self.train_seconds += dt
        self.tokens_seen += tokens
        # the step's loss minimised includes the method's own term; the row reports the
        # objective's loss and the term apart (means over micro-batches and processes)
        extra = self.mean_over_processes(float(sum(terms)) / len(micro)) if terms else None
        loss = result.loss - extra if extra is not None else result.loss
        self.last_loss = loss
        row = {
            "step": self.step,
            "loss": loss,
            "lr": self.p.scheduler.get_last_lr()[0],
            "grad_norm": result.grad_norm,
            "tokens": self.tokens_seen,
            "tokens_per_s": tokens / dt,
            "step_s": dt,
            "peak_mem_mb": peak_bytes(acc.device) / 2**20,
        }
        if extra is not None:
            row["regulariser"] = extra
        return {**row, **result.metrics, **self.objective_metrics()}

    def mean_over_processes(self, value: float) -> float:
        if self.acc.num_processes == 1:
            return value
        t = torch.tensor([value], device=self.acc.device)
        return float(self.acc.reduce(t, "mean").item())

    def objective_metrics(self) -> dict[str, float]:
        """The objective's own means of this step (preference margins, ...), over processes."""
        mine = self.p.objective.metrics()
        if not mine or self.acc.num_processes == 1:
            return mine
        values = torch.tensor(list(mine.values()), device=self.acc.device)
        return dict(zip(mine, self.acc.reduce(values, "mean").tolist()))

    def count(self, micro: list[dict[str, torch.Tensor]], what: Callable) -> int:
        """``what(batch)`` summed over the micro-batches of all processes."""
        mine = torch.tensor([sum(int(what(b)) for b in micro)], device=self.acc.device)
        return int(self.acc.reduce(mine, "sum").item())

    def guard(self, loss: float, grad_norm: float | None) -> None:
        """Called by the optimizer method before it changes a weight: a non-finite loss or
        gradient stops the run there, so the weights and the last checkpoint stay good (a
        layer-wise optimizer has applied the finite parts already: the checkpoint is good)."""
        if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
            return
        self.p.optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(
            f"training stopped at step {self.step + 1}: loss is {loss}, grad norm {grad_norm}; "
            f"{checkpoint.last_good(self.ckpt_root)}"
        )

    def save(self) -> None:
        """A resumable checkpoint of this step (never one with a non-finite weight). Sharded:
        the trainable tensors whole (as one process writes them), each process's optimizer
        state (its shards) in a file of its own."""
        sharded = is_sharded(self.p.plain)
        shards = self.ckpt_root / f".shards-{self.step:07d}" if sharded else None
        if shards is not None:
            from .sharding import local_optimizer_state

            if self.main:
                shards.mkdir(parents=True, exist_ok=True)
            self.acc.wait_for_everyone()
            state = local_optimizer_state(self.p.optimizer)
            torch.save(state, shards / f"optimizer-rank{self.acc.process_index}.pt")
            self.acc.wait_for_everyone()
        with full_weights(self.p.plain):
            self.check_finite()
            if self.main:
                checkpoint.save(
                    self.ckpt_root,
                    self.step,
                    save_trainable=lambda p: self.p.method.save_trainable(self.p.plain, p),
                    optimizer=None if sharded else self.p.optimizer,
                    scheduler=self.p.scheduler,
                    state={
                        "step": self.step,
                        "position": self.p.batches.position,
                        "tokens": self.tokens_seen,
                        "train_seconds": self.train_seconds,
                    },
                    keep=self.tc.keep_checkpoints,
                    shards=shards,
                )
        self.acc.wait_for_everyone()

    def stop(self, saved: bool) -> None:
        """A signal asked to stop: checkpoint this step (if not done yet) and say how to go on."""
        if not saved:
            self.save()
        self.bar.close()
        raise Interrupted(
            f"stopped after step {self.step} of {self.p.steps}; "
            f"{checkpoint.last_good(self.ckpt_root)}; continue with resume=true"
        )

    def check_finite(self) -> None:
        checkpoint.check_finite(
            self.p.method.trainable_state(self.p.plain), self.step, self.ckpt_root
        )

    # --- results -----------------------------------------------------------------------------
    def finish(self, t_start: float) -> RunResult:
        eval_after, acc = self.evaluate("after"), self.acc
        summary = run_summary(
            self.cfg, self.p, acc, self.step, self.last_loss, self.tokens_seen, self.train_seconds
        )
        summary |= {"eval_before": self.eval_before, "eval_after": eval_after}
        summary["wall_seconds"] = time.perf_counter() - t_start
        with full_weights(self.p.plain):  # the artefact a single process writes, whole
            self.check_finite()
            if self.main and self.local is None:
                checkpoint.publish(
                    self.run_dir, lambda out: self.p.method.save(self.p.plain, self.p.tok, out)
                )
        if self.main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            self.metrics_file.close()
            shutil.rmtree(self.run_dir / rundir.WORK, ignore_errors=True)
        if self.tc.report_to:
            acc.end_training()
        acc.wait_for_everyone()
        return RunResult(
            self.run_dir, summary, self.p.plain, self.p.tok, self.p.method, self.p.raw_optimizer
        )

    def abandon(self) -> None:
        """A failure: until the run has started (set-up done, checkpoint loaded, first
        evaluation done) it takes back what it wrote: a directory it created goes, an
        overwritten run is still there if set-up failed (it is emptied only once set-up
        succeeded). After it, checkpoints and metrics stay for the diagnosis and the resume."""
        if self.bar is not None:
            self.bar.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
        work = self.run_dir / rundir.WORK
        shutil.rmtree(work if self.owner is not None else self.work_dir, ignore_errors=True)
        if self.owner is not None and not self.started:
            self.owner.abandon()
