"""The analytic memory planner: what a recipe (base x params x optimizer) holds at its peak.

Nothing here knows a method by name. The planner lays out the base model's tensors
(:class:`Spec`, from :class:`~slimtune.plan.shapes.ModelShape`), then asks the params method
and the optimizer method of the recipe, through their ``memory(plan)`` hooks (next to their
code), what they add: which tensors train, adapters and the activations they keep, optimizer
state, temporaries, whether backward runs at all. From that it prices, in bytes:

- ``runtime``: the framework itself (CPU: the resident interpreter, torch, transformers and the
  tokenizer; CUDA: the context and library workspaces outside the caching allocator);
- ``weights`` (base, at their precision; 4-/8-bit for quantised linears) and ``adapters``;
- ``gradients`` (all trainable tensors; one tensor at a time when the optimizer updates inside
  backward; none for zeroth-order methods), ``optimizer state``;
- ``activations`` kept for backward, block by block (what autograd saves depends on which
  weights train), with or without checkpointing, ``recompute`` (one block rebuilt in backward
  under checkpointing) and ``backward transients`` (gradients flowing through one block);
- the ``loss buffer`` (full-vocabulary logits, for one chunk at a time when chunked) and
  ``temporaries`` (what a method or the optimizer allocates for a moment).

Peak = what lives throughout (runtime, weights, adapters, state) + the larger of two phases:
backward's start (activations, loss buffer, transients, method temporaries of the forward) and
the end of backward / the optimizer step (gradients + step temporaries). Counts follow the
loop's own implementation (``loss.py``'s chunked cross-entropy, PEFT's fp32 adapters, torch's
AdamW), so they describe slimtune's runs; ``benchmarks/plan_accuracy.py`` checks them against
measured peaks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import SlimtuneError
from .shapes import ModelShape

GB = 1024**3
MB = 1024**2

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}
# Quantised linear weights, bytes per parameter: 4-bit NF4/FP4 with double quantisation (QLoRA:
# blocks of 64 with an 8-bit absmax, one fp32 per 256 blocks; without it one fp32 absmax per
# block, Workload.double_quant) and LLM.int8 (one fp32 scale per row, ~0).
FOUR_BIT = 0.5 + 1 / 64 + 4 / (64 * 256)
QUANT_BYTES = {
    "nf4": FOUR_BIT,
    "fp4": FOUR_BIT,
    "int8": 1.0,
}

# CPU: resident set of slimtune's loop once set up (torch, transformers, accelerate, datasets,
# tokenizer, tokenised data), weights excluded: 0.54 GB measured here with torch 2.13 /
# transformers 5.24 (1.05 GB before the first step of SmolLM2-135M minus its 0.51 GB of fp32
# weights; ``benchmarks/plan_accuracy.py`` prints it). CUDA: context + cuBLAS workspace (nvidia-smi minus allocated,
# typically 0.5-1 GB); slimtune's measured CUDA peak (max allocated) excludes it.
RUNTIME_BYTES = {"cpu": 0.55 * GB, "cuda": 0.75 * GB}

# RMSNorm (Llama, Qwen2, Mistral, Gemma-3) normalises in float32: what it keeps for backward is
# a float32 copy of its input, whatever the weights' dtype
NORM_BYTES = 4.0

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Order of a block's modules: where gradients enter a block whose input needs none.
STAGE = {
    "input_layernorm": 0,
    "q_proj": 1,
    "k_proj": 1,
    "v_proj": 1,
    "q_norm": 2,
    "k_norm": 2,
    "o_proj": 3,
    "post_attention_layernorm": 4,
    "pre_feedforward_layernorm": 4,
    "gate_proj": 5,
    "up_proj": 5,
    "down_proj": 7,
    "post_feedforward_layernorm": 7,
    # an adapter beside a whole sublayer adds to its output: gradients reach that sum, not the
    # sublayer (the attention's output joins at o_proj's stage; the MLP's ends the block)
    "self_attn": 3,
    "mlp": 8,
}


@dataclass(frozen=True)
class Spec:
    """One tensor of the model: a base weight or a method's new tensor (adapter, prompt)."""

    name: str
    shape: tuple[int, ...]
    kind: Literal["embedding", "head", "linear", "bias", "norm", "adapter"]
    layer: int | None = None  # decoder block; None: embedding, final norm, head
    module: str = ""  # q_proj, ..., input_layernorm; for adapters the module they attach to
    bytes_per: float = 4.0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> float:
        return self.numel * self.bytes_per


