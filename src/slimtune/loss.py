"""Causal-LM cross-entropy that never holds full-vocabulary logits for the whole batch.

The model runs with ``logits_to_keep`` set to project no position (``no_logits``) and
``output_hidden_states=True``; the final hidden states of the positions that have a target are
projected through the output head a chunk at a time, each chunk under activation checkpointing,
so at most ``chunk`` x vocab logits exist at once, in forward and in backward. For SmolLM2 (49k
vocabulary) at batch 4 x 256 this replaces ~600 MB of fp32 logits, their log-softmax and their
gradient by ~100 MB for one chunk.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .data import IGNORE

log = logging.getLogger(__name__)


@dataclass
class Head:
    """How to turn final hidden states into logits for one model."""

    module: nn.Module | None  # None: the model's own logits are used (fallback)
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.module(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _innermost(model: nn.Module) -> nn.Module:
    """Below DDP/PEFT wrappers: the transformers model whose forward signature we inspect."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / FSDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        else:
            return model


@torch.no_grad()
def find_head(model: nn.Module) -> Head:
    """Resolve the output head and check once, on a 3-token input, that head(final hidden state)
    reproduces the model's own logits; if not (an unusual head), fall back to the model's logits."""
    inner = _innermost(model)
    if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        log.warning("%s has no logits_to_keep: using full logits", type(inner).__name__)
        return Head(None)
    head = Head(
        inner.get_output_embeddings(), getattr(inner.config, "final_logit_softcapping", None)
    )
    was_training = model.training
    model.eval()
    try:
        device = next(inner.parameters()).device
        x = torch.tensor([[1, 2, 3]], device=device) % inner.config.vocab_size
        out = model(input_ids=x, output_hidden_states=True, use_cache=False)
        ours = head.logits(out.hidden_states[-1])
        ok = torch.allclose(ours, out.logits.float(), atol=1e-3, rtol=1e-3)
    finally:
        model.train(was_training)
    if not ok:
        log.warning("output head of %s is not a plain projection: using full logits", type(inner))
        return Head(None)
    return head


