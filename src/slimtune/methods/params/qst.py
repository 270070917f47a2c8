"""QST: quantized side tuning (Zhang et al. 2024, https://arxiv.org/abs/2401.07159).

The base model (dense or 4-bit) runs under ``torch.no_grad()``: it builds no graph and keeps
no activation for backward. A small side network of width w = d / r (r = ``reduction``) reads
the hidden state after every base block through a downsampler and is the only thing backward
runs through. With h_0 the embedding output and h_i the output of block i (i = 1..L)::

    g_0 = down_1(h_0)
    z_i = a_i * down_i(h_i) + (1 - a_i) * g_{i-1},    a_i = sigmoid(gate_i)   (per channel)
    g_i = side_block_i(z_i)
    y   = final_norm(h_L) + exp(out_gate) * up(side_norm(g_L))
    logits = head(y)                               (final_norm and head: the base's, frozen)

What follows the paper's code (github.com/YouAreSpecialToMe/QST, modeling_llama_qst.py) and
what does not:

- downsampler (``downsample: lora``): a low-rank map d -> ``down_rank`` -> w followed by a
  LayerNorm, as the paper's adapter downsampler; ``avgpool`` is its gradient-free variant (the
  mean of r neighbouring channels), then the same LayerNorm. The first downsampler serves both
  h_0 and h_1, as in the paper's code.
- side blocks: a pre-norm Llama block at width w (RMSNorm, causal self-attention with RoPE,
  SwiGLU MLP of width I / r), as the paper's reduced ``LlamaDecoderLayer``; plain multi-head
  attention with its own RoPE (theta 10000) rather than the base's grouped-query layout.
  ``side_heads`` = 0 keeps the base's head count, or the largest smaller one that leaves an even
  head size (RoPE rotates pairs of channels).
- gates: per-channel vectors as in the paper's code (``z`` and ``lm_head_z``); the side share a_i
  starts at sigmoid(-0.5) and the side's share b of the output at sigmoid(-1), the paper's
  initial values.
- output: the paper normalises h_L with the base's final norm and g_L with the side's own
  RMSNorm, then mixes them with a learned gate b, b * up + (1 - b) * final_norm(h_L), from a
  random upsampler (logits not the base's at step 0). Here the mix is additive after the same
  two norms: final_norm(h_L) + exp(out_gate) * up(...) with a zero-initialised upsampler (as
  LoRA's B = 0), so the model starts exactly as the base model, and the side's correction has
  the scale of the normalised hidden state. (Mixing *before* the final norm, as a first version
  did, left the side's correction negligible against h_L's scale on SmolLM2: held-out accuracy
  did not move in 38 demo steps.)

Saved as ``qst_side.safetensors`` (the side network) and ``qst_config.json`` (its settings) next
to the tokenizer; :meth:`QST.load` rebuilds it on a freshly loaded base.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from ...errors import SlimtuneError
from ...registry import register
from ..base import ParamsMethod, PrepareContext
from ..shared import decoder_layers

SIDE_FILE = "qst_side.safetensors"
CONFIG_FILE = "qst_config.json"
ROPE_THETA = 10000.0
GATE_INIT = -0.5  # a_i = sigmoid(-0.5) = 0.38: the paper's z = 0.5 kept for g_{i-1}
OUT_GATE_INIT = -1.0  # b = sigmoid(-1) = 0.27: the paper's lm_head_z = 1 kept for the base


@dataclass(frozen=True)
class SideShape:
    """The widths of a side network, resolved from the base's config and QST's options."""

    hidden: int  # d, the base's width
    width: int  # w = d // reduction
    layers: int  # L, one side block per base block
    heads: int  # attention heads of a side block
    inner: int  # width of a side block's MLP
    downsample: str
    rank: int  # the low-rank downsampler's middle width


class Downsampler(nn.Module):
    """d -> w: a low-rank map (or the mean of r neighbouring channels), then a LayerNorm that
    brings hidden states of every depth to one scale."""

    def __init__(self, s: SideShape):
        super().__init__()
        self.low_rank = s.downsample == "lora"
        if self.low_rank:
            self.a = nn.Linear(s.hidden, s.rank, bias=False)
            self.b = nn.Linear(s.rank, s.width, bias=False)
        self.norm = nn.LayerNorm(s.width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.to(self.norm.weight.dtype)
        if self.low_rank:
            return self.norm(self.b(self.a(h)))
        return self.norm(h.unflatten(-1, (self.norm.weight.shape[0], -1)).mean(-1))


class SideBlock(nn.Module):
    """A pre-norm Llama block at width w: RMSNorm, causal self-attention with RoPE, RMSNorm,
    SwiGLU MLP; both sublayers residual."""

    def __init__(self, s: SideShape):
        super().__init__()
        self.heads = s.heads
        self.attn_norm = nn.RMSNorm(s.width, eps=1e-6)
        self.qkv = nn.Linear(s.width, 3 * s.width, bias=False)
        self.o = nn.Linear(s.width, s.width, bias=False)
        self.mlp_norm = nn.RMSNorm(s.width, eps=1e-6)
        self.gate_up = nn.Linear(s.width, 2 * s.inner, bias=False)
        self.down = nn.Linear(s.inner, s.width, bias=False)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, t, w = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (batch, heads, seq, head_dim)
        q, k = _rotate(q, *rope), _rotate(k, *rope)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, w))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (batch, heads, seq, head_dim), rotating the two halves of each head."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Gate(nn.Module):
    """a * new + (1 - a) * prev with a = sigmoid(logit), one learned logit per channel (the
    paper's z). A module of its own: zeroth-order optimizers perturb parameters per module
    call, splitting its batch-first input into the stacked copies of a batch."""

    def __init__(self, width: int, init: float):
        super().__init__()
        self.logit = nn.Parameter(torch.full((width,), init))

    def forward(self, new: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.logit)
        return a * new + (1 - a) * prev


class OutputGate(nn.Module):
    """The output mix: the base's normalised h_L plus exp(logit) * side (per channel), exactly
    the base's while the upsampler is zero."""

    def __init__(self, width: int, init: float):
        super().__init__()
        self.logit = nn.Parameter(torch.full((width,), init))

    def forward(self, last: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        return last + torch.exp(self.logit) * side


class SideNetwork(nn.Module):
    """The trainable part of QST: downsamplers, gates, side blocks, the side's final norm, the
    upsampler and the output gate. ``forward`` gives ``(final hidden state,)`` as a decoder
    body does (zeroth-order optimizers hook that output)."""

    def __init__(self, s: SideShape):
        super().__init__()
        self.shape = s
        self.downs = nn.ModuleList(Downsampler(s) for _ in range(s.layers))
        self.gates = nn.ModuleList(Gate(s.width, GATE_INIT) for _ in range(s.layers))
        self.blocks = nn.ModuleList(SideBlock(s) for _ in range(s.layers))
        self.norm = nn.RMSNorm(s.width, eps=1e-6)
        self.up = nn.Linear(s.width, s.hidden)
        nn.init.zeros_(self.up.weight)  # starts as the base model (see the module docstring)
        nn.init.zeros_(self.up.bias)
        self.out_gate = OutputGate(s.hidden, OUT_GATE_INIT)
        self.checkpointing = False  # train.gradient_checkpointing: recompute each side block

    def forward(
        self,
        downs: list[torch.Tensor],
        last: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        final_norm: nn.Module,
    ) -> tuple[torch.Tensor]:
        """``downs``: g_0 and the downsampled h_1..h_L; ``last``: h_L (the base's dtype)."""
        g = downs[0]
        for gate, block, down in zip(self.gates, self.blocks, downs[1:]):
            z = gate(down, g)
            if self.checkpointing and torch.is_grad_enabled():
                g = checkpoint(block, z, rope, mask, use_reentrant=False)
            else:
                g = block(z, rope, mask)
        with torch.no_grad():  # the base's own path needs no gradient
            normed = final_norm(last)
        mixed = self.out_gate(normed.to(self.up.weight.dtype), self.up(self.norm(g)))
        return (mixed.to(last.dtype),)


class QSTModel(nn.Module):
    """A frozen causal LM (``base``) run without autograd, plus its ``side`` network; called as
    the base is (``input_ids``, ``attention_mask``, ``logits_to_keep``, ...), with the final
    hidden state (after the base's final norm) as ``hidden_states[-1]``, the only entry."""

    base_model_prefix = "side"  # the module whose output[0] is the final hidden state

    def __init__(self, base: nn.Module, side: SideNetwork, final_norm: str):
        super().__init__()
        self.base, self.side, self.final_norm = base, side, final_norm
        _, self._blocks = decoder_layers(base)

    @property
    def config(self) -> Any:
        return self.base.config

    @property
    def generation_config(self) -> Any:
        return self.base.generation_config

    @property
    def device(self) -> torch.device:
        return self.side.up.weight.device

    def get_output_embeddings(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def activation_checkpointing_enable(self, **kwargs: Any) -> None:
        """train.gradient_checkpointing: the base keeps nothing already; recompute the side
        blocks in backward instead of keeping their activations."""
        self.side.checkpointing = True

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
    ) -> CausalLMOutputWithPast:
        """The base's forward signature, less the KV cache (``use_cache`` is ignored: the side
        network keeps none, so evaluation scores and decodes by whole forwards)."""
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        downs, last = self._base_states(input_ids, attention_mask, position_ids)
        rope = _rope(position_ids, self.side.shape, self.device)
        mask = _side_mask(attention_mask, self.device)
        norm = self.base.get_submodule(self.final_norm)
        (hidden,) = self.side(downs, last, rope, mask, norm)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.get_output_embeddings()(hidden[:, keep])
        return CausalLMOutputWithPast(
            logits=logits, hidden_states=(hidden,) if output_hidden_states else None
        )

    def _base_states(
        self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One forward of the base body without autograd; each block's output is downsampled
        as soon as it exists (only the downsampler keeps it, and ``avgpool`` keeps nothing)."""
        grad = torch.is_grad_enabled()
        downs: list[torch.Tensor] = []
        last: list[torch.Tensor] = []

        def entry(module: nn.Module, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            with torch.set_grad_enabled(grad):
                downs.append(self.side.downs[0](h))

        def make_exit(i: int) -> Any:
            def exit_(module: nn.Module, args: tuple, out: Any) -> None:
                h = out[0] if isinstance(out, tuple) else out
                with torch.set_grad_enabled(grad):
                    downs.append(self.side.downs[i](h))
                if i == len(self._blocks) - 1:
                    last.append(h)

            return exit_

        hooks = [self._blocks[0].register_forward_pre_hook(entry, with_kwargs=True)]
        hooks += [blk.register_forward_hook(make_exit(i)) for i, blk in enumerate(self._blocks)]
        try:
            with torch.no_grad():
                self.base.base_model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
                )
        finally:
            for h in hooks:
                h.remove()
        return downs, last[0]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding by whole forwards (the side network keeps no KV cache); rows stop at
        an end-of-sequence token and are padded after it."""
        if do_sample:
            raise SlimtuneError("params: qst: generate decodes greedily only (do_sample=False)")
        eos = self.generation_config.eos_token_id
        stop = torch.tensor(eos if isinstance(eos, list) else [] if eos is None else [eos])
        ids = input_ids
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        pad = pad_token_id if pad_token_id is not None else 0
        for _ in range(max_new_tokens):
            logits = self(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
            token = logits[:, -1].argmax(-1).masked_fill(done, pad)
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, (~done).long()[:, None].to(mask.dtype)], dim=1)
            done |= torch.isin(token, stop.to(token.device))
            if bool(done.all()):
                break
        return ids


def _rope(
    positions: torch.Tensor, s: SideShape, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the side blocks' rotary embedding, (batch, 1, seq, head_dim), fp32."""
    half = s.width // s.heads // 2
    inv = ROPE_THETA ** (-torch.arange(half, device=device, dtype=torch.float32) / half)
    angles = positions.to(device=device, dtype=torch.float32)[..., None] * inv
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos(), angles.sin()


def _side_mask(attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The side blocks' additive attention mask (batch, 1, seq, seq): causal and not onto
    padding; None (plain causal attention) without padding. Every position may see itself, so
    a padded row is never empty (an empty row gives NaN, and NaN times a zero weight stays
    NaN). Additive in the dtype attention computes in (autocast's, else fp32): one tensor that
    every block's attention keeps, where a boolean mask would be converted once per block."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    t = attention_mask.shape[1]
    eye = torch.eye(t, dtype=torch.bool, device=attention_mask.device)
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal & (attention_mask.bool()[:, None, None, :] | eye)
    dtype = torch.float32
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed.to(device), torch.finfo(dtype).min)


def _find_final_norm(base: nn.Module) -> str:
    """The name of the module the base applies to its last block's output (its final norm),
    found on a 3-token probe; refused where the last block's output goes to no module."""
    _, blocks = decoder_layers(base)
    seen: dict[str, Any] = {}
    last: list[torch.Tensor] = []
    inside = {id(m) for m in blocks.modules()}
    hooks = [blocks[-1].register_forward_hook(lambda m, a, o: last.append(_first(o)))]
    for name, module in base.named_modules():
        if name and id(module) not in inside:
            hooks.append(module.register_forward_pre_hook(_recorder(seen, name)))
    try:
        device = next(base.parameters()).device
        probe = torch.tensor([[1, 2, 3]], device=device) % base.config.vocab_size
        with torch.no_grad():
            base.base_model(input_ids=probe, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    names = [n for n, x in seen.items() if last and x is last[0]]
    if not names:
        raise SlimtuneError(
            f"params: qst: {type(base).__name__} applies no final norm to its last block's "
            "output; QST mixes the side network's output in before that norm"
        )
    return names[-1]  # the innermost module that received it


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out


def _recorder(seen: dict[str, Any], name: str) -> Any:
    def record(module: nn.Module, args: tuple) -> None:
        if args:
            seen[name] = args[0]

    return record


@register("params", "qst")
class QST(ParamsMethod):
    """QST (Zhang et al. 2024, https://arxiv.org/abs/2401.07159): a frozen base run without autograd; a small gated side network on its downsampled hidden states trains."""

    frozen_base = True
    mergeable = False

    @dataclass
    class Config:
        reduction: int = 16
        """Side network width = base hidden size / reduction (the paper's r)."""
        downsample: Literal["lora", "avgpool"] = "lora"
        """Downsampler of each block's hidden state: a low-rank map (lora) or the gradient-free mean of reduction neighbouring channels (avgpool); both then a LayerNorm."""
        down_rank: int = 64
        """Middle width of the low-rank downsampler (downsample: lora)."""
        side_heads: int = 0
        """Attention heads of a side block; 0: the base's count, or the largest smaller one that leaves an even head size."""

        def __post_init__(self) -> None:
            if self.reduction < 1:
                raise ValueError(f"reduction must be >= 1, got {self.reduction}")
            if self.down_rank < 1:
                raise ValueError(f"down_rank must be >= 1, got {self.down_rank}")
            if self.side_heads < 0:
                raise ValueError(f"side_heads must be >= 0, got {self.side_heads}")

    def side_shape(self, config: Any) -> SideShape:
        """The side network's widths for a base with this ``config`` (refused in one line
        where the options do not fit the base)."""
        c, d = self.cfg, config.hidden_size
        w = d // c.reduction
        if w < 2 or w % 2:
            raise SlimtuneError(
                f"params.reduction: hidden size {d} / {c.reduction} must give an even side "
                f"width >= 2, got {w}"
            )
        if c.downsample == "avgpool" and d % c.reduction:
            raise SlimtuneError(f"params.reduction: avgpool needs it to divide the hidden size {d}")
        heads = c.side_heads or next(
            h for h in range(min(config.num_attention_heads, w // 2), 0, -1) if w % (2 * h) == 0
        )
        if w % heads or (w // heads) % 2:
            raise SlimtuneError(
                f"params.side_heads: {heads} heads must split the side width {w} into even "
                "head sizes"
            )
        inner = max(1, (getattr(config, "intermediate_size", None) or 4 * d) // c.reduction)
        return SideShape(d, w, config.num_hidden_layers, heads, inner, c.downsample, c.down_rank)

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        model.requires_grad_(False)
        s = self.side_shape(model.config)
        norm = _find_final_norm(model)
        with torch.random.fork_rng(devices=[]):  # the side network depends on the seed only
            torch.manual_seed(ctx.seed)
            side = SideNetwork(s)
        return QSTModel(model, side.to(next(model.parameters()).device), norm)

    def save(self, model: QSTModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in model.side.state_dict().items()}
        save_file(state, str(out_dir / SIDE_FILE))
        settings = {**asdict(self.cfg), "side": asdict(model.side.shape)}
        (out_dir / CONFIG_FILE).write_text(json.dumps(settings, indent=1))
        tokenizer.save_pretrained(out_dir)

    @classmethod
    def load(cls, base: nn.Module, run_dir: Path) -> nn.Module:
        settings = json.loads((run_dir / CONFIG_FILE).read_text())
        options = {f.name: settings[f.name] for f in fields(cls.Config) if f.init}
        method = cls(cls.Config(**options))
        base.requires_grad_(False)
        s = method.side_shape(base.config)
        if asdict(s) != settings["side"]:
            raise SlimtuneError(
                f"params: qst: {run_dir} holds a side network for another base ({settings['side']})"
            )
        side = SideNetwork(s)
        side.load_state_dict(load_file(str(run_dir / SIDE_FILE)))
        return QSTModel(base, side.to(next(base.parameters()).device), _find_final_norm(base))

    def merge(self, model: nn.Module) -> nn.Module:
        raise SlimtuneError(
            "params: qst: a side network cannot be folded into the base weights; load the run "
            "with slimtune's QST.load(base, run_dir) instead"
        )

    def memory(self, plan: Any) -> None:
        """See :func:`_memory`."""
        _memory(self, plan)


def _memory(method: QST, plan: Any) -> None:
    """The base: frozen and run without a graph (one block's forward activations at a time).
    The side network: its parameters (fp32), their gradients and optimizer state, and what
    autograd keeps of it for backward."""
    from ...plan.planner import Spec

    sh, work = plan.shape, plan.work
    d = sh.hidden
    s = method.side_shape(_Cfg(d, sh.layers, sh.heads, sh.intermediate))
    plan.freeze_all()
    for name, shape in _side_tensors(s):
        # layer None, module "side": no base block trains or is adapted, so the planner
        # prices no base activations and no gradient through a block
        plan.add_new(Spec(f"side.{name}", shape, "adapter", None, "side", 4.0))
    tokens = work.tokens
    kept = _side_saved_per_token(s, work) * tokens + _side_mask_bytes(work)
    plan.add("activations", kept, "backward", "side network only (the base keeps none)")
    a, res = work.act_bytes, work.resid_bytes
    base_block = (3 * sh.intermediate * a + 3 * d * res) * tokens
    mask = work.batch * work.seq * work.seq * 4.0 if work.padded else 0.0
    plan.add(
        "base forward",
        base_block + mask + kept,
        "forward",
        "one frozen block at a time (no graph), beside the side network's activations",
    )
    plan.add(
        "backward transients",
        10 * (s.inner + s.width) * 4.0 * tokens + 2 * d * 4.0 * tokens,
        "backward",
        "gradients through one side block and the output mix",
    )
    if plan.quantised:
        plan.note("QST over a quantised base: the side network trains in fp32")


@dataclass
class _Cfg:
    """The few config fields :meth:`QST.side_shape` reads, for the planner's model shapes."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int


def _side_tensors(s: SideShape) -> Iterator[tuple[str, tuple[int, ...]]]:
    for i in range(s.layers):
        if s.downsample == "lora":
            yield f"downs.{i}.a", (s.rank, s.hidden)
            yield f"downs.{i}.b", (s.width, s.rank)
        yield f"downs.{i}.norm", (2 * s.width,)
        yield f"blocks.{i}.qkv", (3 * s.width, s.width)
        yield f"blocks.{i}.o", (s.width, s.width)
        yield f"blocks.{i}.gate_up", (2 * s.inner, s.width)
        yield f"blocks.{i}.down", (s.width, s.inner)
        yield f"blocks.{i}.norms", (2 * s.width,)
        yield f"gates.{i}.logit", (s.width,)
    yield "norm", (s.width,)
    yield "up", (s.hidden, s.width + 1)
    yield "out_gate.logit", (s.hidden,)


def _side_saved_per_token(s: SideShape, work: Any) -> float:
    """Bytes per token that autograd keeps for the side network's backward: the side in fp32
    (an upper bound under autocast, which keeps 16-bit copies of linear inputs), the base's
    hidden states as the low-rank downsampler keeps them. Counted tensor by tensor on CPU
    (tests/test_plan.py compares it with what autograd keeps)."""
    f, d, w = 4.0, s.hidden, s.width
    h = 2.0 if work.mixed_precision != "no" else 4.0  # a base state as the low-rank map keeps it
    # per downsampler call: the base state and the rank-wide middle (lora), the LayerNorm's
    # input and its two statistics; L + 1 calls (the first downsampler serves h_0 and h_1)
    down = (d * h + s.rank * f if s.downsample == "lora" else 0.0) + (w + 2) * f
    # per side block: the gate mix (downsampled state, previous state) and, inside the block,
    # each RMSNorm's input, normalised input, output (a linear's input) and statistic; the
    # fused q/k/v output; attention's rotated q and k, output, log-sum-exp; o_proj's input;
    # the MLP's gate/up output, activation and product
    block = (2 * (3 * w + 1) + 3 * w + 3 * w + s.heads + w + 4 * s.inner) * f
    mix = 2 * w * f
    if work.checkpointing:  # the mix and each block's input; one block rebuilt in backward
        block, mix = w * f, mix + block / s.layers
    # rotary cos and sin (shared); the side's final RMSNorm; the upsampler's output, kept for
    # the output gate (the mix itself: the final norm's input, priced by the planner)
    out = 2 * (w // s.heads) * f + (3 * w + 1) * f + d * f
    return (s.layers + 1) * down + s.layers * (block + mix) + out


def _side_mask_bytes(work: Any) -> float:
    """The side blocks' additive attention mask (batch x seq x seq), shared by every block."""
    if not work.padded:
        return 0.0
    return work.batch * work.seq * work.seq * (2.0 if work.mixed_precision != "no" else 4.0)
