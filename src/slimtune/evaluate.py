"""Held-out evaluation: loss/perplexity on targets, choice accuracy by log-likelihood, samples.

With ``progress`` one tqdm bar covers the whole evaluation, counted in examples: the loss pass
over every example, the choice scoring of those that carry choices, then each generated sample.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .config import EvalConfig
from .data import IGNORE, Example, collate
from .loss import Head, causal_lm_loss


@dataclass
class _Row:
    ids: list[int]
    groups: list[list[tuple[int, int]]]  # per choice: (position predicting it, token)
    last: bool = True  # the last row of its example (for progress, counted in examples)


def _choice_rows(ex: Example) -> list[_Row]:
    """Single-token choices share one forward of the prompt; longer ones get a row each."""
    prompt = ex.prompt_ids
    if all(len(c) == 1 for c in ex.choice_ids):
        return [_Row(prompt, [[(len(prompt) - 1, c[0])] for c in ex.choice_ids])]
    rows = []
    for k, c in enumerate(ex.choice_ids):
        ids = prompt + c
        groups = [[(len(prompt) - 1 + i, t) for i, t in enumerate(c)]]
        rows.append(_Row(ids, groups, last=k == len(ex.choice_ids) - 1))
    return rows


@torch.no_grad()
def _score(
    model: nn.Module,
    head: Head,
    rows: list[_Row],
    pad_id: int,
    bs: int,
    bar: tqdm | None = None,
) -> list[float]:
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
        if bar is not None:
            bar.update(sum(r.last for r in chunk))
    return scores


def choice_predictions(
    model: nn.Module,
    head: Head,
    examples: list[Example],
    pad_id: int,
    bs: int,
    bar: tqdm | None = None,
) -> list[int]:
    """Index of the most likely choice of each example (all must carry ``choice_ids``)."""
    rows, owners = [], []
    for k, ex in enumerate(examples):
        for row in _choice_rows(ex):
            rows.append(row)
            owners.extend([k] * len(row.groups))
    scores = _score(model, head, rows, pad_id, bs, bar)
    per_example: list[list[float]] = [[] for _ in examples]
    for k, s in zip(owners, scores):
        per_example[k].append(s)
    return [max(range(len(s)), key=s.__getitem__) for s in per_example]


def choice_accuracy(
    model: nn.Module,
    head: Head,
    examples: list[Example],
    pad_id: int,
    bs: int,
    bar: tqdm | None = None,
) -> float:
    predicted = choice_predictions(model, head, examples, pad_id, bs, bar)
    return sum(int(p == ex.answer) for p, ex in zip(predicted, examples)) / len(examples)


@torch.no_grad()
def target_loss(
    model: nn.Module,
    head: Head,
    examples: list[Example],
    pad_id: int,
    bs: int,
    chunk: int,
    bar: tqdm | None = None,
) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), bs):
        part = examples[i : i + bs]
        batch = {k: v.to(device) for k, v in collate(part, pad_id).items()}
        ce, n = causal_lm_loss(model, head, batch, chunk)
        total, count = total + float(ce), count + n
        if bar is not None:
            bar.update(len(part))
    return total / max(count, 1)


PLAIN_PROMPT_TOKENS = 16  # plain text has no prompt: a sample continues its first tokens


def prompt_and_gold(ex: Example, max_new: int) -> tuple[list[int], list[int]]:
    """The tokens a sample prompts with, and the reference it should be compared with.

    Prompted formats (classification, alpaca, preference): the prompt, and the right choice or
    the response. Conversations (no ``prompt_ids``; targets are the assistant turns): everything
    before the last assistant turn (ending in the generation prompt), and that turn. Plain text:
    its first tokens, and the next ``max_new`` tokens of the text.
    """
    if ex.prompt_ids:
        if ex.choice_ids and ex.answer is not None:
            return ex.prompt_ids, ex.choice_ids[ex.answer]
        n = len(ex.prompt_ids)  # data._truncate keeps prompt_ids aligned with the labels
        return ex.prompt_ids, [t for t in ex.labels[n:] if t != IGNORE]
    targets = [i for i, t in enumerate(ex.labels) if t != IGNORE]
    if targets:
        end = targets[-1] + 1
        start = end - 1
        while start > 0 and ex.labels[start - 1] != IGNORE:
            start -= 1
        if start > 0:
            return ex.input_ids[:start], ex.input_ids[start:end]
    k = max(1, min(PLAIN_PROMPT_TOKENS, len(ex.input_ids) - 1))
    return ex.input_ids[:k], ex.input_ids[k : k + max_new]


def _is_prompt_learning(model: nn.Module) -> bool:
    """A peft prompt-tuning / prefix-tuning model (virtual tokens or a prefilled KV cache)."""
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


def _stop_ids(model: nn.Module, tok: PreTrainedTokenizerBase) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return ids


@torch.no_grad()
def _greedy(model: nn.Module, ids: torch.Tensor, max_new: int, stop: set[int]) -> list[int]:
    """Greedy decoding by whole forwards without a KV cache, for peft prompt-learning models.

    Their ``generate`` (peft 0.21.2) still hands the prompt to the base model as
    ``past_key_values``, which transformers 5 renamed ``cache``: prefix tuning's prefix is then
    dropped (the samples were the base model's) and prompt tuning's virtual tokens are inserted
    again at every step. Their ``forward`` is right, so decode with it; a few samples of a few
    tokens make the quadratic cost irrelevant.
    """
    new: list[int] = []
    for _ in range(max_new):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        token = int(logits[0, -1].argmax())
        new.append(token)
        if token in stop:
            break
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return new


@torch.no_grad()
def samples(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    examples: list[Example],
    n: int,
    max_new: int,
    bar: tqdm | None = None,
    predicted: list[int | None] | None = None,
) -> list[dict[str, Any]]:
    """Greedy completions of the first ``n`` examples, each with its prompt and gold answer.

    ``predicted``: per example, the index of the choice the model scores highest (None for an
    example without choices); such samples also carry that ``choice`` and whether it is
    ``correct``.
    """
    device = next(model.parameters()).device
    out = []
    for k, ex in enumerate(examples[:n]):
        prompt, gold = prompt_and_gold(ex, max_new)
        ids = torch.tensor([prompt], device=device)
        if _is_prompt_learning(model):
            new = _greedy(model, ids, max_new, _stop_ids(model, tok))
        else:
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            new = gen[0, len(prompt) :].tolist()
        sample: dict[str, Any] = {
            "prompt": tok.decode(prompt, skip_special_tokens=False),
            "completion": tok.decode(new, skip_special_tokens=True),
            "gold": tok.decode(gold, skip_special_tokens=True),
        }
        choice = predicted[k] if predicted is not None and k < len(predicted) else None
        if choice is not None and ex.choice_ids:
            sample["choice"] = tok.decode(ex.choice_ids[choice], skip_special_tokens=True)
            sample["correct"] = choice == ex.answer
        out.append(sample)
        if bar is not None:
            bar.update(1)
    return out


def _is_main_process() -> bool:
    """Under ``accelerate launch``/``torchrun`` only global rank 0 draws progress."""
    return int(os.environ.get("RANK", "0")) == 0


def evaluate(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    head: Head,
    examples: list[Example],
    cfg: EvalConfig,
    chunk: int = 256,
    *,
    progress: bool = False,
    desc: str = "eval",
) -> dict:
    """Metrics on ``examples``: loss and perplexity always; accuracy when they carry choices.

    ``progress``: draw one tqdm bar (on stderr, main process only) titled ``desc``.
    """
    if cfg.max_examples is not None:
        examples = examples[: cfg.max_examples]
    if not examples:
        return {}
    scored = [i for i, ex in enumerate(examples) if ex.choice_ids]
    n_samples = min(cfg.generate, len(examples)) if cfg.generate else 0
    bar = tqdm(
        total=len(examples) + len(scored) + n_samples,
        desc=desc,
        unit="ex",
        postfix="loss",
        leave=None,  # stays on screen unless drawn below the train bar (evals during training)
        disable=not (progress and _is_main_process()),
        dynamic_ncols=True,
    )
    was_training = model.training
    model.eval()
    try:
        pad = tok.pad_token_id
        loss = target_loss(model, head, examples, pad, cfg.batch_size, chunk, bar)
        metrics: dict = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        predicted: list[int | None] = [None] * len(examples)
        if scored:
            bar.set_postfix_str("choices", refresh=False)
            picks = choice_predictions(
                model, head, [examples[i] for i in scored], pad, cfg.batch_size, bar
            )
            for i, p in zip(scored, picks):
                predicted[i] = p
            right = sum(int(predicted[i] == examples[i].answer) for i in scored)
            metrics["accuracy"] = right / len(scored)
        if n_samples:
            bar.set_postfix_str("generate", refresh=False)
            metrics["samples"] = samples(
                model, tok, examples, n_samples, cfg.max_new_tokens, bar, predicted
            )
    finally:
        bar.close()
        model.train(was_training)
    return metrics
