"""The registered zeroth-order methods: MeZO, its ZO-Bench variants, Sparse MeZO and forward
gradients. Each picks an update rule (``rules.py``) and adds its options to the shared estimator
options; the step protocol (``check``, ``step``) is the family's own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ....errors import SlimtuneError
from ....registry import register
from ...base import OptimizerMethod, StepContext, StepResult, check_betas
from .estimators import estimator_for
from .noise import CHUNK, POOL_BLOCK
from .optimizer import ZerothOrderOptimizer
from .rules import SGD, Adam, Cons, Momentum, Sign, UpdateRule


class ZerothOrder(OptimizerMethod):
    """Base of the zeroth-order methods: the shared estimator options."""

    rule: ClassVar[type[UpdateRule]] = SGD
    stateless: ClassVar[bool] = True
    forward_only: ClassVar[bool] = True

    @dataclass
    class Config(OptimizerMethod.Config):
        lr: float = 1e-6
        """Learning rate (MeZO paper, OPT-13B: full 1e-6/1e-7, LoRA 1e-4/5e-5, prefix 1e-2/1e-3)."""
        eps: float = 1e-3
        """Perturbation scale (MeZO: 1e-3 full, 1e-2 LoRA, 1e-1 prefix)."""
        samples: int = 1
        """Perturbations per step (n-SPSA); the estimate is their mean."""
        estimator: Literal["two-point", "one-sided"] = "two-point"
        """two-point: (L(w+eps z) - L(w-eps z)) / 2eps; one-sided: (L(w+eps z) - L(w)) / eps."""
        noise: Literal["gaussian", "rademacher", "uniform"] = "gaussian"
        """Distribution of z (all zero mean, unit variance)."""
        blockwise: bool = False
        """Perturb one transformer block at a time, each with its own z and forwards."""
        mask_ratio: float = 0.0
        """Gradient sparsity: this fraction of z's entries, drawn afresh each step, is zero."""
        seed: int = 0
        """Seed of the perturbations."""
        pool_bits: int = 22
        """z is cut from a pool of 2**pool_bits noise draws (16 MiB at 22) in blocks of 65,536 at random offsets (fast); 0: every entry from the counter-based generator (exact i.i.d., several times slower on CPU)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.eps <= 0:
                raise ValueError(f"eps must be > 0, got {self.eps}")
            if self.seed < 0:
                raise ValueError(f"seed must be >= 0, got {self.seed}")
            if self.samples < 1 or self.samples >= 4096:
                raise ValueError(f"samples must be in 1..4095, got {self.samples}")
            if self.pool_bits and not 17 <= self.pool_bits <= 30:
                raise ValueError(f"pool_bits must be 0 or in 17..30, got {self.pool_bits}")
            if not 0 <= self.mask_ratio < 1:
                raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")

    def memory(self, plan: Any) -> None:
        """No graph and no gradients: forwards of the batch stacked twice (+eps and -eps, or
        primal and tangent), one module's perturbed fp32 weight at a time, z generated in
        chunks for the update, the noise pool; the rule's fp32 buffers (momentum: one per
        trainable element, adam: two; the others none)."""
        c = self.cfg
        plan.graph, plan.grads, plan.batch_factor = False, "none", 2.0
        numel = sum(s.numel for s in plan.trainable)
        per = len(self.rule.buffers)
        if per:
            plan.add("optimizer state", per * numel * 4.0, "always", f"{per} fp32 buffer(s)")
        if c.pool_bits:
            plan.add(
                "optimizer state", ((1 << c.pool_bits) + POOL_BLOCK) * 4.0, "always", "noise pool"
            )
        mats = [s for s in plan.trainable if s.kind not in ("embedding", "head")]
        biggest = max((s.numel for s in mats), default=0)
        temp = biggest * (8.0 + plan.work.param_bytes)  # W + s z (fp32), z, the cast
        temp = max(temp, CHUNK * 6.0)  # the update's z chunk and its 16-bit words
        if self.sparse:  # per-tensor |w| quantile: an fp32 |w| and kthvalue's work (<= CHUNK)
            temp = max(temp, min(max(s.numel for s in plan.trainable), CHUNK) * 12.0)
        plan.add("temporaries", temp, "forward", "one module's perturbed weight / z chunk")
        if estimator_for(c.estimator).forward_ad:  # attention falls back to the math path
            w = plan.work  # under forward AD: scores, masked scores, softmax, each with a tangent
            att = 6 * w.batch * plan.shape.heads * w.seq * w.seq * 4.0
            plan.add("activations", att, "forward", "attention matrices of one block (dual)")
            if not plan.head_trains():  # a frozen head's chunk of logits carries a tangent
                chunk = min(w.loss_chunk or w.tokens, w.tokens)
                plan.add("loss buffer", 2 * chunk * plan.shape.vocab * 4.0, "forward", "tangents")

    sparse: ClassVar[bool] = False

    def build(self, groups: list[dict[str, Any]], model: nn.Module) -> torch.optim.Optimizer:
        return ZerothOrderOptimizer(groups, model, self.cfg, self.rule)

    def sharding_refusal(self) -> str | None:
        return (
            "perturbs whole weight tensors inside its forwards, with noise drawn per tensor, "
            "outside the gathers FSDP does"
        )

    def check(self, train: Any, world: int) -> None:
        if train.mixed_precision == "fp16":
            raise SlimtuneError(
                f"optimizer: {self.name}: zeroth-order steps take no fp16 loss scaling; use "
                "train.mixed_precision=bf16 or no"
            )

    def supports_objective(self, name: str) -> bool:
        # The perturbed forwards compute the loss themselves (forward.py), on stacked copies of
        # the batch: next-token cross-entropy, or a preference objective's pair losses from the
        # per-sequence log-probs (not in a forward-mode AD pass: forward-grad keeps causal-lm).
        from ....registry import get

        if name == "causal-lm":
            return True
        return get("objective", name).pairs and not estimator_for(self.cfg.estimator).forward_ad

    def step(self, ctx: StepContext) -> StepResult:
        """Forward passes only (no graph): the optimizer perturbs, estimates and updates in one
        call. ``losses(forward)`` runs each micro-batch through ``forward(batch)`` (a tensor of
        loss sums, one per perturbation) and returns their sum over micro-batches and processes
        divided by the step's target tokens."""
        opt = ctx.raw
        opt.loss_chunk_tokens = ctx.loss_chunk_tokens
        opt.forward.objective = ctx.objective if getattr(ctx.objective, "pairs", False) else None

        def losses(forward: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> torch.Tensor:
            total = sum(forward(ctx.on_device(b)) for b in ctx.micro)
            return ctx.accelerator.reduce(total, "sum") / max(ctx.n_targets, 1)

        with torch.no_grad(), ctx.accelerator.autocast():
            loss = float(opt.step(losses))
        ctx.guard(loss, None)  # an estimator with a non-finite loss has skipped its update
        return StepResult(loss, None, dict(opt.step_info))


@register("optimizer", "mezo")
class MeZO(ZerothOrder):
    """MeZO (Malladi et al., https://arxiv.org/abs/2305.17333): SPSA from forward passes, w -= lr (g z + wd w); memory of inference."""


@register("optimizer", "zo-sgd-momentum")
class ZOMomentum(ZerothOrder):
    """ZO-SGD with momentum (ZO-Bench, Zhang et al. 2024): one fp32 buffer per parameter."""

    rule = Momentum
    stateless = False

    @dataclass
    class Config(ZerothOrder.Config):
        momentum: float = 0.9
        """Momentum factor."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if not 0 <= self.momentum < 1:
                raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")


@register("optimizer", "zo-sign")
class ZOSign(ZerothOrder):
    """ZO-SignSGD (ZO-Bench): w -= lr sign(g z)."""

    rule = Sign


@register("optimizer", "zo-cons")
class ZOCons(ZerothOrder):
    """ZO-SGD-Cons (ZO-Bench): keep the best of w, w - lr g z and w + lr g z (two more forwards)."""

    rule = Cons

    @dataclass
    class Config(ZerothOrder.Config):
        def __post_init__(self) -> None:
            super().__post_init__()
            if self.samples != 1 or self.blockwise or self.estimator != "two-point":
                raise ValueError("zo-cons needs samples=1, blockwise=false, estimator=two-point")
            if self.weight_decay:
                raise ValueError("zo-cons takes no weight_decay (its candidates are w +- lr g z)")


@register("optimizer", "zo-adam")
class ZOAdam(ZerothOrder):
    """ZO-Adam (ZO-Bench): Adam moments of g z; two fp32 buffers per parameter (no memory edge)."""

    rule = Adam
    stateless = False

    @dataclass
    class Config(ZerothOrder.Config):
        betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
        """Moment decay rates."""
        adam_eps: float = 1e-8
        """Adam denominator epsilon."""

        def __post_init__(self) -> None:
            super().__post_init__()
            check_betas(self.betas)
            if self.adam_eps <= 0:
                raise ValueError(f"adam_eps must be > 0, got {self.adam_eps}")


@register("optimizer", "forward-grad")
class ForwardGrad(ZerothOrder):
    """Forward gradient (Baydin et al. 2022): the exact directional derivative g = grad . z by forward-mode AD (jvp), w -= lr g z."""

    @dataclass
    class Config(ZerothOrder.Config):
        estimator: Literal["forward-grad"] = "forward-grad"  # type: ignore[assignment]
        """Fixed: the jvp replaces the finite difference (eps is unused)."""


@register("optimizer", "sparse-mezo")
class SparseMeZO(ZerothOrder):
    """Sparse MeZO (Liu et al. 2024): perturb and update only weights with |w| at or below a per-tensor quantile; stores thresholds, not masks."""

    sparse = True

    @dataclass
    class Config(ZerothOrder.Config):
        sparsity: float = 0.75
        """Fraction of each tensor (the largest |w|) left out; the rest is perturbed and updated."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if not 0 < self.sparsity < 1:
                raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity}")
