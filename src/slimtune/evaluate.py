"""Held-out evaluation: loss/perplexity on targets, choice accuracy by log-likelihood, samples."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .config import EvalConfig
from .data import Example, collate
from .loss import Head, causal_lm_loss


@dataclass
class _Row:
    ids: list[int]
    groups: list[list[tuple[int, int]]]  # per choice: (position predicting it, token)


def _choice_rows(ex: Example) -> list[_Row]:
    """Single-token choices share one forward of the prompt; longer ones get a row each."""
    prompt = ex.prompt_ids
    if all(len(c) == 1 for c in ex.choice_ids):
        return [_Row(prompt, [[(len(prompt) - 1, c[0])] for c in ex.choice_ids])]
    rows = []
    for c in ex.choice_ids:
        ids = prompt + c
        rows.append(_Row(ids, [[(len(prompt) - 1 + i, t) for i, t in enumerate(c)]]))
    return rows


@torch.no_grad()
def _score(model: nn.Module, head: Head, rows: list[_Row], pad_id: int, bs: int) -> list[float]:
    """Summed log-probability of each group of each row, in order."""
    device = next(model.parameters()).device
    scores: list[float] = []
    for i in range(0, len(rows), bs):
        chunk = rows[i : i + bs]
        batch = collate([Example(r.ids, r.ids) for r in chunk], pad_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        keep = {} if head.module is None else {"logits_to_keep": 1}
        out = model(
            input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False, **keep
        )
        length = ids.shape[1]  # [:, -length:]: prompt tuning prepends virtual tokens
        hidden = out.hidden_states[-1][:, -length:]
        for j, row in enumerate(chunk):
            positions = sorted({p for g in row.groups for p, _ in g})
            if head.module is None:
                logits = out.logits[:, -length:][j, positions].float()
            else:
                logits = head.logits(hidden[j, positions])
            logp = torch.log_softmax(logits, dim=-1)
            where = {p: k for k, p in enumerate(positions)}
            for g in row.groups:
                scores.append(sum(float(logp[where[p], t]) for p, t in g))
    return scores


def choice_accuracy(
    model: nn.Module, head: Head, examples: list[Example], pad_id: int, bs: int
) -> float:
    rows, owners = [], []
    for k, ex in enumerate(examples):
        for row in _choice_rows(ex):
            rows.append(row)
            owners.extend([k] * len(row.groups))
    scores = _score(model, head, rows, pad_id, bs)
    per_example: list[list[float]] = [[] for _ in examples]
    for k, s in zip(owners, scores):
        per_example[k].append(s)
    right = sum(
        int(max(range(len(s)), key=s.__getitem__) == ex.answer)
        for s, ex in zip(per_example, examples)
    )
    return right / len(examples)


@torch.no_grad()
def target_loss(
    model: nn.Module, head: Head, examples: list[Example], pad_id: int, bs: int, chunk: int
) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), bs):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + bs], pad_id).items()}
        ce, n = causal_lm_loss(model, head, batch, chunk)
        total, count = total + float(ce), count + n
    return total / max(count, 1)


@torch.no_grad()
def samples(
    model: nn.Module, tok: PreTrainedTokenizerBase, examples: list[Example], n: int, max_new: int
) -> list[dict[str, str]]:
    device = next(model.parameters()).device
    out = []
    for ex in examples[:n]:
        prompt = ex.prompt_ids or ex.input_ids[: min(16, len(ex.input_ids))]
        ids = torch.tensor([prompt], device=device)
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        out.append(
            {
                "prompt": tok.decode(prompt, skip_special_tokens=False),
                "completion": tok.decode(gen[0, len(prompt) :], skip_special_tokens=True),
            }
        )
    return out


def evaluate(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    head: Head,
    examples: list[Example],
    cfg: EvalConfig,
    chunk: int = 256,
) -> dict:
    """Metrics on ``examples``: loss and perplexity always; accuracy when they carry choices."""
    if cfg.max_examples is not None:
        examples = examples[: cfg.max_examples]
    if not examples:
        return {}
    was_training = model.training
    model.eval()
    try:
        loss = target_loss(model, head, examples, tok.pad_token_id, cfg.batch_size, chunk)
        metrics: dict = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        scored = [ex for ex in examples if ex.choice_ids]
        if scored:
            metrics["accuracy"] = choice_accuracy(
                model, head, scored, tok.pad_token_id, cfg.batch_size
            )
        if cfg.generate:
            metrics["samples"] = samples(model, tok, examples, cfg.generate, cfg.max_new_tokens)
    finally:
        model.train(was_training)
    return metrics
