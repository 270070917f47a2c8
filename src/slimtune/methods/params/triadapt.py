"""TriAdaptLoRA (Liang, Wang & Zeng, https://arxiv.org/abs/2501.08008): LoRA whose rank grows
during training, module by module, where a normalised importance is highest.

Each adapted linear computes ``W x + (alpha / R) B C A x`` with R its current rank, A (R x in),
B (out x R) and a square transformation matrix C (R x R). The three mechanisms of the paper:

* **Triangular split.** C grows by blocks: growing from rank R to R + k adds a row block (k x
  (R + k)) and a column block ((R + k) x k); C is their sum, so the row blocks form a lower and
  the column blocks an upper block-triangular part (``c_row``, ``c_col``; the diagonal blocks
  are in both). What trained before stays as it was: growth only adds parameters.
* **Importance** of a module: its ||C||_F divided by its number of blocks (the normalised
  Frobenius norm), taken as the increase since the previous allocation.
* **Rank growth by a dynamic threshold.** Every ``interval`` steps after ``warmup``, while the
  budget (``r`` per module on average) is not spent, k modules grow by ``step_r``: those at or
  above the k-th largest importance, where k is the unspent budget times the fraction of the
  run done (``schedule: linear``) or that budget to the power of the fraction
  (``exponential``), and at least one. An orthogonality term (weight ``orth``) keeps A's rows
  and B's columns orthonormal.

Read against the authors' code (a peft fork; pitfalls noted where this differs): there, B and
C start at zero and only A is drawn, which leaves every gradient zero (dC = B^T G A^T, dB and dA
through C), so nothing trains. Here A and B are W's leading singular vectors (orthonormal, the
orthogonality term's own fixed point) and C is zero, so the model starts as loaded and C gets
a gradient at once; a module's new directions are the next singular vectors. The authors have
no per-module cap; here ``max_r`` bounds a module, and every block up to it exists from the
start (requires_grad off until grown), so checkpoints, FedAvg and the planner see one set of
shapes. Only the grown blocks compute and train, and the artefact holds them alone.
As in their code the scale is alpha / R with R the current rank, so a module's update shrinks
when it grows. The rank schedule (the step each block was added) is saved. As their new
parameter groups do, a grown block starts with fresh optimizer state (its step count at 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ...errors import SlimtuneError
from ...registry import register
from ..base import PrepareContext
from .adapters import ADAPTER_FILE, Wrapper, WrapperMethod

EXACT_SVD_MAX = 2048  # larger matrices take a randomised SVD of the leading directions


def block_ends(init_r: int, step_r: int, cap: int) -> list[int]:
    """The rank after each block: init_r, init_r + step_r, ..., capped at ``cap``."""
    ends = [min(init_r, cap)]
    while ends[-1] < cap:
        ends.append(min(ends[-1] + step_r, cap))
    return ends


def starts_of(ends: list[int]) -> list[int]:
    return [0, *ends[:-1]]


class TriAdapt(Wrapper):
    """One adapted linear. Block k (rows ``start_k:end_k`` of the rank) has its own tensors:
    a_k (size_k x in), b_k (out x size_k), the row block c_row_k (size_k x end_k) and the
    column block c_col_k (end_k x size_k) of C. Blocks not grown yet have requires_grad off:
    they get no gradient, and the optimizer (which holds them from the start) creates their
    state at their first gradient, fresh, as for the authors' new parameter groups."""

    def __init__(self, base: nn.Linear, cfg: Any, rank: int, weight: Any, seed: int = 0):
        """``weight``: W as the base computes with it (dequantised over a quantised base), or
        None to leave A and B zero (rebuilt to receive saved tensors, or on the meta device)."""
        super().__init__(base)
        out, inp = base.out_features, base.in_features
        cap = min(cfg.max_r, out, inp)
        self.ends = block_ends(cfg.init_r, cfg.step_r, cap)
        self.alpha = cfg.alpha
        a, b = torch.zeros(cap, inp), torch.zeros(out, cap)
        if weight is not None:
            u, vh = leading_singular_vectors(weight.detach(), cap, seed)
            a, b = vh, u
        device = base.weight.device
        spans = list(zip(starts_of(self.ends), self.ends))
        self.a = nn.ParameterList([nn.Parameter(a[s:e].to(device)) for s, e in spans])
        self.b = nn.ParameterList(
            [nn.Parameter(b[:, s:e].contiguous().to(device)) for s, e in spans]
        )
        self.c_row = nn.ParameterList(
            [nn.Parameter(torch.zeros(e - s, e, device=device)) for s, e in spans]
        )
        self.c_col = nn.ParameterList(
            [nn.Parameter(torch.zeros(e, e - s, device=device)) for s, e in spans]
        )
        # steps done when each block was added, plus one (0: not added); the first is there
        # from the start
        schedule = torch.zeros(len(self.ends), device=device)
        self.register_buffer("schedule", schedule)
        self.register_buffer("prev_norm", torch.zeros((), device=device))
        self.rank = self.ends[0]
        with torch.no_grad():
            self.schedule[0] = 1.0
            while self.rank < min(rank, cap):  # the planner measures a later rank
                self.grow(0)
        self.set_trainable()

    @property
    def cap(self) -> int:
        return self.ends[-1]

    @property
    def blocks(self) -> int:
        return self.ends.index(self.rank) + 1

    def block_params(self, k: int) -> list[nn.Parameter]:
        return [self.a[k], self.b[k], self.c_row[k], self.c_col[k]]

    def set_trainable(self) -> None:
        """The grown blocks train, the others wait."""
        for k in range(len(self.ends)):
            for p in self.block_params(k):
                p.requires_grad_(k < self.blocks)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.blocks
        return torch.cat(list(self.a[:n]), 0), torch.cat(list(self.b[:n]), 1)

    def c(self) -> torch.Tensor:
        """C at the current rank: the row blocks (lower) plus the column blocks (upper)."""
        r, n = self.rank, self.blocks
        rows = torch.cat([F.pad(self.c_row[k], (0, r - self.ends[k])) for k in range(n)], 0)
        cols = torch.cat([F.pad(self.c_col[k], (0, 0, 0, r - self.ends[k])) for k in range(n)], 1)
        return rows + cols

    def delta(self) -> torch.Tensor:
        a, b = self.factors()
        return (self.alpha / self.rank) * (b @ self.c() @ a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a, b = self.factors()
        t = F.linear(F.linear(F.linear(x.to(a.dtype), a), self.c()), b)
        return y + (t * (self.alpha / self.rank)).to(y.dtype)

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            w = self.base.weight
            w.copy_((w.float() + self.delta()).to(w.dtype))
        return self.base

    def normalised_norm(self) -> torch.Tensor:
        return self.c().detach().norm() / self.blocks

    def grow(self, steps_done: int) -> None:
        """Add the next block (the caller checked there is one)."""
        k = self.blocks
        self.schedule[k] = steps_done + 1
        self.rank = self.ends[k]
        self.set_trainable()

    def rank_from_schedule(self) -> None:
        """The rank the schedule buffer says (after a checkpoint or an average of clients:
        a block counts as added where any client added it, i.e. its mean is above 0)."""
        added = int((self.schedule > 0).sum())
        self.rank = self.ends[max(added, 1) - 1]
        self.set_trainable()

    def set_c(self, c: torch.Tensor) -> None:
        """Blocks holding a given C (a loaded artefact): each row block takes its rows, each
        column block the rows above its diagonal block."""
        for k, (s, e) in enumerate(zip(starts_of(self.ends), self.ends)):
            if e > c.shape[0]:
                break
            self.c_row[k].copy_(c[s:e, :e])
            self.c_col[k].zero_()
            self.c_col[k][:s].copy_(c[:s, s:e])


def leading_singular_vectors(
    w: torch.Tensor, k: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """U[:, :k] and V^T[:k] of W, exactly for matrices up to EXACT_SVD_MAX wide, else by a
    seeded randomised SVD (Halko et al.; oversampled, 4 power iterations)."""
    w = w.float().cpu()
    if min(w.shape) <= EXACT_SVD_MAX:
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :k].contiguous(), vh[:k].contiguous()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, _, v = torch.svd_lowrank(w, q=min(k + 10, min(w.shape)), niter=4)
    return u[:, :k].contiguous(), v[:, :k].T.contiguous()


@register("params", "triadapt-lora")
class TriAdaptLoRA(WrapperMethod):
    """TriAdaptLoRA (Liang et al., https://arxiv.org/abs/2501.08008): LoRA with a transformation matrix C between SVD-initialised factors, grown by triangular blocks in the modules of highest normalised ||C||_F under a linear (or exponential) threshold schedule, until r per module on average; the rank schedule is saved."""

    @dataclass
    class Config(WrapperMethod.Config):
        r: int = 8
        """Rank budget: r per adapted module on average, reached by growth."""
        init_r: int = 1
        """Rank of every module at the start."""
        step_r: int = 0
        """Ranks one growth adds to a module; 0: r / 2 (the authors' default)."""
        max_r: int = 0
        """Largest rank of one module (the size of its tensors for the run); 0: 2 r."""
        alpha: float = 16.0
        """The update is scaled by alpha / R, R the module's current rank."""
        warmup: int = 0
        """Steps before the first growth."""
        interval: int = 1
        """Steps between two allocations."""
        schedule: Literal["linear", "exponential"] = "linear"
        """How the number of growing modules rises over the run (the paper prefers linear)."""
        orth: float = 0.5
        """Weight of the orthogonality term ||A A^T - I|| + ||B^T B - I|| (mean over modules)."""

        def __post_init__(self) -> None:
            if self.r < 1 or self.init_r < 1:
                raise ValueError(f"r and init_r must be >= 1, got {self.r} and {self.init_r}")
            if self.step_r < 0:
                raise ValueError(f"step_r must be >= 0, got {self.step_r}")
            if self.step_r == 0:
                self.step_r = max(1, self.r // 2)
            if self.max_r == 0:
                self.max_r = 2 * self.r
            if not self.init_r <= self.r <= self.max_r:
                raise ValueError(
                    f"need init_r <= r <= max_r, got {self.init_r}, {self.r}, {self.max_r}"
                )
            if self.alpha <= 0:
                raise ValueError(f"alpha must be > 0, got {self.alpha}")
            if self.warmup < 0 or self.interval < 1:
                raise ValueError(
                    f"warmup must be >= 0 and interval >= 1, got {self.warmup}, {self.interval}"
                )
            if self.orth < 0:
                raise ValueError(f"orth must be >= 0, got {self.orth}")

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        self.total_steps = int(ctx.extras.get("total_steps") or 1)
        self.svd = not ctx.extras.get("artefact", False)
        self.dense = ctx.extras.get("quantised_weight")  # W of a quantised base, dequantised
        self.start_rank = getattr(self, "start_rank", 0)
        return super().prepare(model, ctx)

    def wrap(self, name: str, module: nn.Module, index: int, seed: int) -> Wrapper:
        if not isinstance(module, nn.Linear):
            raise SlimtuneError(f"params: triadapt-lora: {name} is not a linear layer")
        weight = None
        if self.svd and not module.weight.is_meta:
            weight = self.dense(module) if self.dense is not None else module.weight
        return TriAdapt(module, self.cfg, self.start_rank, weight, seed * 1_000_003 + index)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """C decays; A and B do not: they are unit directions the orthogonality term holds,
        and decay would shrink the not yet grown ones before they are used."""
        wrappers = self.wrapped(model).values()
        c = [p for w in wrappers for p in (*w.c_row, *w.c_col)]
        ab = [p for w in wrappers for p in (*w.a, *w.b)]
        # every block from the start (not yet grown ones included: no gradient, no state)
        return [{"params": c, "weight_decay": weight_decay}, {"params": ab, "weight_decay": 0.0}]

    def check_optimizer(self, optimizer: Any) -> None:
        if optimizer.forward_only:
            raise SlimtuneError(
                f"params: triadapt-lora: optimizer {optimizer.name} moves every trainable "
                "tensor, the not yet grown ranks too, and computes no gradient for the "
                "orthogonality term; use a gradient optimizer"
            )

    def regulariser(self, model: nn.Module) -> torch.Tensor | None:
        if not self.cfg.orth:
            return None
        total, wrappers = 0.0, self.wrapped(model).values()
        for w in wrappers:
            a, b = w.factors()
            eye = torch.eye(w.rank, device=a.device, dtype=a.dtype)
            total = total + (a @ a.T - eye).norm() + (b.T @ b - eye).norm()
        return self.cfg.orth * total / (2 * len(wrappers))

    # --- rank growth --------------------------------------------------------------------
    def after_update(self, model: nn.Module, step: int) -> None:
        done = step + 1
        c = self.cfg
        if done <= c.warmup or done % c.interval:
            return
        wrappers = self.wrapped(model)
        budget = c.r * len(wrappers)
        spent = sum(w.rank for w in wrappers.values())
        if spent >= budget:
            return
        with torch.no_grad():
            norms = torch.stack([w.normalised_norm() for w in wrappers.values()])
            prev = torch.stack([w.prev_norm for w in wrappers.values()])
            scores = (norms - prev).tolist()  # one device sync for every module
            for w, n in zip(wrappers.values(), norms):
                w.prev_norm.copy_(n)
            candidates = [i for i, w in enumerate(wrappers.values()) if w.rank < w.cap]
            if not candidates:
                return
            k = self.growing(budget - spent, done)
            k = min(max(k, 1), len(candidates))
            threshold = sorted((scores[i] for i in candidates), reverse=True)[k - 1]
            for i, w in enumerate(wrappers.values()):
                if i in candidates and scores[i] >= threshold:
                    w.grow(done)

    def growing(self, unspent: int, done: int) -> int:
        """How many modules grow now: the unspent budget times the run's done fraction
        (linear) or raised to it (exponential)."""
        c = self.cfg
        span = self.total_steps - c.warmup
        frac = min(1.0, (done - c.warmup) / span) if span > 0 else 1.0
        if c.schedule == "linear":
            return int(unspent * frac)
        return int(math.exp(frac * math.log(unspent)))

    def ranks(self, model: nn.Module) -> dict[str, int]:
        return {n: w.rank for n, w in self.wrapped(model).items()}

    # --- state: the full tensors in checkpoints, the grown part in the artefact ---------
    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every block, grown or not (one set of shapes for checkpoints and FedAvg), and the
        schedule."""
        out = {}
        for name, w in self.wrapped(model).items():
            for key in ("a", "b", "c_row", "c_col"):
                for k, p in enumerate(getattr(w, key)):
                    out[f"{name}.{key}.{k}"] = p.detach()
            out[f"{name}.schedule"] = w.schedule
            out[f"{name}.prev_norm"] = w.prev_norm
        return out

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        wrappers = self.wrapped(model)
        with torch.no_grad():
            for name, w in wrappers.items():
                for key in ("a", "b", "c_row", "c_col"):
                    for k, p in enumerate(getattr(w, key)):
                        p.copy_(state[f"{name}.{key}.{k}"])
                w.schedule.copy_(state[f"{name}.schedule"])
                w.prev_norm.copy_(state[f"{name}.prev_norm"])
                w.rank_from_schedule()

    def artefact_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for name, w in self.wrapped(model).items():
            a, b = w.factors()
            out |= {f"{name}.a": a, f"{name}.b": b, f"{name}.c": w.c()}
        return {k: v.detach() for k, v in out.items()}

    def artefact_info(self, model: nn.Module) -> dict[str, Any]:
        """Each module's rank and its schedule: [steps done, rank after] per block."""
        schedule = {}
        for name, w in self.wrapped(model).items():
            added = w.schedule.tolist()
            schedule[name] = [[int(s) - 1, w.ends[b]] for b, s in enumerate(added) if s > 0]
        return {"ranks": self.ranks(model), "rank_schedule": schedule}

    def load_artefact(self, model: nn.Module, run_dir: Path, info: dict[str, Any]) -> None:
        state = load_file(str(run_dir / ADAPTER_FILE))
        with torch.no_grad():
            for name, w in self.wrapped(model).items():
                w.schedule.zero_()
                for b, (done, _) in enumerate(info["rank_schedule"][name]):
                    w.schedule[b] = done + 1
                w.rank_from_schedule()
                a, b = state[f"{name}.a"], state[f"{name}.b"]
                for k, (s, e) in enumerate(zip(starts_of(w.ends), w.ends)):
                    if e > w.rank:
                        break
                    w.a[k].copy_(a[s:e])
                    w.b[k].copy_(b[:, s:e])
                w.set_c(state[f"{name}.c"].to(w.c_row[0]))

    def memory(self, plan: Any) -> None:
        """As the wrapper machinery measures it, with every module at the budget's rank r
        (the run's mean rank once grown; tensors are allocated at max_r from the start)."""
        self.start_rank = self.cfg.r
        try:
            super().memory(plan)
        finally:
            self.start_rank = 0
