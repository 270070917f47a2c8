"""Quantised bases (bitsandbytes): the linear layers of the model held frozen in 4 or 8 bits.

After the checkpoint loads in the compute dtype, every ``nn.Linear`` but the output head is
replaced by bitsandbytes' ``Linear4bit`` (NF4 or FP4, blocks of 64, optional double
quantisation of the block constants) or ``Linear8bitLt`` (LLM.int8(), per-row absmax); the
embeddings, norms and head stay in the compute dtype, as QLoRA keeps them. Quantisation is
deterministic, so loading the same checkpoint with the same base gives the same integers: a
run directory records only the base's options, never quantised tensors.

Params methods that keep the base frozen (adapters, prompts, side networks) run on these
bases; those that train or rewrite base weights are refused before anything loads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ...errors import SlimtuneError
from ...memory import trim_heap
from ...registry import register
from ..base import BaseWeights, OptimizerMethod, ParamsMethod

COMPUTE = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _bnb() -> Any:
    import logging

    # bitsandbytes' CPU backend warns at import that an optional hub-fetched kernel is absent;
    # slimtune never fetches code at run time, so the fallback kernel is the intended one
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # LLM.int8 multiplies in float16 and says so on every call from bf16/fp32 inputs (the
    # int8 base's docstring says it once)
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise SlimtuneError(
            "base: quantised bases need bitsandbytes: pip install 'bitsandbytes>=0.45'"
        ) from None
    return bitsandbytes


def frozen_base_methods() -> list[str]:
    """Registered params methods that keep the base's own weights unchanged."""
    from ... import registry

    return [n for n in registry.names("params") if registry.get("params", n).frozen_base]


class Quantised(BaseWeights):
    """Linear weights in ``bits`` bits (bitsandbytes), the rest in the compute dtype."""

    quantised: ClassVar[bool] = True
    bits: ClassVar[int]
    flag: ClassVar[str]  # the model attribute peft reads to pick its quantised LoRA layers

    @dataclass
    class Config(BaseWeights.Config):
        compute_dtype: Literal["bf16", "fp32", "fp16"] = "bf16"
        """Dtype the layers compute in and the unquantised parts (embeddings, norms, head) are held in."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return COMPUTE[self.cfg.compute_dtype]

    @property
    def dtype_name(self) -> str:
        return self.cfg.compute_dtype

    def check(self, params: ParamsMethod, optimizer: OptimizerMethod) -> None:
        change = params.base_change()
        if change is not None:
            raise SlimtuneError(
                f"base: {self.name!r} holds frozen {self.bits}-bit weights, and params "
                f"{params.name!r} {change}; use base fp32 or bf16, or a method that keeps "
                f"the base frozen ({', '.join(frozen_base_methods())})"
            )

    def check_device(self, device: str) -> None:
        if device == "cpu" and self.cfg.compute_dtype == "fp16":
            raise SlimtuneError(
                f"base: {self.name!r} with compute_dtype fp16 has no CPU kernels worth using; "
                "set base.compute_dtype to bf16 or fp32 on the CPU"
            )

    def after_load(self, model: nn.Module) -> nn.Module:
        """Replace every linear layer but the output head by its quantised form."""
        bnb = _bnb()
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and child is not head:
                    q = self._quantise(bnb, child)
                    if child.bias is not None:
                        q.bias = self._frozen(child.bias)
                    setattr(parent, name, q)
        setattr(model, self.flag, True)
        # the dense weights and the quantiser's temporaries (a few MB each, so on glibc's
        # heap) are freed by now; hand their pages back rather than keep them resident
        trim_heap()
        return model

    def _frozen(self, t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.detach().to(self.torch_dtype), requires_grad=False)

    def _quantise(self, bnb: Any, linear: nn.Linear) -> nn.Module:
        """The quantised layer of ``linear``'s weight (its bias is set by the caller)."""
        raise NotImplementedError(f"base {self.name!r} quantises no layer")

    def layer_type(self) -> type:
        """The class of the layers :meth:`_quantise` makes."""
        raise NotImplementedError(f"base {self.name!r} names no layer type")

    def dense_weight(self, module: nn.Module) -> torch.Tensor:
        """The weight a quantised layer computes with, dequantised to the compute dtype."""
        raise NotImplementedError(f"base {self.name!r} cannot dequantise")

    def dequantise(self, model: nn.Module) -> nn.Module:
        """Replace every quantised layer by an ``nn.Linear`` holding its dequantised weight in
        the compute dtype: the exact weights the run trained against (for merging; ``.float()``
        after it keeps them exact, since a bf16 value is an fp32 value)."""
        kind = self.layer_type()
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, kind):
                    dense = nn.Linear(
                        child.in_features, child.out_features, bias=False, device="meta"
                    )
                    dense.weight = self._frozen(self.dense_weight(child))
                    if child.bias is not None:
                        dense.bias = self._frozen(child.bias)
                    setattr(parent, name, dense)
        setattr(model, self.flag, False)
        return model


