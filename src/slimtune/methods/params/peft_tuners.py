"""Every tuner of the installed ``peft`` behind one name (``params: peft``), and named entries
for the seed papers' tuners that peft implements (IA3, MiSS/Bone, KaSA, CPT, LLaMA-Adapter,
P-tuning, VeRA, AdaLoRA). The options are peft's own config fields, checked against peft's
config class; the artefact is peft's own (``PeftModel.from_pretrained`` loads it)."""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.config import PromptLearningConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import PeftType
from torch import nn
from transformers import PreTrainedTokenizerBase

from ...errors import SlimtuneError
from ...registry import register
from ..base import ParamsMethod, PrepareContext
from ..shared import kept_per_token, layer_of, meta_model

# Fields every peft config has and a recipe does not set (slimtune sets task_type).
COMMON = {f.name for f in dataclasses.fields(PeftConfig)}
# LoRA-family inits that move part of W into the adapter or replace W: peft's adapter then only
# fits the rewritten base. ``params: lora`` converts such adapters back on saving; here they
# are refused.
REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "eva", "lora_ga", "mica")
# peft tuners that need more than a model and a config
REFUSED = {
    "xlora": "X-LoRA mixes LoRA adapters trained before; train those, then combine them in peft",
    "poly": "Poly routes between adapters by a task id, which slimtune's batches do not carry",
    "multitask-prompt-tuning": "it needs a task id per example, which slimtune's batches lack",
    "cartridge": "it is trained by self-study distillation, not by slimtune's objectives",
}


def spell(kind: PeftType) -> str:
    return kind.value.lower().replace("_", "-")


def peft_types() -> dict[str, PeftType]:
    """Recipe spellings of peft's tuners: lower case with ``-`` (``ia3``, ``p-tuning``,
    ``adaption-prompt``); ``_`` is accepted too."""
    return {spell(t): t for t in PEFT_TYPE_TO_CONFIG_MAPPING}


def resolve(name: str) -> PeftType:
    key = name.lower().replace("_", "-")
    types = peft_types()
    if key not in types:
        hint = difflib.get_close_matches(key, types, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(
            f"type: peft has no tuner {name!r}{extra}; choose one of: {', '.join(sorted(types))}"
        )
    if key in REFUSED:
        raise ValueError(f"type: peft's {key!r} is not offered: {REFUSED[key]}")
    return types[key]


def fields_of(kind: PeftType) -> list[str]:
    """The recipe options of peft's config class for ``kind``."""
    cls = PEFT_TYPE_TO_CONFIG_MAPPING[kind]
    return sorted(f.name for f in dataclasses.fields(cls) if f.init and f.name not in COMMON)


def peft_config(kind: PeftType, options: dict[str, Any]) -> PeftConfig:
    """peft's config object of ``kind`` from recipe ``options``; an unknown field or a value
    peft refuses raises ValueError with one line."""
    cls = PEFT_TYPE_TO_CONFIG_MAPPING[kind]
    allowed = fields_of(kind)
    for key in options:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(
                f"{key!r} is not a field of peft's {cls.__name__}{extra}; its fields: "
                f"{', '.join(allowed)}"
            )
    init = options.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(REWRITING_INITS):
        raise ValueError(
            f"init_lora_weights {init!r} rewrites the base weights, so peft's adapter would only "
            "fit the rewritten base; use params: lora (init: pissa, olora, corda, loftq), which "
            "saves an adapter for the original weights"
        )
    try:
        return cls(task_type="CAUSAL_LM", **options)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"peft's {cls.__name__}: {str(e).splitlines()[0]}") from None


