"""LoRA and its PEFT variants (DoRA, rsLoRA, PiSSA, OLoRA, CorDA, LoftQ), all through ``peft``;
LoRA-GGPO's perturbed training (``ggpo``) on top of any of them but DoRA."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoftQConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import CordaConfig
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers import PreTrainedTokenizerBase

from ...errors import SlimtuneError
from ...registry import register
from ..base import ParamsMethod, PrepareContext

# Inits that move the principal part of W into the adapter: the saved adapter is converted back
# to an ordinary LoRA delta on the *original* weights, so PeftModel.from_pretrained(base) works.
CONVERTED_INITS = ("pissa", "olora", "corda")


@register("params", "lora")
class Lora(ParamsMethod):
    """LoRA (Hu et al., https://arxiv.org/abs/2106.09685): W + (alpha/r) B A with A, B trained, W frozen.

    Options map one to one to peft's LoraConfig: ``dora`` (Liu et al. 2024, magnitude/direction),
    ``rslora`` (scale alpha/sqrt(r)), ``init`` = pissa (principal singular vectors, Meng et al.
    2024), olora (QR-orthonormal init), corda (context-oriented SVD from calibration batches of the
    run's own data), loftq (init against a 4-bit quantised W). Saved in PEFT format. ``ggpo``
    trains at a point perturbed along the optimizer's momentum (LoRA-GGPO, Chang et al.,
    https://arxiv.org/abs/2502.14538; methods/params/ggpo.py).
    """

    frozen_base = True
    ggpo: Any = None  # the run's GGPO perturbation (methods/params/ggpo.py) once prepared

    @dataclass
    class Config:
        r: int = 8
        """Rank of the update."""
        alpha: float = 16.0
        """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""
        dropout: float = 0.0
        """Dropout on the adapter input."""
        target_modules: list[str] = field(default_factory=list)
        """Module names to adapt (e.g. [q_proj, v_proj]); [all-linear] for every linear but the head; empty: peft's default for the architecture."""
        init: Literal["default", "gaussian", "pissa", "olora", "corda", "loftq"] = "default"
        """Adapter initialisation."""
        dora: bool = False
        """Weight-decomposed LoRA (DoRA)."""
        rslora: bool = False
        """Rank-stabilised scaling alpha / sqrt(r)."""
        bias: Literal["none", "all", "lora_only"] = "none"
        """Which biases train."""
        modules_to_save: list[str] = field(default_factory=list)
        """Modules trained in full and saved with the adapter (e.g. [lm_head])."""
        pissa_niter: int = 16
        """PiSSA: fast randomised SVD iterations; 0 computes the exact SVD."""
        loftq_bits: int = 4
        """LoftQ: bits of the quantised base the adapter compensates."""
        corda_mode: Literal["ipm", "kpm"] = "ipm"
        """CorDA: instruction-previewed (ipm) or knowledge-preserving (kpm) mode."""
        calibration_examples: int = 64
        """CorDA: training examples used to estimate activation covariances."""
        ggpo: bool = False
        """LoRA-GGPO/MGPO (arXiv 2502.14538): each step computes at W + eps, eps along the optimizer's momentum in weight space, sized by the smoothed gradient norm (flatter minima); W itself is never written."""
        ggpo_rho: float = 0.05
        """GGPO: perturbation radius rho."""
        ggpo_beta: float = 0.9
        """GGPO: decay of the moving average of each layer's weight-space gradient norm."""
        ggpo_max_scale: float = 10.0
        """GGPO: cap on 1 / (smoothed gradient norm), the perturbation's size factor."""

        def __post_init__(self) -> None:
            if self.r < 1:
                raise ValueError(f"r must be >= 1, got {self.r}")
            if self.alpha <= 0:
                raise ValueError(f"alpha must be > 0, got {self.alpha}")
            if self.pissa_niter < 0:
                raise ValueError(f"pissa_niter must be >= 0, got {self.pissa_niter}")
            if self.loftq_bits not in (2, 4, 8):
                raise ValueError(f"loftq_bits must be 2, 4 or 8, got {self.loftq_bits}")
            if self.calibration_examples < 1:
                raise ValueError(
                    f"calibration_examples must be >= 1, got {self.calibration_examples}"
                )
            if not 0 <= self.dropout < 1:
                raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
            if self.ggpo_rho <= 0:
                raise ValueError(f"ggpo_rho must be > 0, got {self.ggpo_rho}")
            if not 0 <= self.ggpo_beta < 1:
                raise ValueError(f"ggpo_beta must be in [0, 1), got {self.ggpo_beta}")
            if self.ggpo_max_scale <= 0:
                raise ValueError(f"ggpo_max_scale must be > 0, got {self.ggpo_max_scale}")
            if self.ggpo and self.dora:
                raise ValueError(
                    "ggpo does not combine with dora: DoRA normalises the columns of W + BA, "
                    "so a perturbation of W cannot be added beside the layer's output"
                )

    def memory(self, plan: Any) -> None:
        """A (r x in) and B (out x r) per targeted linear, fp32 (peft keeps adapters in fp32
        over 16-bit bases); each keeps its input (dropout: a copy and its mask) and the r-wide
        A output for backward; over a 16-bit or quantised base, peft casts the input to the
        adapter's float32 first, so each adapter keeps that copy (and its A output) in fp32. DoRA adds the magnitude vector and, per layer, the dense
        W + BA whose column norms it takes (a temporary)."""
        from ...plan.planner import BLOCK_LINEARS, Adapter, Spec

        c, sh = self.cfg, plan.shape
        targets = list(c.target_modules) or list(
            TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(sh.family, ["q_proj", "v_proj"])
        )
        if targets == ["all-linear"]:
            targets = list(BLOCK_LINEARS)
        plan.freeze_all()
        chosen = [
            s for s in plan.linears() if any(t == s.module or s.name.endswith(t) for t in targets)
        ]
        for s in chosen:
            out, inp = s.shape
            plan.add_new(Spec(s.name + ".lora_A", (c.r, inp), "adapter", s.layer, s.module, 4.0))
            plan.add_new(Spec(s.name + ".lora_B", (out, c.r), "adapter", s.layer, s.module, 4.0))
            a = plan.work.act_bytes
            extra = c.r + (inp * (1 + 1 / a) if c.dropout else 0)
            shared = plan.work.param_bytes == 4  # fp32 adapters read the layer's own input
            if not shared:  # over a 16-bit base, each adapter keeps its own float32 copy
                # the cast input (or dropout's output and its one-byte mask) and A's output
                extra = (inp * 4 + (inp if c.dropout else 0) + c.r * 4) / a
            if c.dora:
                plan.add_new(Spec(s.name + ".magnitude", (out,), "adapter", s.layer, s.module, 4.0))
                extra += out  # the scaled output before the magnitude
            plan.adapters.append(
                Adapter(s.layer, s.module, saves_input=shared, act_per_token=extra)
            )
        if c.dora and chosen:
            plan.add(
                "temporaries",
                2 * max(s.numel for s in chosen) * 4.0,
                "backward",
                "DoRA: dense W + BA of one layer",
            )
        if c.ggpo and chosen:
            # the step's perturbation factors [m_B, B] and [A; m_A] of every layer, fp32
            width = sum(2 * c.r * (s.shape[0] + s.shape[1]) for s in chosen)
            plan.add("temporaries", width * 4.0, "backward", "GGPO: perturbation factors")
        if plan.quantised and chosen:
            plan.note("LoRA over a quantised base (QLoRA)")

    def adapters_off_is_base(self) -> bool:
        # not after an init that moves part of W into the adapter (pissa, olora, corda) or
        # fits the adapter to a quantisation error (loftq): only B = 0 leaves W as loaded
        return self.cfg.init in ("default", "gaussian")

    def sharding_refusal(self) -> str | None:
        if self.cfg.ggpo:
            return "with ggpo=true perturbs with whole momentum tensors"
        if self.cfg.dora:
            return "with dora=true is not tested under sharding yet"
        if type(self) is not Lora:
            return "is not tested under sharding yet"  # variants with their own hooks
        return None  # tests/test_sharding.py: equals one process

    def base_change(self) -> str | None:
        init = self.cfg.init
        if init in CONVERTED_INITS:
            return f"init {init!r} moves the principal part of W into the adapter"
        return None  # LoftQ on a quantised base initialises against it (prepare)

    def _peft_config(self, model: nn.Module) -> LoraConfig:
        c = self.cfg
        init: bool | str = {"default": True, "gaussian": "gaussian"}.get(c.init, c.init)
        peft_loftq = c.init == "loftq" and not getattr(self, "on_quantised", False)
        if c.init == "loftq" and not peft_loftq:
            init = True  # loftq_on_base sets A and B after injection
        if c.init == "pissa" and c.pissa_niter > 0:
            init = f"pissa_niter_{c.pissa_niter}"
        targets: list[str] | str | None = c.target_modules or None
        if targets == ["all-linear"]:
            targets = "all-linear"
        elif targets is None:  # peft's per-architecture default, made explicit (CorDA needs it)
            targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(
                model.config.model_type
            )
            if targets is None:
                raise SlimtuneError(
                    f"config: params.target_modules: peft has no default for "
                    f"{model.config.model_type!r}; name the modules (or [all-linear])"
                )
        return LoraConfig(
            task_type="CAUSAL_LM",
            r=c.r,
            lora_alpha=c.alpha,
            lora_dropout=c.dropout,
            target_modules=targets,
            init_lora_weights=init,
            use_dora=c.dora,
            use_rslora=c.rslora,
            bias=c.bias,
            modules_to_save=c.modules_to_save or None,
            loftq_config=LoftQConfig(loftq_bits=c.loftq_bits) if peft_loftq else {},
            corda_config=CordaConfig(corda_method=c.corda_mode) if c.init == "corda" else None,
        )

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        self.on_quantised = self.cfg.init == "loftq" and "quantised_weight" in ctx.extras
        if self.cfg.init == "loftq" and not self.on_quantised and not torch.cuda.is_available():
            # peft's LoftQ quantiser moves every weight to a CUDA (or XPU) device.
            raise SlimtuneError(
                "config: params.init: loftq needs a CUDA device (peft computes it there) or a "
                "quantised base (base: nf4), which it then initialises against on any device"
            )
        config = self._peft_config(model)
        if self.cfg.init == "corda":
            self._corda(model, config, ctx)
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as e:
            raise SlimtuneError(f"config: params: {str(e).splitlines()[0]}") from None
        if self.on_quantised:
            loftq_on_base(peft_model, ctx)
        if self.cfg.ggpo:
            from .ggpo import GGPO

            c = self.cfg
            self.ggpo = GGPO(peft_model, c.ggpo_rho, c.ggpo_beta, c.ggpo_max_scale)
        self.initial: Path | None = None
        if self.cfg.init in CONVERTED_INITS:
            self.initial = ctx.work_dir / "initial-adapter"
            peft_model.save_pretrained(self.initial)
        return peft_model

    # --- GGPO: the perturbation around each step, its state in checkpoints ---------------------
    def check_optimizer(self, optimizer: Any) -> None:
        if not self.cfg.ggpo:
            return
        c = optimizer.cfg
        if optimizer.name == "adamw" and c.state_bits == 32:
            return
        if optimizer.name == "sgd" and c.momentum > 0:
            return
        raise SlimtuneError(
            f"params: lora: ggpo perturbs along the optimizer's first moment of each factor, "
            f"which optimizer {optimizer.name} does not keep in the factor's own shape; use "
            f"adamw (state_bits 32) or sgd with momentum"
        )

    def on_step_start(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        if self.ggpo is not None:
            self.ggpo.start(optimizer)

    def after_update(self, model: nn.Module, step: int) -> None:
        if self.ggpo is not None:
            self.ggpo.end()
            self.ggpo.commit()

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().trainable_state(model)
        if self.ggpo is not None:
            state.update(self.ggpo.state())
        return state

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if self.ggpo is not None:
            self.ggpo.load_state(state)
            state = {k: v for k, v in state.items() if not k.endswith(".ggpo_gbar")}
        super().load_trainable_state(model, state)

    def _corda(self, model: nn.Module, config: LoraConfig, ctx: PrepareContext) -> None:
        from peft.tuners.lora.corda import preprocess_corda

        if ctx.calibration is None:
            raise SlimtuneError("params.init=corda needs calibration data")

        @torch.no_grad()
        def run_model() -> None:
            # peft's covariance hooks expect one unpadded sequence per forward.
            seen = 0
            for batch in ctx.calibration():
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                    if seen >= self.cfg.calibration_examples:
                        return
                    model(input_ids=ids[mask.bool()][None].to(model.device))
                    seen += 1

        preprocess_corda(model, config, run_model=run_model)

    def save(self, model: PeftModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
        if self.initial is not None:
            # peft rewrites the initial adapter's config in place during conversion, and loads it
            # under its directory's name as adapter name: use a copy with a plain name.
            scratch = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".convert-"))
            initial = scratch / "initial_adapter"
            shutil.copytree(self.initial, initial)
            try:
                model.save_pretrained(
                    out_dir, path_initial_model_for_weight_conversion=str(initial)
                )
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        else:
            model.save_pretrained(out_dir)
        if self.cfg.init == "loftq" and not self.on_quantised:
            # LoftQ replaced W by its quantised version: the adapter only fits that base.
            # Save it under the plain module names (without peft's base_layer / lora_ entries).
            base = model.get_base_model()
            state = {
                k.replace(".base_layer.", "."): v
                for k, v in base.state_dict().items()
                if "lora_" not in k
            }
            base.save_pretrained(out_dir / "base", state_dict=state)
        tokenizer.save_pretrained(out_dir)

    @classmethod
    def load(cls, base: nn.Module, run_dir: Path) -> nn.Module:
        if (run_dir / "base").is_dir():
            from transformers import AutoModelForCausalLM

            ref = next(base.parameters())
            base = AutoModelForCausalLM.from_pretrained(run_dir / "base", dtype=ref.dtype)
            base = base.to(ref.device)
        return PeftModel.from_pretrained(base, run_dir)

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()


def loftq_on_base(model: PeftModel, ctx: PrepareContext) -> None:
    """LoftQ (Li et al., https://arxiv.org/abs/2310.08659) against the quantised base the run
    holds: with Q the base's own quantised weight and W the checkpoint's, s B A is the best
    rank-r approximation of W - Q (its SVD), so Q + s B A starts closer to W than Q. This is
    LoftQ's first alternation; later ones would re-quantise W - s B A and so change the base,
    which a run on a quantised base keeps exactly as loaded. ``ctx.extras`` gives the
    checkpoint's weights by name (``dense_weight``) and the base's dequantised weight of a
    layer (``quantised_weight``)."""
    from peft.tuners.lora import LoraLayer

    dense, quantised = ctx.extras["dense_weight"], ctx.extras["quantised_weight"]
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        key = name.removeprefix("base_model.model.") + ".weight"
        w = dense(key).to(device=a.device, dtype=torch.float32)
        q = quantised(module.get_base_layer()).to(torch.float32)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        r = a.shape[0]
        root = (s[:r] / module.scaling["default"]).sqrt()
        with torch.no_grad():
            b.copy_((u[:, :r] * root).to(b.dtype))
            a.copy_((root[:, None] * vh[:r]).to(a.dtype))
