"""S2FT: structured sparse fine-tuning (Yang et al. 2024).

Per decoder block a few attention heads (columns of o_proj) and FFN channels (columns of
down_proj) are selected. The block's weights are co-permuted so that the selected units form
the leading slice, which leaves the network's output unchanged: query heads move with their
key/value group (grouped-query attention: a selection fills whole KV groups first, so the
selected heads stay contiguous and every query head keeps its KV head), q/k/v rows and o
columns follow the head order, gate/up rows and down columns follow the channel order. A
zero-initialised dense delta D is trained on the slice: y = x W^T + x[..., :s] D^T, through an
autograd function that keeps only x[..., :s] for backward (the frozen W needs no activation).

The artefact is a plain Hugging Face checkpoint in the ORIGINAL unit order with the deltas
added (``merge`` does the same in memory): it loads with ``from_pretrained`` as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ...registry import register
from ..base import ParamsMethod, PrepareContext
from ..shared import SELECTS_PARTS, decoder_layers, seeded_generator


class _SliceDelta(torch.autograd.Function):
    """y = x W^T + b + x[..., :s] D^T, saving only x[..., :s] (W frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta):  # type: ignore[override]
        s = delta.shape[1]
        xs = x[..., :s]
        ctx.save_for_backward(xs.contiguous(), weight, delta)
        y = nn.functional.linear(x, weight, bias)
        return y + nn.functional.linear(xs, delta)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        xs, weight, delta = ctx.saved_tensors
        s = delta.shape[1]
        grad_x = grad_y @ weight.to(grad_y.dtype)
        grad_x[..., :s] += grad_y @ delta.to(grad_y.dtype)
        grad_delta = grad_y.reshape(-1, grad_y.shape[-1]).t() @ xs.reshape(-1, s).to(grad_y.dtype)
        return grad_x, None, None, grad_delta.to(delta.dtype)