@dataclass(frozen=True)
class Workload:
    """What the run does with the model: the numbers the planner needs beyond its shape."""

    seq: int = 512  # tokens per sequence: what the run's batches are padded to
    batch: int = 1
    weights: Literal["fp32", "bf16", "fp16", "nf4", "fp4", "int8"] = "fp32"
    compute: Literal["fp32", "bf16", "fp16"] = "bf16"  # quantised bases: dtype of everything else
    double_quant: bool = True  # 4-bit bases: block constants quantised too
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    checkpointing: bool = False
    loss_chunk: int = 256  # 0: full logits for the whole batch
    attention: Literal["sdpa", "eager"] = "sdpa"
    device: Literal["cpu", "cuda"] = "cpu"
    grad_accum: int = 1
    padded: bool = True  # batches carry padding (False: packed blocks, causal attention only)
    steps: int | None = None  # run length; None: long enough for every periodic term
    runtime: float | None = None  # bytes; None: RUNTIME_BYTES[device]
    # CPU: train.trim_memory (malloc_trim after every block). The terms price live memory,
    # which is what a trimmed run's RSS follows (benchmarks/plan_accuracy.py --trim: within
    # 15%); without trimming the plan adds what glibc keeps (Plan._allocator_terms)
    trim_memory: bool = True
    seq_source: str = ""  # where ``seq`` comes from, for the plan's output (plan/lengths.py)
    # a preference objective: ``batch`` counts sequences (chosen and rejected: twice the
    # pairs); every sequence's log-prob is weighed apart, so the head's logits are recomputed
    # per chunk in backward; ``reference`` 'copy' holds a second set of the weights
    pairs: bool = False
    reference: str = ""
    # train.sharding: fsdp over ``processes``: the plan prices one process (its shares of the
    # weights, gradients and optimizer state, and the weights it gathers to compute)
    processes: int = 1
    sharding: Literal["none", "fsdp"] = "none"

    @property
    def tokens(self) -> int:
        return self.seq * self.batch

    @property
    def param_bytes(self) -> float:
        """Bytes per element of unquantised base tensors (and of tensors that train)."""
        return DTYPE_BYTES.get(self.weights, DTYPE_BYTES[self.compute])

    @property
    def linear_bytes(self) -> float:
        """Bytes per element of the base's linear weights (quantised: with their constants)."""
        if self.weights in QUANT_BYTES and self.weights != "int8" and not self.double_quant:
            return 0.5 + 4 / 64  # one fp32 absmax per block of 64
        return QUANT_BYTES.get(self.weights, self.param_bytes)

    @property
    def act_bytes(self) -> float:
        """Bytes per element of linear outputs (autocast computes them in 16 bits)."""
        if self.mixed_precision != "no":
            return 2.0
        return self.param_bytes

    @property
    def resid_bytes(self) -> float:
        """Bytes per element of the residual stream and norm outputs (they keep the weights'
        dtype under autocast)."""
        return self.param_bytes


@dataclass
class Term:
    name: str
    bytes: float
    phase: Literal["always", "backward", "step", "forward"]
    note: str = ""


@dataclass
class Breakdown:
    """The planner's answer: terms, the two phases and the peak (bytes)."""

    model: str
    params: str
    optimizer: str
    work: Workload
    terms: list[Term]
    trainable_params: int
    total_params: int
    notes: list[str] = field(default_factory=list)
    flops_per_token: float = 0.0  # model FLOPs of one training token (see Plan.flops_per_token)

    def total(self, phase: str) -> float:
        return sum(t.bytes for t in self.terms if t.phase == phase)

    @property
    def phases(self) -> dict[str, float]:
        # "load": a sharded CPU run, before its model is sharded
        return {p: self.total(p) for p in ("forward", "backward", "step", "load")}

    @property
    def peak_phase(self) -> str:
        ph = self.phases
        return max(ph, key=lambda k: ph[k])

    @property
    def peak(self) -> float:
        return self.total("always") + max(self.phases.values())

    def by_name(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in self.terms:
            out[t.name] = out.get(t.name, 0.0) + t.bytes
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "params": self.params,
            "optimizer": self.optimizer,
            "workload": self.work.__dict__,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "terms": [t.__dict__ for t in self.terms],
            "peak_phase": self.peak_phase,
            "peak_bytes": self.peak,
            "flops_per_token": self.flops_per_token,
            "notes": self.notes,
        }