class _FrozenHeadCE(torch.autograd.Function):
    """Cross-entropy through a frozen linear head, its input gradient computed in forward.

    d loss / d logits = softmax - onehot is formed while the chunk's logits exist, multiplied
    into the gradient of the hidden rows (chunk x hidden) and only that is kept for backward:
    no logits are stored and none are recomputed (LoRA and other methods with a frozen head).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap):  # type: ignore[override]
        # One chunk x vocab buffer, every later step in place (torch.logsumexp would allocate
        # two more of the same size on CPU).
        logits = (hidden @ weight.t()).float()
        capped = None
        if softcap:
            capped = torch.tanh(logits.div_(softcap))
            logits.copy_(capped).mul_(softcap)
        rows = torch.arange(len(targets), device=targets.device)
        picked = logits[rows, targets]
        top = logits.amax(dim=-1)
        exp = logits.sub_(top[:, None]).exp_()
        total = exp.sum(dim=-1)
        loss = (top + total.log() - picked).sum()
        if ctx.needs_input_grad[0]:
            grad = exp.div_(total[:, None])  # softmax, in place of the logits
            grad[rows, targets] -= 1
            if capped is not None:
                grad.mul_(1 - capped.square())
            ctx.save_for_backward((grad.to(weight.dtype) @ weight).to(hidden.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_out.to(grad_hidden.dtype), None, None, None


def _frozen_linear(head: Head) -> torch.Tensor | None:
    """The weight of a frozen, bias-free nn.Linear head, else None."""
    m = head.module
    if type(m) is nn.Linear and m.bias is None and not m.weight.requires_grad:
        return m.weight
    return None


def _chunk_ce(head: Head, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of hidden-state rows (or, without a head module, of logit rows)."""
    logits = rows.float() if head.module is None else head.logits(rows)
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_ce(
    head: Head,
    rows: torch.Tensor,
    targets: torch.Tensor,
    chunk: int | None,
    total: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of hidden-state rows through ``head`` (or, without a head module,
    of logit rows), ``chunk`` rows at a time (None: all at once), added to ``total`` (default an
    fp32 zero). No activation checkpointing: for forwards that build no graph (evaluation,
    zeroth-order steps)."""
    if total is None:
        total = rows.new_zeros((), dtype=torch.float32)
    step = chunk or max(len(targets), 1)
    for i in range(0, len(targets), step):
        total = total + _chunk_ce(head, rows[i : i + step], targets[i : i + step])
    return total


def no_logits(device: torch.device) -> torch.Tensor:
    """A ``logits_to_keep`` that makes transformers project no position through its head.

    Not ``logits_to_keep=1``: that slices the last position as a strided [B, 1, H] view, and with
    autograd on torch's matmul does not fold a view it would have to copy; it runs a batched
    matmul over the head weight expanded B times, which the CPU kernel makes contiguous at 16
    bits: B copies of the output head (Gemma-3-270M at batch 4 in bf16: 1.34 GB) at the end of
    every training forward. An empty index gives a contiguous [B, 0, H] and no work."""
    return torch.empty(0, dtype=torch.long, device=device)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a forward of ``batch`` passes to the model. A packed batch (``position_ids`` that
    restart at each example) goes without an attention mask: transformers then attends
    block-diagonally, one example to itself (varlen flash attention, or a block mask for SDPA
    and eager attention), and RoPE sees each example's own positions."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _target_rows(
    model: nn.Module, head: Head, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """One forward: the rows to project (final hidden states, or without a head module the
    model's logits) of the positions that have a target, the targets, the (rows x positions)
    mask of those positions, and whether the rows are hidden states under autograd."""
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    targets = labels[keep]
    if head.module is None:  # fallback: the model's own logits, still reduced chunk by chunk
        rows = model(**model_inputs(batch)).logits
        # [:, -T:]: prompt tuning prepends virtual tokens to the sequence
        return rows[:, -labels.shape[1] - 1 : -1][keep], targets, keep, False
    out = model(
        **model_inputs(batch),
        output_hidden_states=True,
        logits_to_keep=no_logits(batch["input_ids"].device),
        use_cache=False,
    )
    hidden = out.hidden_states[-1][:, -labels.shape[1] - 1 : -1]  # drop virtual tokens
    return hidden[keep], targets, keep, torch.is_grad_enabled()


def causal_lm_loss(
    model: nn.Module, head: Head, batch: dict[str, torch.Tensor], chunk: int = 256
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens, and the number of target tokens."""
    rows, targets, _, recompute = _target_rows(model, head, batch)
    n = len(targets)
    total = rows.sum() * 0.0  # keeps the graph connected when a batch has no target
    if not recompute:
        return chunked_ce(head, rows, targets, chunk, total), n
    frozen = _frozen_linear(head)
    for i in range(0, n, chunk):
        r, t = rows[i : i + chunk], targets[i : i + chunk]
        if frozen is not None:
            total = total + _FrozenHeadCE.apply(r, frozen, t, head.softcap)
        else:
            # Recompute this chunk's logits in backward instead of storing them.
            total = total + checkpoint(_chunk_ce, head, r, t, use_reentrant=False)
    return total, n


def _chunk_logps(head: Head, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target under its row's logits (fp32)."""
    logits = rows.float() if head.module is None else head.logits(rows)
    return -F.cross_entropy(logits, targets, reduction="none")


def token_logps(
    model: nn.Module, head: Head, batch: dict[str, torch.Tensor], chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probability of every target token of ``batch`` (fp32, row by row in order, with a
    graph when gradients are on) and the (rows x positions) mask saying where they are. The head
    runs ``chunk`` targets at a time and, under autograd, recomputes each chunk's logits in
    backward: one chunk x vocab buffer at once, as for the causal-LM loss (a preference loss
    weighs every sequence differently, so the frozen-head shortcut, which forms one gradient for
    the plain sum, does not apply)."""
    rows, targets, keep, recompute = _target_rows(model, head, batch)
    parts = [rows.sum(dim=-1)[:0].float()]  # keeps the graph connected without targets
    for i in range(0, len(targets), chunk):
        r, t = rows[i : i + chunk], targets[i : i + chunk]
        if recompute:
            parts.append(checkpoint(_chunk_logps, head, r, t, use_reentrant=False))
        else:
            parts.append(_chunk_logps(head, r, t))
    return torch.cat(parts), keep


def sequence_logps(
    model: nn.Module, head: Head, batch: dict[str, torch.Tensor], chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``batch``: the summed log-probability of its target tokens and their count
    (see ``token_logps``)."""
    per_token, keep = token_logps(model, head, batch, chunk)
    owner = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
    logps = per_token.new_zeros(keep.shape[0]).index_add(0, owner, per_token)
    return logps, keep.sum(dim=1)