class SliceDeltaLinear(nn.Module):
    """A frozen linear layer with a trainable dense delta on its first ``s`` input columns."""

    def __init__(self, base: nn.Linear, s: int):
        super().__init__()
        self.base = base
        self.delta = nn.Parameter(torch.zeros(base.out_features, s, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SliceDelta.apply(x, self.base.weight, self.base.bias, self.delta)

    def merged_weight(self) -> torch.Tensor:
        w = self.base.weight.detach().clone()
        w[:, : self.delta.shape[1]] += self.delta.detach().to(w.dtype)
        return w


def _rows(t: torch.Tensor, order: torch.Tensor, unit: int) -> torch.Tensor:
    """Reorder blocks of ``unit`` rows of t by ``order``."""
    return t.view(len(order), unit, *t.shape[1:])[order].reshape(t.shape)


def _cols(t: torch.Tensor, order: torch.Tensor, unit: int) -> torch.Tensor:
    return t.view(t.shape[0], len(order), unit)[:, order].reshape(t.shape)


@register("params", "s2ft")
class S2FT(ParamsMethod):
    """S2FT (Yang et al. 2024, "S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured Sparsity"): co-permuted heads and FFN channels, dense deltas on the selected o_proj / down_proj column slices."""

    @dataclass
    class Config:
        o_ratio: float = 0.052
        """Share of attention heads per block whose o_proj columns train (at least one head)."""
        down_ratio: float = 0.02
        """Share of FFN channels per block whose down_proj columns train (at least one)."""

        def __post_init__(self) -> None:
            for name in ("o_ratio", "down_ratio"):
                if not 0 < getattr(self, name) <= 1:
                    raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")

    def sharding_refusal(self) -> str | None:
        return SELECTS_PARTS

    def memory(self, plan: Any) -> None:
        """Per block two dense deltas (on o_proj's selected head columns and down_proj's
        selected channel columns), in the weights' dtype; each keeps only its input slice."""
        from ...plan.planner import Adapter, Spec

        sh, c = plan.shape, self.cfg
        heads = max(1, round(c.o_ratio * sh.heads))
        s_o, s_d = heads * sh.head_dim, max(1, round(c.down_ratio * sh.intermediate))
        plan.freeze_all()
        for i in range(sh.layers):
            for mod, s in (("o_proj", s_o), ("down_proj", s_d)):
                plan.add_new(
                    Spec(
                        f"layers.{i}.{mod}.delta",
                        (sh.hidden, s),
                        "adapter",
                        i,
                        mod,
                        plan.work.param_bytes,
                    )
                )
                plan.adapters.append(Adapter(i, mod, saves_input=False, act_per_token=s))

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        cfg = model.config
        n_heads = cfg.num_attention_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        group = n_heads // n_kv
        _, blocks = decoder_layers(model)
        g = seeded_generator(ctx.seed, 4099)
        model.requires_grad_(False)
        self.orders: list[dict[str, torch.Tensor]] = []
        for block in blocks:
            attn, mlp = block.self_attn, block.mlp
            # Heads: whole KV groups first, then part of one more, so the selection is a prefix.
            want = max(1, round(self.cfg.o_ratio * n_heads))
            kv_order = torch.randperm(n_kv, generator=g)
            head_order = []
            for kv in kv_order.tolist():
                heads = torch.randperm(group, generator=g) + kv * group
                head_order += heads.tolist()
            head_order = torch.tensor(head_order)
            channels = mlp.down_proj.in_features
            take = max(1, round(self.cfg.down_ratio * channels))
            ch_order = torch.randperm(channels, generator=g)
            with torch.no_grad():
                for lin in (attn.q_proj,):
                    lin.weight.copy_(_rows(lin.weight, head_order, head_dim))
                    if lin.bias is not None:
                        lin.bias.copy_(_rows(lin.bias, head_order, head_dim))
                for lin in (attn.k_proj, attn.v_proj):
                    lin.weight.copy_(_rows(lin.weight, kv_order, head_dim))
                    if lin.bias is not None:
                        lin.bias.copy_(_rows(lin.bias, kv_order, head_dim))
                attn.o_proj.weight.copy_(_cols(attn.o_proj.weight, head_order, head_dim))
                for lin in (mlp.gate_proj, mlp.up_proj):
                    lin.weight.copy_(_rows(lin.weight, ch_order, 1))
                    if lin.bias is not None:
                        lin.bias.copy_(lin.bias[ch_order])
                mlp.down_proj.weight.copy_(_cols(mlp.down_proj.weight, ch_order, 1))
            attn.o_proj = SliceDeltaLinear(attn.o_proj, want * head_dim)
            mlp.down_proj = SliceDeltaLinear(mlp.down_proj, take)
            self.orders.append({"head": head_order, "kv": kv_order, "channel": ch_order})
        self._head_dim = head_dim
        return model

    def plain_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The merged weights in the original unit order, under the plain module names."""
        _, blocks = decoder_layers(model)
        prefix = {id(b): n for n, b in model.named_modules() if any(b is x for x in blocks)}
        out = {}
        hd = self._head_dim
        for n, p in model.state_dict().items():
            out[n.replace(".base.", ".")] = p
        for block, order in zip(blocks, self.orders):
            name = prefix[id(block)]
            inv_h, inv_kv, inv_c = (torch.argsort(order[k]) for k in ("head", "kv", "channel"))
            attn, mlp = block.self_attn, block.mlp
            for proj in ("q_proj",):
                key = f"{name}.self_attn.{proj}"
                out[f"{key}.weight"] = _rows(out[f"{key}.weight"], inv_h, hd)
                if f"{key}.bias" in out:
                    out[f"{key}.bias"] = _rows(out[f"{key}.bias"], inv_h, hd)
            for proj in ("k_proj", "v_proj"):
                key = f"{name}.self_attn.{proj}"
                out[f"{key}.weight"] = _rows(out[f"{key}.weight"], inv_kv, hd)
                if f"{key}.bias" in out:
                    out[f"{key}.bias"] = _rows(out[f"{key}.bias"], inv_kv, hd)
            out[f"{name}.self_attn.o_proj.weight"] = _cols(attn.o_proj.merged_weight(), inv_h, hd)
            for proj in ("gate_proj", "up_proj"):
                key = f"{name}.mlp.{proj}"
                out[f"{key}.weight"] = _rows(out[f"{key}.weight"], inv_c, 1)
                if f"{key}.bias" in out:
                    out[f"{key}.bias"] = out[f"{key}.bias"][inv_c]
            out[f"{name}.mlp.down_proj.weight"] = _cols(mlp.down_proj.merged_weight(), inv_c, 1)
            for key in (f"{name}.self_attn.o_proj.delta", f"{name}.mlp.down_proj.delta"):
                out.pop(key, None)
        return {k: v.detach().contiguous() for k, v in out.items()}

    def save(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
        sd = self.plain_state_dict(model)
        model.save_pretrained(out_dir, state_dict=sd)
        tokenizer.save_pretrained(out_dir)

    def merge(self, model: nn.Module) -> nn.Module:
        sd = self.plain_state_dict(model)
        _, blocks = decoder_layers(model)
        for block in blocks:
            block.self_attn.o_proj = block.self_attn.o_proj.base
            block.mlp.down_proj = block.mlp.down_proj.base
        with torch.no_grad():
            for n, p in model.state_dict(keep_vars=True).items():
                if n in sd:
                    p.copy_(sd[n])
        return model