def base_specs(shape: ModelShape, work: Workload) -> list[Spec]:
    """Every parameter tensor of the base model (named as transformers names them), at the
    precision the run holds it in."""
    p = work.param_bytes
    lin = work.linear_bytes
    out = [
        Spec(
            "model.embed_tokens.weight", (shape.vocab, shape.hidden), "embedding", None, "embed", p
        )
    ]
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norms = ["input_layernorm", "post_attention_layernorm"]
    if shape.norms_per_layer == 4:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(shape.layers):
        pre = f"model.layers.{i}."
        for mod, (o, n) in shape.linear_shapes().items():
            part = "mlp" if mod in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            out.append(Spec(f"{pre}{part}.{mod}.weight", (o, n), "linear", i, mod, lin))
        if shape.qkv_bias:
            for mod, n in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                out.append(Spec(f"{pre}self_attn.{mod}.bias", (n,), "bias", i, mod, p))
        if shape.qk_norm:
            for mod in ("q_norm", "k_norm"):
                out.append(
                    Spec(f"{pre}self_attn.{mod}.weight", (shape.head_dim,), "norm", i, mod, p)
                )
        for mod in norms:
            out.append(Spec(f"{pre}{mod}.weight", (shape.hidden,), "norm", i, mod, p))
    out.append(Spec("model.norm.weight", (shape.hidden,), "norm", None, "norm", p))
    if not shape.tied:
        out.append(Spec("lm_head.weight", (shape.vocab, shape.hidden), "head", None, "head", p))
    return out


@dataclass
class Adapter:
    """A method's module hooked onto a block's linear: its input is kept for backward
    (``saves_input``) and ``act_per_token`` more elements per token are kept."""

    layer: int
    module: str
    saves_input: bool = True
    act_per_token: float = 0.0


