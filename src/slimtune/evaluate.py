"""Held-out evaluation: loss/perplexity on targets, choice accuracy by log-likelihood, samples.

With ``progress`` one tqdm bar covers the whole evaluation, counted in examples: the loss pass
over every example, the choice scoring of those that carry choices, then each generated sample.
"""

from __future__ import annotations

import inspect
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .config import EvalConfig
from .data import IGNORE, Example, collate
from .loss import Head, _innermost, causal_lm_loss, no_logits


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
        keep = {} if head.module is None else {"logits_to_keep": no_logits(device)}
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


def _cache_kwarg(model: nn.Module) -> str | None:
    """The keyword that feeds a KV cache back into ``model`` (``cache`` in transformers 5,
    ``past_key_values`` before), or None where the shared-prompt scoring cannot be used: peft
    prompt learning (its virtual tokens / prefix already occupy the cache) or a forward that
    takes no cache."""
    if _is_prompt_learning(model):
        return None
    params = inspect.signature(_innermost(model).forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def _logprobs(head: Head, out: Any, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the vocabulary at (row, position) pairs of a forward's output."""
    if head.module is None:
        logits = out.logits[rows, cols].float()
    else:
        logits = head.logits(out.hidden_states[-1][rows, cols])
    return torch.log_softmax(logits, dim=-1)


def _padded(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of ``seqs`` padded on the left or the right to the longest."""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(seqs):
        where = slice(width - len(x), width) if left else slice(0, len(x))
        ids[i, where], mask[i, where] = torch.tensor(x, dtype=torch.long), 1
    return ids, mask


@torch.no_grad()
def _score_shared(
    model: nn.Module, head: Head, group: list[Example], pad_id: int, cache_kw: str
) -> list[list[float]] | None:
    """Choice scores of ``group`` from one forward of the prompts and one of all candidates.

    The prompts run left-padded (each ends at the last column, positions counted from its first
    real token) with a KV cache; the cache is then repeated once per candidate, and every
    candidate's tokens but its last run in one right-padded forward whose positions continue
    after its own prompt and whose mask covers that prompt. The first token of a candidate is
    predicted by the prompt's last position, token i > 0 by the candidate's position i - 1.
    None when the model returned no cache that can be repeated (the caller falls back).
    """
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in _padded([ex.prompt_ids for ex in group], pad_id, True))
    keep = {} if head.module is None else {"logits_to_keep": 1}
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        output_hidden_states=True,
        use_cache=True,
        **keep,
    )
    cache = getattr(out, cache_kw, None)
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None
    owner = [b for b, ex in enumerate(group) for _ in ex.choice_ids]
    cands = [c for ex in group for c in ex.choice_ids]
    last = torch.full((len(group),), ids.shape[1] - 1, device=device)
    first = _logprobs(head, out, torch.arange(len(group), device=device), last)
    terms = [[float(first[owner[r], c[0]])] for r, c in enumerate(cands)]
    if max(len(c) for c in cands) > 1:
        cache.batch_select_indices(torch.tensor(owner, device=device))
        tail, tail_mask = _padded([c[:-1] or [pad_id] for c in cands], pad_id, False)
        tail_mask[[r for r, c in enumerate(cands) if len(c) == 1]] = 0
        start = pos[owner, -1:] + 1  # each candidate continues after its own prompt
        out = model(
            input_ids=tail.to(device),
            attention_mask=torch.cat([mask[owner], tail_mask.to(device)], dim=1),
            position_ids=start + torch.arange(tail.shape[1], device=device),
            output_hidden_states=True,
            use_cache=True,
            **keep,
            **{cache_kw: cache},
        )
        rows = [r for r, c in enumerate(cands) for _ in c[1:]]
        cols = [i for c in cands for i in range(len(c) - 1)]
        at = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
        logp = _logprobs(head, out, *at)
        for k, (r, i) in enumerate(zip(rows, cols)):
            terms[r].append(float(logp[k, cands[r][i + 1]]))
    scores: list[list[float]] = [[] for _ in group]
    for b, t in zip(owner, terms):
        scores[b].append(sum(t))
    return scores


def choice_scores(
    model: nn.Module,
    head: Head,
    examples: list[Example],
    pad_id: int,
    bs: int,
    bar: tqdm | None = None,
) -> list[list[float]]:
    """Summed log-probability of each choice of each example (all must carry ``choice_ids``).

    Single-token choices: one forward of each prompt scores them all. Multi-token choices: one
    forward of ``bs`` prompts with a KV cache, then one of all their candidates on that cache
    (``_score_shared``); where no cache can be used, a row of prompt + choice per candidate.
    """
    cache_kw = _cache_kwarg(model)
    out: list[list[float] | None] = [None] * len(examples)
    multi = [i for i, ex in enumerate(examples) if any(len(c) > 1 for c in ex.choice_ids)]
    if cache_kw is not None:
        for g in range(0, len(multi), bs):
            part = multi[g : g + bs]
            got = _score_shared(model, head, [examples[i] for i in part], pad_id, cache_kw)
            if got is None:
                break  # the model returned no usable cache: rows for everything left
            for i, s in zip(part, got):
                out[i] = s
            if bar is not None:
                bar.update(len(part))
    todo = [i for i, s in enumerate(out) if s is None]
    rows, owners = [], []
    for k in todo:
        for row in _choice_rows(examples[k]):
            rows.append(row)
            owners.extend([k] * len(row.groups))
    for k in todo:
        out[k] = []
    for k, s in zip(owners, _score(model, head, rows, pad_id, bs, bar)):
        out[k].append(s)
    return out  # type: ignore[return-value]


def choice_predictions(
    model: nn.Module,
    head: Head,
    examples: list[Example],
    pad_id: int,
    bs: int,
    bar: tqdm | None = None,
) -> list[int]:
    """Index of the most likely choice of each example (all must carry ``choice_ids``)."""
    scores = choice_scores(model, head, examples, pad_id, bs, bar)
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


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
    return forward_decode(model, ids, max_new, stop, lambda logits: int(logits.argmax()))


@torch.no_grad()
def forward_decode(
    model: nn.Module,
    ids: torch.Tensor,
    max_new: int,
    stop: set[int],
    choose: Any,
    streamer: Any = None,
) -> list[int]:
    """Up to ``max_new`` tokens after ``ids`` (1 x T), each ``choose(last logits)``, by whole
    forwards (see ``_greedy``); the stop token that ends it is included. ``streamer``
    (transformers' TextStreamer) gets the prompt, then each token."""
    if streamer is not None:
        streamer.put(ids[0].cpu())  # the prompt, which the streamer skips
    new: list[int] = []
    for _ in range(max_new):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        token = choose(logits[0, -1].float())
        new.append(token)
        if streamer is not None:
            streamer.put(torch.tensor([token]))
        if token in stop:
            break
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    if streamer is not None:
        streamer.end()
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


def class_names(tok: PreTrainedTokenizerBase, examples: list[Example]) -> list[str]:
    """Names of the classes (choice positions): the label words when every example offers the
    same choices (distinct, non-empty words), else ``choice 0``, ``choice 1``, ..."""
    first = examples[0].choice_ids or []
    if all(ex.choice_ids == first for ex in examples):
        words = [tok.decode(c, skip_special_tokens=True).strip() for c in first]
        if all(words) and len(set(words)) == len(words):
            return words
    return [f"choice {k}" for k in range(max(len(ex.choice_ids or []) for ex in examples))]


def class_metrics(answers: list[int], predicted: list[int], names: list[str]) -> dict[str, Any]:
    """Majority-class baseline, recall per gold class, confusion counts and collapse.

    ``per_class_accuracy`` has the classes that occur as gold; ``confusion`` maps gold name ->
    predicted name -> count (non-zero counts only); ``collapsed_to`` names the one class every
    prediction fell in when the gold labels have at least two (else None).
    """
    gold = Counter(answers)
    top = max(sorted(gold), key=gold.__getitem__)  # ties: the lowest index
    pairs = Counter(zip(answers, predicted))
    confusion = {
        names[g]: {names[p]: pairs[g, p] for p in range(len(names)) if pairs[g, p]}
        for g in sorted(gold)
    }
    picked = set(predicted)
    return {
        "majority_baseline": gold[top] / len(answers),
        "majority_class": names[top],
        "classes": names,
        "per_class_accuracy": {names[g]: pairs[g, g] / gold[g] for g in sorted(gold)},
        "confusion": confusion,
        "collapsed_to": names[next(iter(picked))] if len(picked) == 1 and len(gold) > 1 else None,
    }


MAX_CLASSES_SHOWN = 10  # more classes: per-class rows and the confusion matrix stay in the JSON


def _cell(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def held_out_lines(columns: dict[str, dict[str, Any]]) -> list[str]:
    """The held-out table, one column per evaluation (e.g. ``before``, ``after``).

    Rows: accuracy (with per-class recall under it and the majority-class baseline), loss,
    perplexity; then, for the last evaluation with classes, its confusion matrix and a warning
    when every prediction fell in one class.
    """
    evals = list(columns.values())
    keys = [k for k in ("accuracy", "loss", "perplexity") if any(k in m for m in evals)]
    if not keys:
        return []

    lines = ["held-out    " + "".join(f"{c:>10}" for c in columns)]
    named = [(c, m) for c, m in columns.items() if "classes" in m]
    which, last = named[-1] if named else ("", None)
    for k in keys:
        lines.append(_row(k, [m.get(k, "-") for m in evals]))
        if k == "accuracy" and last is not None:
            lines += _class_rows(evals, last)
    if last is not None:
        lines += _confusion_lines(last, which if len(columns) > 1 else "")
    return lines


def _row(name: str, values: list[Any], note: str = "") -> str:
    return f"{name:<12}" + "".join(f"{_cell(v):>10}" for v in values) + note


def _class_rows(evals: list[dict[str, Any]], last: dict[str, Any]) -> list[str]:
    """Recall per gold class (up to MAX_CLASSES_SHOWN classes) and the majority baseline."""
    out = []
    if len(last["classes"]) <= MAX_CLASSES_SHOWN:
        for name in last["per_class_accuracy"]:
            recall = [m.get("per_class_accuracy", {}).get(name, "-") for m in evals]
            out.append(_row(f"  {name[:10]}", recall))
    baseline = [m.get("majority_baseline", "-") for m in evals]
    note = f"  (always {last['majority_class']!r}, the majority class)"
    out.append(_row("baseline", baseline, note))
    return out


def _confusion_lines(metrics: dict[str, Any], which: str) -> list[str]:
    """A gold x predicted count table (small class counts only), then the collapse warning."""
    names, lines = metrics["classes"], []
    if len(names) <= MAX_CLASSES_SHOWN:
        w = max(8, *(len(n[:12]) + 2 for n in names))
        title = f"confusion{' ' + which if which else ''} (rows: gold, columns: predicted)"
        lines += [title, " " * 12 + "".join(f"{n[:12]:>{w}}" for n in names)]
        for g, counts in metrics["confusion"].items():
            lines.append(f"  {g[:10]:<10}" + "".join(f"{counts.get(n, 0):>{w}}" for n in names))
    else:
        lines.append(f"{len(names)} classes: per-class accuracy and confusion in the JSON")
    collapsed = metrics.get("collapsed_to")
    if collapsed is not None:
        kind = (
            "the majority class" if collapsed == metrics["majority_class"] else "a minority class"
        )
        lines.append(
            f"warning: every held-out prediction is {collapsed!r} ({kind}): "
            "the model has collapsed to one label"
        )
    return lines


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
    objective: Any = None,
) -> dict:
    """Metrics on ``examples``: loss and perplexity always; accuracy when they carry choices;
    a preference ``objective``'s own metrics (``pref_*``) when they are preference pairs.

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
            held = [examples[i] for i in scored]
            answers = [ex.answer for ex in held]
            if all(a is not None for a in answers):
                metrics |= class_metrics(answers, picks, class_names(tok, held))
        pairs = [ex for ex in examples if ex.rejected_ids is not None]
        if objective is not None and getattr(objective, "pairs", False) and pairs:
            bar.set_postfix_str("pairs", refresh=False)
            device = next(model.parameters()).device
            batches = [
                {k: v.to(device) for k, v in collate(pairs[i : i + cfg.batch_size], pad).items()}
                for i in range(0, len(pairs), cfg.batch_size)
            ]
            metrics |= objective.evaluate(model, head, batches, chunk)
        if n_samples:
            bar.set_postfix_str("generate", refresh=False)
            metrics["samples"] = samples(
                model, tok, examples, n_samples, cfg.max_new_tokens, bar, predicted
            )
    finally:
        bar.close()
        model.train(was_training)
    return metrics
