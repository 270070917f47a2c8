"""The method contract: the hooks through which a method reaches the training loop.

A params method decides which parameters train and in what form (adapters, masks, ...), and
how the result is saved, loaded and merged. An optimizer method turns parameter groups into a
``torch.optim.Optimizer`` and owns its step. An objective gives the loss; a base says how the
frozen weights are stored. The loop calls only these hooks and knows no method by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from ..sharding import like, whole


@dataclass
class PrepareContext:
    """What a method may use while preparing the model."""

    tokenizer: PreTrainedTokenizerBase
    work_dir: Path  # scratch space inside the run directory
    seed: int = 0
    # Yields training batches (dicts of tensors) for methods that calibrate on data.
    calibration: Callable[[], Iterator[dict[str, torch.Tensor]]] | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def summary_of(cls: type) -> str:
    return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


class Method:
    """What every registered method has: its name (set by ``registry.register``) and a
    ``Config`` dataclass (the recipe section's options), an instance of which it is bound to."""

    name: ClassVar[str]

    @dataclass
    class Config:
        pass

    def __init__(self, cfg: Any):
        self.cfg = cfg


class ParamsMethod(Method):
    """Base class of the params axis. Defaults describe full fine-tuning of plain HF weights."""

    mergeable: ClassVar[bool] = True  # False: merge() raises SlimtuneError (e.g. prompt tuning)
    # False: the loop refuses train.gradient_checkpointing with one line (e.g. prefix tuning,
    # whose key/value prefixes peft applies again when a block is recomputed)
    supports_checkpointing: ClassVar[bool] = True
    # False: the loop refuses data.packing with one line (it puts virtual tokens before each
    # row, so the positions that keep packed examples apart would not reach attention)
    supports_packing: ClassVar[bool] = True
    # True: the base model's own weights never change (adapters, prompts, side networks), so a
    # quantised base (nf4, int8) can serve it; False: it trains or rewrites base weights
    frozen_base: ClassVar[bool] = False

    def base_change(self) -> str | None:
        """How this configuration changes the base model's own weights (for the one line a
        quantised base refuses it with); None where they stay as loaded."""
        return None if self.frozen_base else "trains or rewrites them"

    def sharding_refusal(self) -> str | None:
        """Why this configuration cannot train under ``train.sharding: fsdp`` (one clause for
        the error line), or None where it can. Methods opt in once their sharded run is tested
        to equal the single-process one (tests/test_sharding.py)."""
        return "is not tested under sharding yet"

    def adapters_off_is_base(self) -> bool:
        """True where the prepared model with its adapters disabled (peft's ``disable_adapter``)
        computes the checkpoint the run loaded, unchanged: a preference objective's reference
        policy then costs no second copy of the weights. False by default (a method that
        trains or rewrites base weights)."""
        return False

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        """Inject adapters / freeze / re-parameterise. Returns the model to train."""
        return model

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """Trainable parameters for the optimizer; biases and norm weights get no decay."""
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def memory(self, plan: Any) -> None:
        """Describe this method's memory to the planner (``slimtune.plan.planner.Plan``): which
        base tensors train (the plan starts with all of them), new tensors, the activations
        its modules keep, temporaries. Every registered method describes itself."""
        raise NotImplementedError(f"params method {self.name!r} describes no memory terms")

    def on_step_start(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Called before each optimizer step (layer re-sampling and the like)."""

    def after_update(self, model: nn.Module, step: int) -> None:
        """Called after optimizer step ``step`` (0-based) changed the weights, with the step's
        gradients still present (AdaLoRA re-allocates ranks from them here)."""

    def regulariser(self, model: nn.Module) -> torch.Tensor | None:
        """A loss term of the method's own (e.g. AdaLoRA's orthogonality, KaSA's singular-value
        terms), added once per step to the objective's mean loss; None by default."""
        return None

    def check_optimizer(self, optimizer: OptimizerMethod) -> None:
        """Refuse (one-line ``SlimtuneError``) an optimizer this method cannot train with."""

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint stores and a federated runner exchanges: the trainable tensors."""
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state]
        if missing:
            raise ValueError(f"checkpoint lacks trainable tensors, e.g. {missing[:3]}")
        with torch.no_grad():
            for n, t in state.items():  # a sharded parameter takes its shard of the tensor
                params[n].copy_(like(params[n], t))

    def save_trainable(self, model: nn.Module, path: Path) -> None:
        state = {n: t.contiguous().cpu() for n, t in self.trainable_state(model).items()}
        save_file(_untie(state), str(path))

    def load_trainable(self, model: nn.Module, path: Path) -> None:
        self.load_trainable_state(model, load_file(str(path)))

    def save(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
        """Final artefact: a plain Hugging Face checkpoint (safetensors)."""
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)

    @classmethod
    def load(cls, base: nn.Module, run_dir: Path) -> nn.Module:
        """Rebuild the trained model from ``save``'s artefacts (``base`` unused for full weights)."""
        ref = next(base.parameters())
        return AutoModelForCausalLM.from_pretrained(run_dir, dtype=ref.dtype).to(ref.device)

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the update into plain weights; plain weights are already merged."""
        return model


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): store copies."""
    seen: set[int] = set()
    out = {}
    for n, t in state.items():
        ptr = t.data_ptr()
        out[n] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def check_betas(betas: list[float]) -> None:
    """Adam's moment decay rates: exactly two, each in [0, 1)."""
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")


class OptimizerMethod(Method, ABC):
    """Base class of the optimizer axis."""

    stateless: ClassVar[bool] = False  # True: may keep no optimizer state at all (plain SGD, MeZO)
    # True: steps from forward passes only, with the weights perturbed inside them (zeroth
    # order); an objective's reference policy must then not run through the perturbed model
    forward_only: ClassVar[bool] = False

    @dataclass
    class Config:
        lr: float = 1e-4
        """Peak learning rate."""
        weight_decay: float = 0.0
        """Decoupled weight decay."""

        def __post_init__(self) -> None:
            # A negative learning rate ascends the loss (0 is a dry run that only measures);
            # non-finite numbers are refused while parsing.
            if self.lr < 0:
                raise ValueError(f"lr must be >= 0, got {self.lr}")
            if self.weight_decay < 0:
                raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")

    def memory(self, plan: Any) -> None:
        """Describe this optimizer's memory to the planner (``slimtune.plan.planner.Plan``):
        state per trainable tensor, gradients (all, one tensor at a time, none), whether a
        graph is built, step temporaries. Every registered method describes itself."""
        raise NotImplementedError(f"optimizer {self.name!r} describes no memory terms")

    @abstractmethod
    def build(self, groups: list[dict[str, Any]], model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer over ``groups`` (from the params method's ``param_groups``); ``model``
        lets it tell what a tensor is (e.g. GaLore projects linear weights only). How one
        training step uses it is :meth:`step`'s business."""

    def check(self, train: Any, world: int) -> None:
        """Refuse (``SlimtuneError``) a loop setting this optimizer's step cannot honour, e.g.
        fp16 loss scaling or several processes. ``train`` is the recipe's train section."""
        return None

    def check_device(self, device: str) -> None:
        """Refuse (one-line ``SlimtuneError``) a device kind ('cpu', 'cuda') it cannot run on."""
        return None

    def sharding_refusal(self) -> str | None:
        """Why this optimizer cannot step sharded weights (``train.sharding: fsdp``), or None
        where it can (an elementwise update of each shard, as torch.optim's)."""
        return "is not tested under sharding yet"

    def supports_objective(self, name: str) -> bool:
        """Whether this optimizer's step minimises objective ``name`` (the default step uses
        ``ctx.loss_sum``, which is the objective's, so any)."""
        return True

    def step(self, ctx: StepContext) -> StepResult:
        """One optimizer step over ``ctx.micro``; the loop has one step path and calls only
        this. Contract: compute the step's loss (and gradient norm if there is one), call
        ``ctx.guard(loss, grad_norm)`` *before* any weight changes where the method can (it
        raises on a non-finite value, so the weights stay good), then update. The loop zeroes
        gradients and steps the learning-rate schedule afterwards.

        The default is backpropagation: accumulate the micro-batches' gradients, clip to
        ``ctx.max_grad_norm`` (or just measure the norm), ``optimizer.step()``."""
        loss = backprop(ctx)
        grad_norm = clip_or_measure(ctx)
        ctx.guard(loss, grad_norm)
        ctx.optimizer.step()
        return StepResult(loss, grad_norm)


class Objective(Method):
    """Base class of the objective axis: the loss an optimizer minimises. The loop divides the
    summed loss of a step by the step's normaliser over all processes, so an objective gives
    both: ``loss_sum`` of a batch and ``targets(batch)``, what one unit of that sum is (target
    tokens for token-level losses; pairs for a preference loss)."""

    def targets(self, batch: dict[str, torch.Tensor]) -> int:
        """Target tokens of ``batch``: the labels that are not masked, shifted by one."""
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss_sum(
        self, model: nn.Module, head: Any, batch: dict[str, torch.Tensor], chunk: int
    ) -> torch.Tensor:
        """The loss of ``batch`` summed over its ``targets`` (a scalar tensor with a graph when
        gradients are on); ``head`` and ``chunk`` are loss.py's chunked output head."""
        raise NotImplementedError(f"objective {self.name!r} has no loss")

    # A preference objective reads pairs (data.format: preference): the loop refuses other data.
    pairs: ClassVar[bool] = False
    # Sequences one example puts through the model per step (2: chosen and rejected, stacked)
    sequences_per_example: ClassVar[int] = 1

    def setup(self, ctx: ObjectiveContext) -> None:
        """Once, after the params method prepared the model and before the first step (also on
        a resume: the model is still the initial one then): e.g. fix a reference policy."""

    def on_step_start(self, step: int, total: int, model: nn.Module, run_dir: Path) -> None:
        """Before optimizer step ``step`` (0-based) of ``total``, with the unwrapped model and
        the run directory (written to by the main process only); nothing by default (SPIN makes
        each iteration's rejected answers here)."""

    def metrics(self) -> dict[str, float]:
        """Means of the objective's own per-step quantities since the last call (the loop adds
        them to each metrics row); none by default."""
        return {}

    def evaluate(
        self, model: nn.Module, head: Any, batches: list[dict[str, torch.Tensor]], chunk: int
    ) -> dict[str, float]:
        """Held-out metrics of the objective on collated ``batches`` (no gradients); none by
        default (the loop's evaluation reports loss and accuracy for every objective)."""
        return {}


@dataclass
class ObjectiveContext:
    """What :meth:`Objective.setup` gets: the prepared model (unwrapped, on its device, not yet
    trained), its params method, the data, the chunked head and the evaluation batch size."""

    model: nn.Module
    method: ParamsMethod
    splits: Any  # data.Splits
    head: Any
    chunk: int
    batch_size: int
    pad_id: int
    progress: bool = False
    optimizer: Any = None  # the run's OptimizerMethod (None: evaluation only)
    tokenizer: Any = None
    main: bool = True  # the main process (the one that writes into the run directory)


class BaseWeights(Method):
    """Base class of the base axis: how the frozen weights of the model are stored. The loader
    (``models.load_model``) asks the recipe's base for the dtype the checkpoint loads in and for
    any further ``from_pretrained`` options (a quantisation config), then lets it rework the
    loaded model (``after_load``); ``check`` refuses params / optimizer methods it cannot serve
    before anything loads; the planner prices the weights by the base's name."""

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype the checkpoint loads in (for a quantised base: its non-quantised parts)."""
        raise NotImplementedError(f"base {self.name!r} names no dtype")

    def load_kwargs(self) -> dict[str, Any]:
        """Further ``from_pretrained`` options (e.g. a quantisation config); none by default."""
        return {}

    def after_load(self, model: nn.Module) -> nn.Module:
        """Rework the loaded model (its weights already in ``torch_dtype``) into this base, e.g.
        quantise what the loader did not; by default nothing."""
        return model

    quantised: ClassVar[bool] = False  # True: linear weights held in fewer than 16 bits

    @property
    def dtype_name(self) -> str:
        """The recipe's name of ``torch_dtype`` (``model.dtype`` must agree with it)."""
        return self.name

    def check(self, params: ParamsMethod, optimizer: OptimizerMethod) -> None:
        """Refuse, with a one-line ``SlimtuneError``, methods this base cannot serve."""

    def check_device(self, device: str) -> None:
        """Refuse (one-line ``SlimtuneError``) a device kind ('cpu', 'cuda') it cannot run on."""

    def dequantise(self, model: nn.Module) -> nn.Module:
        """The model with plain floating-point weights equal to those it computes with (what a
        merge folds an update into); a dense base is that already."""
        return model


@dataclass
class StepContext:
    """What an optimizer method's :meth:`OptimizerMethod.step` gets from the loop."""

    accelerator: Any  # accelerate.Accelerator: device, autocast, backward, no_sync, reduce
    model: nn.Module  # as prepared by accelerate (DDP-wrapped under several processes)
    optimizer: Any  # as prepared by accelerate (fp16 loss scaling lives in its step())
    raw: torch.optim.Optimizer  # the method's own optimizer object
    micro: list[dict[str, torch.Tensor]]  # this process's micro-batches, on the CPU
    n_targets: int  # target tokens of the whole step on all processes (the loss divisor)
    loss_sum: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]  # summed CE
    max_grad_norm: float  # 0: no clipping
    loss_chunk_tokens: int
    guard: Callable[[float, float | None], None]  # raises TrainingDiverged on non-finite
    objective: Any = None  # the run's Objective (what loss_sum computes)

    def on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}


@dataclass
class StepResult:
    loss: float  # mean target-token loss of the step over all processes
    grad_norm: float | None = None  # pre-clip global norm; None where there is no gradient
    metrics: dict[str, Any] = field(default_factory=dict)  # extra columns of the metrics row


def backprop(ctx: StepContext, before: Callable[[int, bool], None] | None = None) -> float:
    """Forward and backward of every micro-batch, gradients summed; the loss is normalised by
    the target tokens of the whole step on all processes, so batch 8 == 4 x accumulation 2 ==
    2 processes x 4. ``before(i, last)`` runs ahead of micro-batch ``i``. Returns the loss."""
    acc, world = ctx.accelerator, ctx.accelerator.num_processes
    total = torch.zeros((), device=acc.device)
    for i, batch in enumerate(ctx.micro):
        last = i == len(ctx.micro) - 1
        if before is not None:
            before(i, last)
        # gradients are all-reduced only on the last micro-batch of the step
        sync = nullcontext() if last else acc.no_sync(ctx.model)
        with sync, acc.autocast():
            ce = ctx.loss_sum(ctx.model, ctx.on_device(batch))
            acc.backward(ce * world / max(ctx.n_targets, 1))
        total += ce.detach().float()
    return float(acc.reduce(total, "sum")) / max(ctx.n_targets, 1)


def clip_or_measure(ctx: StepContext) -> float:
    """The global gradient norm before clipping; clipped to ``ctx.max_grad_norm`` when set.
    Measured with clipping off too: a non-finite gradient must never reach the weights."""
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    if ctx.max_grad_norm > 0:  # whole(): under FSDP the norm is a distributed tensor
        return float(whole(ctx.accelerator.clip_grad_norm_(params, ctx.max_grad_norm)))
    grads = [p.grad for p in params if p.grad is not None]
    return float(whole(torch.nn.utils.get_total_norm(grads))) if grads else 0.0