class PeftTuner(ParamsMethod):
    """A peft tuner of one type over a frozen base. Named entries fix the type (``Config.tuner``)
    and may set peft options by default (``Config.defaults``); ``params: peft`` reads the type
    from its ``type`` option."""

    frozen_base = True

    @dataclass
    class Config:
        options: dict[str, Any] = field(default_factory=dict)
        """peft's config fields for this tuner, also accepted at the top of the section ({name: ia3, target_modules: [k_proj, v_proj]}); listed below, documented by peft's config class."""

        open_options: ClassVar[str] = "options"  # config.build gathers unknown keys here
        tuner: ClassVar[str] = ""  # the peft type of a named entry
        defaults: ClassVar[dict[str, Any]] = {}  # peft options a named entry sets unless given

        def kind(self) -> PeftType:
            return resolve(self.tuner)

        def peft_options(self) -> dict[str, Any]:
            return {**self.defaults, **self.options}

        def __post_init__(self) -> None:
            peft_config(self.kind(), self.peft_options())  # refuse a bad recipe while parsing

    @classmethod
    def foreign_options(cls) -> str:
        """The peft fields a recipe may set, for ``slimtune methods``."""
        tuner = cls.Config.tuner
        if not tuner:
            return "type: one of " + ", ".join(sorted(k for k in peft_types() if k not in REFUSED))
        kind = resolve(tuner)
        cls_name = PEFT_TYPE_TO_CONFIG_MAPPING[kind].__name__
        return f"peft's {cls_name} fields: " + ", ".join(fields_of(kind))

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.kind = cfg.kind()
        self.config = peft_config(self.kind, cfg.peft_options())
        self.prompt = isinstance(self.config, PromptLearningConfig)
        # virtual tokens and LLaMA-Adapter's gated prompts have no weight to be folded into
        self.mergeable = not self.prompt and self.kind != PeftType.ADAPTION_PROMPT
        self.supports_packing = not self.prompt  # virtual tokens before every row
        # prefixes (and LLaMA-Adapter's cached prompts) are applied again in a recomputed block
        self.supports_checkpointing = self.kind not in (
            PeftType.PREFIX_TUNING,
            PeftType.ADAPTION_PROMPT,
        )

    def adapters_off_is_base(self) -> bool:
        return True  # the base stays as loaded (inits that rewrite it are refused)

    def on_meta(self, model: nn.Module) -> None:
        """Undo what peft does differently when it builds the tuner on the meta device (the
        planner's copy); nothing by default."""

    def kept_fallback(self) -> tuple[bool, float]:
        """Per-token activations of one adapted module where the meta forward cannot run: as
        LoRA in SVD form of rank r (its input, A x and the diagonal's output)."""
        return True, 2.0 * getattr(self.config, "r", 0)

    def fill(self, config: PeftConfig, model: nn.Module, ctx: PrepareContext | None) -> PeftConfig:
        """Settings peft needs that the run knows (e.g. AdaLoRA's total steps); none by default.
        ``ctx`` is None when the planner builds the tuner on the meta device."""
        return config

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        config = self.fill(copy.deepcopy(self.config), model, ctx)
        try:
            peft_model = get_peft_model(model, config)
        except (ValueError, TypeError, KeyError, NotImplementedError, AttributeError) as e:
            raise SlimtuneError(f"config: params: {self.name}: {str(e).splitlines()[0]}") from None
        if "quantised_weight" in ctx.extras:
            keep_dtype(peft_model)
        if not any(p.requires_grad for p in peft_model.parameters()):
            raise SlimtuneError(
                f"config: params: {self.name}: peft's {type(config).__name__} made nothing "
                "trainable on this model (check target_modules)"
            )
        return peft_model

    def save(self, model: PeftModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)

    @classmethod
    def load(cls, base: nn.Module, run_dir: Path) -> nn.Module:
        model = PeftModel.from_pretrained(base, run_dir)
        if any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in base.modules()):
            keep_dtype(model)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        if not self.mergeable:
            raise SlimtuneError(
                f"params: {self.name}: peft's {spell(self.kind)} adds inputs (virtual tokens or "
                "gated prompts) that cannot be folded into the weights; load the adapter with "
                "peft.PeftModel.from_pretrained instead"
            )
        try:
            return model.merge_and_unload()
        except (ValueError, TypeError, NotImplementedError, AttributeError) as e:
            raise SlimtuneError(
                f"params: {self.name}: peft cannot merge {spell(self.kind)}: "
                f"{str(e).splitlines()[0]}"
            ) from None

    def memory(self, plan: Any) -> None:
        """Counted, not modelled: the tuner is built over the architecture on the meta device
        (no memory), which gives its trainable tensors exactly; each wrapped module's forward
        runs there once on a meta input, and the tensors autograd keeps for it, per token, are
        the adapter's activations (whether it keeps its input, which the block may share, and
        what else). Virtual tokens lengthen every sequence; prefixes lengthen attention."""
        from ...plan.planner import Adapter, Spec

        plan.freeze_all()
        sh = plan.shape
        model = meta_model(sh)
        cfg = self.fill(copy.deepcopy(self.config), model, None)
        peft_model = get_peft_model(model, cfg)
        self.on_meta(peft_model)
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                module = name.split(".")[-2] if "." in name else name
                layer = layer_of(name)
                where = module if layer is not None else "embed"
                plan.add_new(Spec(name, tuple(p.shape), "adapter", layer, where, 4.0))
        fixed: dict[int, float] = {}
        for name, mod in peft_model.named_modules():
            layer = layer_of(name)
            if isinstance(mod, BaseTunerLayer) and layer is not None:
                try:
                    keeps_input, per_token, kept = kept_per_token(mod)
                except RuntimeError:  # KaSA decomposes W at its first forward (not on meta)
                    (keeps_input, per_token), kept = self.kept_fallback(), {}
                fixed.update(kept)
                adapter = Adapter(layer, name.split(".")[-1], keeps_input, per_token)
                plan.adapters.append(adapter)
        if fixed:
            plan.add(
                "activations",
                sum(fixed.values()) * plan.work.act_bytes / 4,
                "backward",
                "tensors the tuner builds from its weights or buffers, kept for backward",
            )
        if self.kind == PeftType.PREFIX_TUNING:
            plan.needs_mask, plan.prefix_tokens = True, cfg.num_virtual_tokens
            q = sh.heads * sh.head_dim  # prefix keys and values, repeated per query head
            plan.add(
                "activations",
                sh.layers * plan.work.batch * 2 * cfg.num_virtual_tokens * q * plan.work.act_bytes,
                "backward",
                "prefix keys and values kept by attention",
            )
        elif self.prompt:
            plan.extra_tokens = cfg.num_virtual_tokens
        if self.prompt:
            plan.grad_from = 0  # virtual tokens enter below block 0
        if self.kind == PeftType.ADAPTION_PROMPT:
            # per adapted block and token: the adapter's scores and their softmax over the
            # prompt (per head), its output and the gated output
            first = sh.layers - cfg.adapter_layers
            for layer in range(first, sh.layers):
                per = 2 * sh.heads * cfg.adapter_len + 2 * sh.heads * sh.head_dim
                plan.adapters.append(Adapter(layer, "o_proj", False, per))