class Plan:
    """Mutable state that the methods' ``memory`` hooks fill in; :meth:`breakdown` prices it."""

    def __init__(self, shape: ModelShape, work: Workload):
        self.shape, self.work = shape, work
        self.base = base_specs(shape, work)
        self.trainable: list[Spec] = list(self.base)  # full fine-tuning unless a method says
        self.new: list[Spec] = []  # tensors a params method adds (they train)
        self.adapters: list[Adapter] = []
        self.graph = True  # False: forward passes only (zeroth-order)
        self.grads: Literal["all", "per-tensor", "none"] = "all"
        self.grad_from: int | None = None  # lowest block backward reaches (None: derived)
        self.needs_mask = False  # a method makes attention take an explicit mask (prefixes)
        self.prefix_tokens = 0  # keys/values a method prepends in every attention
        self.extra_tokens = 0  # virtual tokens a method prepends to every sequence
        self.batch_factor = 1.0  # forward batch multiple (two-point ZO stacks +eps and -eps)
        self.extra: list[Term] = []
        self.notes: list[str] = []
        self.quantised = work.weights in QUANT_BYTES

    # --- for the hooks ---------------------------------------------------------------------
    def linears(self, modules: Iterable[str] | None = None) -> list[Spec]:
        want = set(modules) if modules is not None else None
        return [s for s in self.base if s.kind == "linear" and (want is None or s.module in want)]

    def freeze_all(self) -> None:
        self.trainable = []

    def train(self, specs: Iterable[Spec]) -> None:
        have = {s.name for s in self.trainable}
        self.trainable += [s for s in specs if s.name not in have]

    def add_new(self, spec: Spec) -> None:
        self.new.append(spec)
        self.trainable.append(spec)

    def add(self, name: str, nbytes: float, phase: str, note: str = "") -> None:
        self.extra.append(Term(name, float(nbytes), phase, note))  # type: ignore[arg-type]

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def trainable_base(self) -> list[Spec]:
        names = {s.name for s in self.new}
        return [s for s in self.trainable if s.name not in names]

    # --- pricing -----------------------------------------------------------------------------
    def _grad_from(self) -> tuple[int | None, bool]:
        """The lowest block backward reaches, and whether gradients flow into its input
        (something below it trains: the embedding, virtual tokens)."""
        into = any(s.kind == "embedding" for s in self.trainable) or any(
            s.kind == "adapter" and s.layer is None and s.module == "embed" for s in self.trainable
        )
        if self.grad_from is not None:
            return self.grad_from, into or self.grad_from > 0
        if into:
            return 0, True
        blocks = [s.layer for s in self.trainable if s.layer is not None]
        blocks += [a.layer for a in self.adapters]
        return (min(blocks) if blocks else None), False

    def _block_saved(self, layer: int, flow_in: bool = True) -> float:
        """Bytes per token that autograd keeps for one block's backward. A tensor is kept when
        a trainable weight needs it, or when gradients must pass through the operation that
        keeps it: from the block's input if ``flow_in``, else from the first module of the
        block that trains (stages: norm 0, q/k/v 1, o 3, second norm 4, gate/up 5, down 7)."""
        sh, w = self.shape, self.work
        h, i = sh.hidden, sh.intermediate
        q, kv = sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim
        r, a, f = w.resid_bytes, w.act_bytes, NORM_BYTES
        training = {s.module for s in self.trainable if s.layer == layer and s.kind != "adapter"}
        adapted = {ad.module for ad in self.adapters if ad.layer == layer}
        saves = {m for m in training if m in BLOCK_LINEARS}
        saves |= {ad.module for ad in self.adapters if ad.layer == layer and ad.saves_input}
        entry = min((STAGE.get(m, 0) for m in training | adapted), default=99)

        def live(stage: int) -> bool:  # do gradients reach the outputs of this stage?
            return flow_in or entry <= stage

        if self._masked():  # with an explicit mask, k and v are repeated to every query head
            kv = q
        n = h * f if flow_in else 0.0  # the block input (kept by the first norm)
        n += h * r if "input_layernorm" in training else 0  # normalised x for the norm weight
        n += h * r if saves & {"q_proj", "k_proj", "v_proj", "self_attn"} else 0  # attention input
        if live(1):
            n += (q + 2 * kv) * a  # rotated q, k and v, kept by attention
            n += q * a + sh.heads * 4  # attention output (also o_proj's input), log-sum-exp
            if sh.qk_norm:  # q/k normed per head: their inputs are kept
                n += (q + kv) * a
            if w.attention == "eager":
                n += 2 * sh.heads * w.seq * a  # attention weights and their softmax
        if live(3):
            n += h * f  # residual after attention (kept by the second norm)
            if sh.norms_per_layer == 4:
                n += 2 * h * f  # Gemma: the o_proj output (normed) and the MLP input
        n += h * r if "post_attention_layernorm" in training else 0
        n += h * r if saves & {"gate_proj", "up_proj", "mlp"} else 0  # MLP input
        if live(5):
            n += 3 * i * a  # gate, act(gate), up: kept by the activation and the product
            if sh.norms_per_layer == 4:
                n += h * f  # Gemma: the MLP output (normed)
        n += i * a if "down_proj" in saves else 0  # the product, down_proj's input
        if w.weights == "int8" and live(1):
            # LLM.int8's matmul keeps its input for backward whenever gradients pass through
            # it: the attention and MLP inputs where nothing else keeps them, and the product
            n += h * a if not saves & {"q_proj", "k_proj", "v_proj", "self_attn"} else 0
            n += h * a if not saves & {"gate_proj", "up_proj", "mlp"} else 0
            n += i * a if "down_proj" not in saves else 0
        for ad in self.adapters:
            if ad.layer == layer:
                n += ad.act_per_token * a
        return n

    def _masked(self) -> bool:
        return self.work.padded or self.needs_mask

    def _block_forward_peak(self) -> float:
        """Bytes per token alive inside one block's forward when nothing is kept
        (inference, zeroth-order): the widest moment of the MLP plus the residual stream."""
        sh, a, r = self.shape, self.work.act_bytes, self.work.resid_bytes
        return 3 * sh.intermediate * a + 3 * sh.hidden * r

    def _backward_transient(self) -> float:
        """Bytes per token alive on top of the kept activations while a block's backward runs:
        the gradients of its activations (MLP, attention's q/k/v/output) and what the
        allocator holds between them. About 10 (I + H) values per token, measured with an RSS
        sampler around backward on CPU (SmolLM2-135M, torch 2.13: 79-96 KB per token)."""
        sh = self.shape
        return 10 * (sh.intermediate + sh.hidden) * self.work.act_bytes

    def head_trains(self) -> bool:
        return any(
            s.kind == "head" or (s.kind == "embedding" and self.shape.tied) for s in self.trainable
        )

    def flops_per_token(self) -> float:
        """Model FLOPs per training token (multiply-add = 2). A weight matrix W costs 2 x its
        size per token in the forward (x W), 2 more in backward for the input gradient
        (dy W^T, wherever gradients must flow further down) and 2 more for its weight gradient
        (x^T dy), which only a trainable W needs: 6 per trainable weight, 4 per frozen weight
        that gradients pass through (LoRA's base: ~4 x params, not 6), 2 per weight below the
        lowest trainable block (forward only). Adapter matrices on block linears (LoRA's A and
        B, S2FT's deltas) are trainable matrices of their own: 6 each. Attention: QK^T and AV,
        2 x 2 x seq x q per block halved by the causal mask, twice that in backward. The head
        takes its input gradient (the loss's gradient enters there); a recomputed forward under
        checkpointing adds one forward of every block backward passes through. Zeroth-order:
        forwards of the doubled batch only."""
        sh, w = self.shape, self.work
        q = sh.heads * sh.head_dim
        seq = w.seq + self.extra_tokens
        block = sh.layer_params - sh.norms_per_layer * sh.hidden
        head = sh.vocab * sh.hidden
        attn = 2 * seq * q  # QK^T and AV: 2 x 2 x seq x q, halved by the causal mask
        adapters = sum(s.numel for s in self.new if s.module in BLOCK_LINEARS and len(s.shape) == 2)
        fwd = 2 * block * sh.layers + 2 * head + attn * sh.layers + 2 * adapters
        if not self.graph:
            return fwd * self.batch_factor
        start, _ = self._grad_from()
        n = 0 if start is None else sh.layers - start
        bwd = (2 * block + 2 * attn) * n + 2 * head + 2 * adapters  # gradients of the inputs
        bwd += sum(2 * s.numel for s in self.trainable if len(s.shape) == 2)  # of the weights
        recompute = (2 * block + attn) * n if w.checkpointing else 0
        return fwd + bwd + recompute

    def breakdown(self, names: tuple[str, str, str] = ("", "", "")) -> Breakdown:
        """Every term of the plan: what lives throughout, then each phase's own."""
        w = self.work
        terms = self._resident_terms()
        tokens = w.tokens + w.batch * self.extra_tokens
        # padding (or a prefix) makes attention take an fp32 additive mask (B x T x T_kv),
        # which every block's attention keeps its own copy of
        seq = w.seq + self.extra_tokens
        t_kv = seq + (self.prefix_tokens if self.needs_mask else 0)
        mask = w.batch * seq * t_kv * 4.0 if self._masked() else 0.0
        if self.graph:
            terms += self._backward_terms(tokens, mask)
            terms += self._loss_and_gradient_terms(tokens)
        else:
            terms += self._forward_only_terms(tokens * self.batch_factor, mask)
        terms += self.extra
        if w.sharding == "fsdp":
            terms = self._sharded(terms)
        if self.quantised:
            # the quantised kernels dequantise a whole weight before each product
            widest = max(s.numel for s in self.linears())
            phase = "backward" if self.graph else "forward"
            terms.append(
                Term("dequantised layer", widest * w.param_bytes, phase, "one linear's weight")
            )
        kept, allocator = self._allocator_terms(terms)
        terms += kept
        notes = [*self.notes, *allocator]
        if w.sharding == "fsdp":
            notes.append(f"one of {w.processes} processes under train.sharding: fsdp")
        return Breakdown(
            model=names[0],
            params=names[1],
            optimizer=names[2],
            work=w,
            terms=terms,
            trainable_params=sum(s.numel for s in self.trainable),
            total_params=self.shape.total_params,
            notes=notes,
            flops_per_token=self.flops_per_token(),
        )

    def _sharded(self, terms: list[Term]) -> list[Term]:
        """One process of ``processes`` under FSDP2 (sharding.py: a unit per decoder block, the
        rest of the model the root unit): it keeps 1/N of the weights, adapters, optimizer
        state and the gradients that last until the step; to compute it gathers the root unit
        whole for the step's forward and backward, and one block at a time plus the next one
        (FSDP prefetches it); a block's gradients exist whole until their reduce-scatter."""
        n = max(self.work.processes, 1)
        shared = {"weights", "adapters", "reference copy", "optimizer state"}
        out = []
        for t in terms:
            # the optimizer's step works on this process's shards (its temporaries too)
            per_shard = t.phase == "step" and t.name in ("gradients", "temporaries")
            if t.name in shared or per_shard:
                t = Term(t.name, t.bytes / n, t.phase, f"{t.note}; 1/{n} on each process")
            out.append(t)
        if n == 1:
            return out
        if self.work.device == "cpu":
            # every process loads the whole model, then shards it (the load is in host memory
            # on a GPU machine, where fully_shard moves one unit at a time to the device)
            whole = sum(t.bytes for t in terms if t.name in ("weights", "adapters"))
            out.append(Term("whole model at load", whole * (1 - 1 / n), "load", "before sharding"))
        tensors = [*self.base, *self.new]
        root = sum(s.nbytes for s in tensors if s.layer is None)
        blocks = [sum(s.nbytes for s in tensors if s.layer == i) for i in range(self.shape.layers)]
        biggest = max(blocks, default=0.0)
        gathered = root * (1 - 1 / n) + min(2, len(blocks)) * biggest * (1 - 1 / n)
        out.append(
            Term("gathered weights", gathered, "backward", "root unit, one block and the next")
        )
        if self.grads == "all":
            trained = [*self.trainable, *self.new]
            grads = [sum(s.nbytes for s in trained if s.layer == i) for i in range(len(blocks))]
            root_grad = sum(s.nbytes for s in trained if s.layer is None)
            # a block's gradients whole, and the root's (a trained head's are priced whole by
            # the loss terms already); the reduce-scatter copies the largest unit's into its
            # input buffer and writes 1/N of it out
            own = max(grads, default=0.0) + (0.0 if self.head_trains() else root_grad)
            buffer = max(*grads, root_grad) * (1 + 1 / n) if grads else 0.0
            out.append(
                Term(
                    "unsharded gradients",
                    own + buffer,
                    "backward",
                    "a unit's, and the reduce-scatter's buffers",
                )
            )
        return out

    def _allocator_terms(self, terms: list[Term]) -> tuple[list[Term], list[str]]:
        """CPU without train.trim_memory: what glibc keeps resident beyond live memory.

        The other terms price live memory, which the resident set follows when
        train.trim_memory hands freed heap pages back after every block. Without it, pages of
        temporaries freed between the activations kept for backward stay resident (the next
        allocations interleave with them, so the heap cannot shrink): the excess lies between
        nothing and the activations themselves (only pages those allocations once touched can
        be kept). The plan prices the middle of that range, the estimate whose worst ratio to
        either end is smallest, and names the range. Measured on SmolLM2 without trimming
        (benchmarks/results/plan_accuracy_cpu.md): the excess was 0.35-0.87 of the
        activations (full AdamW 0.45 GB of 1.28, LoRA 0.78 of 0.90, the demo recipe 0.80 of
        1.48, MeZO 0.05)."""
        w = self.work
        if w.device != "cpu":
            return [], []
        act = [t for t in terms if t.name in ("activations", "recompute")]
        acts = sum(t.bytes for t in act)
        if w.trim_memory or not acts:
            note = "peak assumes train.trim_memory=true (CPU: freed heap pages given back)"
            return [], [note]
        kept = Term(
            "allocator retention",
            acts / 2,
            act[0].phase,
            "glibc keeps freed pages (train.trim_memory off): half the activations",
        )
        live = Breakdown("", "", "", w, terms, 0, 0).peak
        note = (
            "peak assumes train.trim_memory=false (CPU), this run's setting: resident memory "
            f"lies between {live / GB:.2f} and {(live + acts) / GB:.2f} GB (glibc keeps freed "
            f"pages); train.trim_memory=true gives {live / GB:.2f} GB (the demo recipe: 16% "
            "more time per step)"
        )
        return [kept], [note]

    def _resident_terms(self) -> list[Term]:
        """Runtime, base weights and new (adapter) weights: alive for the whole run."""
        sh, w = self.shape, self.work
        runtime = w.runtime if w.runtime is not None else RUNTIME_BYTES[w.device]
        terms = [Term("runtime", runtime, "always", f"{w.device} framework")]
        weights = sum(s.nbytes for s in self.base)
        note = f"{sh.total_params / 1e9:.2f}B parameters at {w.weights}"
        terms.append(Term("weights", weights, "always", note))
        if w.reference == "copy":
            terms.append(Term("reference copy", weights, "always", "objective.reference: copy"))
        if self.new:
            n_new = sum(s.numel for s in self.new)
            terms.append(
                Term("adapters", sum(s.nbytes for s in self.new), "always", f"{n_new:,} params")
            )
        return terms

    def _backward_terms(self, tokens: int, mask: float) -> list[Term]:
        """What autograd keeps for backward: block activations (or checkpoints and one
        recomputed block), the final norm's and head's inputs, one block's backward transients."""
        sh, w = self.shape, self.work
        start, into = self._grad_from()
        n_blocks = 0 if start is None else sh.layers - start  # None: head / final norm only
        blocks = range(sh.layers - n_blocks, sh.layers)
        saved = {b: self._block_saved(b, into or b > blocks[0]) for b in blocks}
        if w.checkpointing:
            kept = n_blocks * sh.hidden * w.resid_bytes * tokens
            worst = max(saved.values(), default=0.0)
            recompute = worst * tokens if n_blocks else 0.0
        else:
            kept = sum(saved.values()) * tokens
            recompute = 0.0
        # the final norm keeps its input (and its normalised input when its weight
        # trains); a trainable head's checkpointed chunks keep their rows
        final = sh.hidden * NORM_BYTES * tokens if n_blocks or self.trainable else 0.0
        if any(s.kind == "norm" and s.layer is None for s in self.trainable):
            final += sh.hidden * w.resid_bytes * tokens
        if self.head_trains():
            final += sh.hidden * w.act_bytes * tokens
        what = f"{n_blocks} blocks{' (checkpointed)' if w.checkpointing else ''}"
        terms = [Term("activations", kept + final + mask * n_blocks, "backward", what)]
        if recompute:
            terms.append(Term("recompute", recompute, "backward", "one block rebuilt"))
        if n_blocks:
            transient = self._backward_transient() * tokens
            terms.append(
                Term("backward transients", transient, "backward", "gradients through one block")
            )
        return terms

    def _loss_and_gradient_terms(self, tokens: int) -> list[Term]:
        """The chunked loss's buffer, autocast's 16-bit weight copies and the gradients."""
        sh, w = self.shape, self.work
        chunk = min(w.loss_chunk or tokens, tokens)
        v = sh.vocab
        if self.head_trains() or w.pairs:
            # logits recomputed in backward: logits, log-softmax, their gradients (fp32)
            loss = 4 * chunk * v * 4.0
            what = "logits recomputed per chunk (" + (
                "head trains)" if self.head_trains() else "per-sequence log-probs)"
            )
        else:
            # one fp32 logits buffer per chunk, the softmax formed in place; the input
            # gradient (tokens x hidden) is kept for backward
            loss = chunk * v * 4.0 + (chunk * v * 2 if w.param_bytes < 4 else 0)
            loss += tokens * sh.hidden * w.act_bytes
            what = "one chunk of fp32 logits (frozen head)"
        if not w.loss_chunk:
            what += ", not chunked"
        terms = [Term("loss buffer", loss, "backward", what)]
        if w.mixed_precision != "no" and w.param_bytes == 4:
            cast = sum(s.numel for s in self.trainable if s.kind != "adapter") * 2.0
            terms.append(
                Term("autocast copies", cast, "backward", "16-bit copies of trainable weights")
            )
        if self.grads == "all":
            terms.append(
                Term(
                    "gradients",
                    sum(s.nbytes for s in self.trainable),
                    "step",
                    "every trainable tensor",
                )
            )
            if self.head_trains():
                # allocated when the loss backward starts; every later chunk's gradient of
                # the head exists once more before it is added
                head = [s for s in self.trainable if s.kind in ("head", "embedding")]
                head_grad = 2 * max(s.nbytes for s in head)
                if head_grad:
                    terms.append(
                        Term("gradients", head_grad, "backward", "output head's, and one chunk's")
                    )
        elif self.grads == "per-tensor":
            biggest = max((s.nbytes for s in self.trainable), default=0.0)
            terms.append(
                Term("gradients", biggest, "backward", "one tensor at a time (layer-wise)")
            )
        return terms

    def _forward_only_terms(self, n_tok: int, mask: float) -> list[Term]:
        """No graph (zeroth-order): one block's forward at a time and one chunk of logits."""
        sh, w = self.shape, self.work
        act = self._block_forward_peak() * n_tok
        chunk = min(w.loss_chunk or n_tok, n_tok)
        kept = sh.hidden * w.resid_bytes * n_tok * 2  # residual stream in and out
        terms = [
            Term(
                "activations",
                act + kept + mask * self.batch_factor,
                "forward",
                "one block at a time (no graph)",
            )
        ]
        # Logits and log-softmax of one chunk. A perturbed head runs in vocabulary blocks
        # instead, but measured peaks (Gemma-3's 262k vocabulary: ~0.5 GB above the
        # decoder's) match this term better than the blocks' own size; kept as measured.
        loss = 2 * chunk * sh.vocab * 4.0
        terms.append(Term("loss buffer", loss, "forward", "one chunk of logits"))
        return terms