class FourBit(Quantised):
    """bitsandbytes 4-bit blocks (64 weights share one absmax constant)."""

    bits = 4
    flag = "is_loaded_in_4bit"
    quant_type: ClassVar[str]

    @dataclass
    class Config(Quantised.Config):
        double_quant: bool = True
        """Quantise the block constants too (8-bit, blocks of 256): about 0.37 fewer bits per weight."""

    def _quantise(self, bnb: Any, linear: nn.Linear) -> nn.Module:
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=self.torch_dtype,
            compress_statistics=self.cfg.double_quant,
            quant_type=self.quant_type,
            device="meta",
        )
        weight = bnb.nn.Params4bit(
            linear.weight.detach().to(self.torch_dtype),
            requires_grad=False,
            compress_statistics=self.cfg.double_quant,
            quant_type=self.quant_type,
            module=q,
        )
        q.weight = weight._quantize(linear.weight.device)
        # On CPUs with AVX512-BF16 an eval-mode forward without gradients repacks the weight
        # into an inference layout whose kernel has no backward: a later training step then
        # gets no gradient through the layer and nothing says so (ENVIRONMENT.md). Keep the
        # trainable layout.
        q.support_avx512bf16_for_cpu = False
        return q

    def layer_type(self) -> type:
        return _bnb().nn.Linear4bit

    def dense_weight(self, module: nn.Module) -> torch.Tensor:
        bnb = _bnb()
        w = module.weight
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(self.torch_dtype)


@register("base", "nf4")
class NF4(FourBit):
    """4-bit NormalFloat linear weights (QLoRA, https://arxiv.org/abs/2305.14314), frozen."""

    quant_type = "nf4"

    @dataclass
    class Config(FourBit.Config):
        pass


@register("base", "fp4")
class FP4(FourBit):
    """4-bit floating-point linear weights (bitsandbytes FP4, e2m1), frozen."""

    quant_type = "fp4"

    @dataclass
    class Config(FourBit.Config):
        pass


@register("base", "int8")
class Int8(Quantised):
    """8-bit integer linear weights (LLM.int8(), https://arxiv.org/abs/2208.07339), frozen.

    On CUDA bitsandbytes multiplies int8 weights with int8-quantised float16 inputs, outlier
    features above ``threshold`` in float16. On the CPU it trains by dequantising each weight
    (per-row absmax) to the input's dtype before one product; slimtune uses that path in
    evaluation too (bitsandbytes' CPU inference path took twice the time and held 1.4 GB more
    for one forward of SmolLM2 at 16 x 104 tokens), so ``threshold`` has no effect there and
    training and evaluation compute the same function."""

    bits = 8
    flag = "is_loaded_in_8bit"

    @dataclass
    class Config(Quantised.Config):
        threshold: float = 6.0
        """Input features with an outlier above this magnitude are multiplied in 16 bits (0: never)."""

        def __post_init__(self) -> None:
            if self.threshold < 0:
                raise ValueError(f"threshold must be >= 0, got {self.threshold}")

    def _quantise(self, bnb: Any, linear: nn.Linear) -> nn.Module:
        q = _int8_layer(bnb)(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            threshold=self.cfg.threshold,
            device="meta",
        )
        q.weight = bnb.nn.Int8Params(
            linear.weight.detach().to(self.torch_dtype),
            requires_grad=False,
            has_fp16_weights=False,
        )
        q.weight = q.weight.to(linear.weight.device)  # quantises (row-wise absmax, int8)
        return q

    def layer_type(self) -> type:
        return _bnb().nn.Linear8bitLt

    def dense_weight(self, module: nn.Module) -> torch.Tensor:
        w = module.weight
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
        # as bitsandbytes' CPU product dequantises: int8 x (row absmax / 127)
        return w.data.to(self.torch_dtype).mul(scb.unsqueeze(1).mul(1.0 / 127.0))


@functools.cache
def _int8_layer(bnb: Any) -> type:
    """bitsandbytes' ``Linear8bitLt`` computing on the CPU as it trains there, in eval too."""

    class Int8Linear(bnb.nn.Linear8bitLt):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.device.type != "cpu" or self.training:
                return super().forward(x)
            self.training = True  # bitsandbytes picks its dequantise-then-multiply product
            try:
                return super().forward(x)
            finally:
                self.training = False

    return Int8Linear