def keep_dtype(model: nn.Module) -> None:
    """Over a quantised base, some peft tuners (IA3's 4-bit layer on CPU) return their float32
    scaling's dtype instead of the layer's compute dtype, and attention then meets queries and
    keys of two dtypes: every wrapped module's output is cast back to its input's dtype."""

    def cast(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        x = args[0] if args else None
        if isinstance(out, torch.Tensor) and isinstance(x, torch.Tensor) and out.dtype != x.dtype:
            return out.to(x.dtype)
        return out

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.register_forward_hook(cast)


# --------------------------------------------------------------------------------------------
# The generic entry and the named ones
# --------------------------------------------------------------------------------------------


@register("params", "peft")
class Peft(PeftTuner):
    """Any tuner of the installed peft by its type (ia3, loha, lokr, oft, boft, hra, vera, fourierft, vblora, ...), with peft's own config fields as options."""

    @dataclass
    class Config(PeftTuner.Config):
        type: str = "lora"
        """peft's tuner type, as peft names it (lower case; - or _): ia3, loha, lokr, oft, vera, adalora, miss, p-tuning, adaption-prompt, ..."""

        def kind(self) -> PeftType:
            return resolve(self.type)


@register("params", "ia3")
class IA3(PeftTuner):
    """IA3 (Liu et al., https://arxiv.org/abs/2205.05638): learned vectors rescale the keys, values and the MLP's inner activations; peft's IA3Config fields as options."""

    @dataclass
    class Config(PeftTuner.Config):
        tuner: ClassVar[str] = "ia3"


@register("params", "miss")
class Miss(PeftTuner):
    """MiSS (Kang et al., https://arxiv.org/abs/2409.15371, successor of Bone): a shared, block-structured update of each weight from its input's chunks; peft's MissConfig fields as options."""

    @dataclass
    class Config(PeftTuner.Config):
        tuner: ClassVar[str] = "miss"
        defaults: ClassVar[dict[str, Any]] = {"r": 16, "target_modules": ["q_proj", "v_proj"]}


@register("params", "bone")
class Bone(Miss):
    """Bone (block affine adaptation), by its successor in peft: the same as `miss` (peft merged Bone into MiSS)."""


@register("params", "vera")
class Vera(PeftTuner):
    """VeRA (Kopiczko et al., https://arxiv.org/abs/2310.11454): frozen random A and B shared by all layers, only two scaling vectors per layer train; peft's VeraConfig fields as options."""

    @dataclass
    class Config(PeftTuner.Config):
        tuner: ClassVar[str] = "vera"
        defaults: ClassVar[dict[str, Any]] = {"r": 256, "target_modules": ["q_proj", "v_proj"]}


@register("params", "kasa")
class Kasa(PeftTuner):
    """KaSA (Wang et al., https://arxiv.org/abs/2412.06071): LoRA in SVD form over the base with its r smallest singular directions removed, plus the singular-value regularisers; peft's LoraConfig fields (kasa_config: {beta, gamma}) as options."""

    @dataclass
    class Config(PeftTuner.Config):
        tuner: ClassVar[str] = "lora"
        defaults: ClassVar[dict[str, Any]] = {"kasa_config": {}, "r": 8, "lora_alpha": 16}

    frozen_base = False  # KaSA rewrites W: its r smallest singular directions are removed

    def adapters_off_is_base(self) -> bool:
        return False

    def base_change(self) -> str | None:
        return "KaSA removes the r smallest singular directions of W"

    def check_optimizer(self, optimizer: Any) -> None:
        kasa = self.config.kasa_config
        if optimizer.forward_only and (kasa.beta or kasa.gamma):
            raise SlimtuneError(
                f"params: kasa: its singular-value regularisers need gradients, which optimizer "
                f"{optimizer.name} does not compute; set kasa_config: {{beta: 0, gamma: 0}}"
            )

    def regulariser(self, model: nn.Module) -> torch.Tensor | None:
        """KaSA's two singular-value terms (peft computes them: beta and gamma of kasa_config)."""
        loss = model.base_model._get_kasa_loss()
        return loss if isinstance(loss, torch.Tensor) else None


@register("params", "p-tuning")
class PTuning(PeftTuner):
    """P-tuning (Liu et al., https://arxiv.org/abs/2103.10385): virtual-token embeddings produced by a small prompt encoder (MLP or LSTM); peft's PromptEncoderConfig fields as options."""

    @dataclass
    class Config(PeftTuner.Config):
        tuner: ClassVar[str] = "p-tuning"
        defaults: ClassVar[dict[str, Any]] = {"num_virtual_tokens": 20}


@register("params", "llama-adapter")
class LlamaAdapter(PeftTuner):
    """LLaMA-Adapter (Zhang et al., https://arxiv.org/abs/2303.16199): learned prompts in the top blocks' attention with zero-initialised gates; peft's AdaptionPromptConfig fields as options."""

    @dataclass
    class Config(PeftTuner.Config):
        tuner: ClassVar[str] = "adaption-prompt"
        defaults: ClassVar[dict[str, Any]] = {"adapter_len": 10, "adapter_layers": 2}


@register("params", "adalora")
class AdaLora(PeftTuner):
    """AdaLoRA (Zhang et al., https://arxiv.org/abs/2303.10512): LoRA in SVD form whose rank budget moves between layers by importance during training; peft's AdaLoraConfig fields as options (total_step defaults to the run's steps)."""

    @dataclass
    class Config(PeftTuner.Config):
        tuner: ClassVar[str] = "adalora"
        defaults: ClassVar[dict[str, Any]] = {"target_modules": ["q_proj", "v_proj"]}

        def peft_options(self) -> dict[str, Any]:
            # peft refuses a config without total_step; unless the recipe sets it, the run's
            # step count replaces this placeholder (``fill``), the least peft accepts here
            out = super().peft_options()
            out.setdefault("total_step", out.get("tinit", 0) + out.get("tfinal", 0) + 1)
            return out

    def fill(self, config: PeftConfig, model: nn.Module, ctx: PrepareContext | None) -> PeftConfig:
        if "total_step" not in self.cfg.options and ctx is not None:
            steps = int(ctx.extras.get("total_steps") or 1)
            if steps <= config.tinit + config.tfinal:
                raise SlimtuneError(
                    f"config: params: adalora: tinit ({config.tinit}) + tfinal ({config.tfinal}) "
                    f"must be below the run's {steps} steps"
                )
            config.total_step = steps
        return config

    def check_optimizer(self, optimizer: Any) -> None:
        if optimizer.forward_only:
            raise SlimtuneError(
                f"params: adalora re-allocates ranks from gradients; optimizer "
                f"{optimizer.name} computes none (use a first-order optimizer, or params: lora)"
            )

    def on_meta(self, model: nn.Module) -> None:
        # peft leaves the rank counters trainable on the meta device (not on a real one),
        # which would make the planner count their division's input as kept
        for name, p in model.named_parameters():
            if ".ranknum." in name:
                p.requires_grad_(False)

    def after_update(self, model: nn.Module, step: int) -> None:
        """peft's rank allocation: importance from this step's weights and gradients, then the
        budget's schedule masks the least important singular values."""
        model.base_model.update_and_allocate(step)

    def regulariser(self, model: nn.Module) -> torch.Tensor | None:
        """The orthogonality term of the paper, as peft weighs it: orth_reg_weight times the
        mean, over every A and B, of the Frobenius norm of P^T P - I (A A^T for A, B^T B for B)."""
        weight = self.config.orth_reg_weight
        if weight == 0:
            return None
        terms = []
        for name, p in model.named_parameters():
            if p.requires_grad and (".lora_A." in name or ".lora_B." in name):
                cov = p @ p.T if ".lora_A." in name else p.T @ p
                eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                terms.append(torch.linalg.matrix_norm(cov - eye))
        return weight * torch.stack(terms).mean() if terms else None


@register("params", "cpt")
class Cpt(PeftTuner):
    """CPT, context-aware prompt tuning (Blau et al., https://arxiv.org/abs/2410.17222): virtual tokens initialised from training examples (the in-context demonstrations), input tokens refined within a projected norm ball, label tokens kept; peft's CPTConfig fields as options."""

    @dataclass
    class Config(PeftTuner.Config):
        tuner: ClassVar[str] = "cpt"
        context_examples: int = 4
        """Training examples whose tokens become the context (unless cpt_token_ids is given)."""
        max_context_tokens: int = 256
        """At most this many context tokens (the examples are cut at the end)."""

        def __post_init__(self) -> None:
            if self.context_examples < 1:
                raise ValueError(f"context_examples must be >= 1, got {self.context_examples}")
            if self.max_context_tokens < 1:
                raise ValueError(f"max_context_tokens must be >= 1, got {self.max_context_tokens}")
            super().__post_init__()

    def fill(self, config: PeftConfig, model: nn.Module, ctx: PrepareContext | None) -> PeftConfig:
        """The context from the run's first training examples: prompt tokens are CPT's input
        tokens (type 4k+2 for example k: refined), answer tokens its output tokens (4k+4:
        kept); the planner (no data) prices ``max_context_tokens`` of them."""
        if "cpt_token_ids" in self.cfg.options:
            return config
        ids: list[int] = []
        types: list[int] = []
        if ctx is None:  # the planner: each example about as long as a training sequence
            ids = [0] * (self.cfg.context_examples * getattr(self, "planned_seq", 1))
            types = [2] * len(ids)
        else:
            if ctx.calibration is None:
                raise SlimtuneError("config: params: cpt needs training data for its context")
            k = 0
            for batch in ctx.calibration():
                for row, mask, labels in zip(
                    batch["input_ids"], batch["attention_mask"], batch["labels"]
                ):
                    keep = mask.bool()
                    ids += row[keep].tolist()
                    types += [4 * k + (2 if int(t) == -100 else 4) for t in labels[keep]]
                    k += 1
                    if k == self.cfg.context_examples:
                        break
                if k == self.cfg.context_examples:
                    break
        ids, types = ids[: self.cfg.max_context_tokens], types[: self.cfg.max_context_tokens]
        return dataclasses.replace(
            config,
            cpt_token_ids=ids,
            cpt_mask=[1] * len(ids),
            cpt_tokens_type_mask=types,
            num_virtual_tokens=len(ids),
        )

    def memory(self, plan: Any) -> None:
        self.planned_seq = plan.work.seq
        super().memory(plan)