def inference(shape: ModelShape, work: Workload, model_name: str = "") -> Breakdown:
    """Forward passes only, nothing trains: the footprint zeroth-order methods are compared to."""
    p = Plan(shape, work)
    p.freeze_all()
    p.graph, p.grads = False, "none"
    return p.breakdown((model_name, "none", "inference"))


def method(axis: str, spec: Any) -> Any:
    """A method instance from a name or a ``{name: ..., field: ...}`` mapping (validated)."""
    from .. import config, registry

    return registry.build(axis, config._method(axis, spec, "full" if axis == "params" else "adamw"))


def device_kind(device: str = "auto") -> Literal["cpu", "cuda"]:
    """What the planner prices for a ``model.device``: 'auto' is CUDA when present."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def workload_of(cfg: Any, **fields: Any) -> Workload:
    """The workload a recipe (:class:`~slimtune.config.RunConfig`) describes, on the device it
    would run on; ``fields`` override any :class:`Workload` field."""
    tc = cfg.train
    described = dict(
        seq=cfg.data.max_seq_len,
        batch=tc.batch_size,
        weights=cfg.base.name,
        compute=getattr(cfg.base, "compute_dtype", "bf16"),
        double_quant=getattr(cfg.base, "double_quant", True),
        mixed_precision=tc.mixed_precision,
        checkpointing=tc.gradient_checkpointing,
        loss_chunk=tc.loss_chunk_tokens,
        attention="eager" if cfg.model.attn_implementation == "eager" else "sdpa",
        device=device_kind(cfg.model.device),
        grad_accum=tc.grad_accum,
        trim_memory=tc.trim_memory,
        padded=not cfg.data.packing,
        sharding=tc.sharding,
    )
    from .. import registry

    if registry.get("objective", cfg.objective.name).sequences_per_example == 2:  # pairs
        reference = getattr(cfg.objective, "reference", "")
        described |= {"batch": 2 * tc.batch_size, "pairs": True, "reference": reference}
    return Workload(**{**described, **fields})


def plan(
    shape: ModelShape,
    params: Any,
    optimizer: Any,
    work: Workload,
    model_name: str = "",
) -> Breakdown:
    """Price ``params`` x ``optimizer`` (method instances) on ``shape`` under ``work``."""
    p = Plan(shape, work)
    for method in (params, optimizer):
        hook = getattr(method, "memory", None)
        if hook is None:
            raise SlimtuneError(f"{method.name}: describes no memory terms (memory hook)")
        hook(p)
    if not p.trainable and p.graph:
        raise SlimtuneError(f"params: {params.name} leaves nothing to train")
    return p.breakdown((model_name, params.name, optimizer.name))
