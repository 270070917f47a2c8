"""Held-out evaluation a user can trust: class diagnostics, conversation samples, and
multi-token choices scored from one forward of the shared prompt."""

from __future__ import annotations

import functools
import importlib
import json

import pytest
import yaml

from slimtune.cli import main, print_report
from slimtune.config import DataConfig, EvalConfig
from slimtune.data import Example, load_splits
from slimtune.loss import find_head
from slimtune.models import load_model

from .conftest import REVIEWS, tiny_recipe, write_jsonl

ev = importlib.import_module("slimtune.evaluate")  # slimtune.evaluate is also a function

NAMES = ["negative", "positive"]


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model("tiny-llama")
    model.eval()
    return model, tok, find_head(model)


# --- 1. class diagnostics ---------------------------------------------------------------------


def test_collapse_to_the_majority_class_is_reported():
    """The case of issue 17: accuracy 0.68 that is exactly the majority class."""
    answers = [0] * 32 + [1] * 68
    m = ev.class_metrics(answers, [1] * 100, NAMES)
    assert m["majority_baseline"] == 0.68 and m["majority_class"] == "positive"
    assert m["per_class_accuracy"] == {"negative": 0.0, "positive": 1.0}
    assert m["confusion"] == {"negative": {"positive": 32}, "positive": {"positive": 68}}
    assert m["collapsed_to"] == "positive" and m["classes"] == NAMES


def test_no_collapse_and_one_class_held_out():
    m = ev.class_metrics([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], NAMES)
    assert m["collapsed_to"] is None and m["majority_baseline"] == 0.6
    assert m["per_class_accuracy"] == {"negative": 0.5, "positive": 2 / 3}
    assert m["confusion"] == {
        "negative": {"negative": 1, "positive": 1},
        "positive": {"negative": 1, "positive": 2},
    }
    # every gold label the same: one predicted class is no evidence of collapse
    assert ev.class_metrics([1, 1], [1, 1], NAMES)["collapsed_to"] is None


def test_class_names_are_label_words_or_indices(tiny):
    _, tok, _ = tiny
    words = [
        tok(" neg", add_special_tokens=False)["input_ids"],
        tok(" pos", add_special_tokens=False)["input_ids"],
    ]
    same = [Example([1], [1], [1], words, 0), Example([1], [1], [1], words, 1)]
    assert ev.class_names(tok, same) == ["neg", "pos"]
    other = [Example([1], [1], [1], words, 0), Example([1], [1], [1], [[5], [6], [7]], 2)]
    assert ev.class_names(tok, other) == ["choice 0", "choice 1", "choice 2"]


def test_evaluate_returns_class_diagnostics(tiny, tmp_path):
    model, tok, head = tiny
    data = write_jsonl(tmp_path / "r.jsonl", [{"text": t, "label": y} for t, y in REVIEWS])
    cfg = DataConfig(path=str(data), format="classification", label_words=NAMES, eval_size=8)
    examples = load_splits(cfg, tok).eval
    m = ev.evaluate(model, tok, head, examples, EvalConfig(batch_size=4, generate=0))
    assert m["classes"] == NAMES
    gold = [ex.answer for ex in examples]
    share = max(gold.count(0), gold.count(1)) / len(gold)
    assert m["majority_baseline"] == share
    diagonal = sum(m["confusion"].get(n, {}).get(n, 0) for n in NAMES)
    assert sum(sum(r.values()) for r in m["confusion"].values()) == len(examples)
    assert m["accuracy"] == diagonal / len(examples)  # the existing key, unchanged in meaning
    json.dumps(m)  # summary.json and metrics.jsonl take it as it is


def _summary(before: dict, after: dict) -> dict:
    return {
        "params": "lora",
        "optimizer": "adamw",
        "model": "m",
        "steps": 1,
        "trainable_params": 1,
        "trainable_fraction": 0.1,
        "train_seconds": 1.0,
        "tokens_per_s": 1.0,
        "peak_memory_bytes": 1,
        "device": "cpu",
        "eval_before": before,
        "eval_after": after,
    }


def test_report_shows_baseline_per_class_confusion_and_collapse(capsys):
    answers = [0] * 32 + [1] * 68
    before = {"accuracy": 0.5, "loss": 2.0} | ev.class_metrics(answers, [0, 1] * 50, NAMES)
    after = {"accuracy": 0.68, "loss": 1.0} | ev.class_metrics(answers, [1] * 100, NAMES)
    print_report(_summary(before, after))
    out = capsys.readouterr().out
    assert "accuracy        0.5000    0.6800" in out  # the existing rows, as they were
    assert "  negative      0.5000    0.0000" in out and "  positive      0.5000    1.0000" in out
    assert "baseline        0.6800    0.6800  (always 'positive', the majority class)" in out
    assert "confusion after (rows: gold, columns: predicted)" in out
    assert "  negative           0        32" in out and "  positive           0        68" in out
    line = (
        "warning: every held-out prediction is 'positive' (the majority class): "
        "the model has collapsed to one label"
    )
    assert line in out


def test_report_of_many_classes_keeps_the_matrix_out(capsys):
    names = [f"c{k}" for k in range(12)]
    answers = list(range(12)) * 2
    after = {"accuracy": 0.5, "loss": 1.0} | ev.class_metrics(answers, answers[::-1], names)
    print_report(_summary({}, after))
    out = capsys.readouterr().out
    assert "(rows: gold" not in out and "12 classes:" in out
    assert "baseline" in out and "warning" not in out


def test_report_without_classes_is_unchanged(capsys):
    print_report(_summary({"loss": 2.0}, {"loss": 1.0}))
    out = capsys.readouterr().out
    assert "held-out        before     after\nloss            2.0000    1.0000\n" in out
    assert "baseline" not in out and "confusion" not in out


def test_train_report_and_eval_json_carry_the_diagnostics(tmp_path, capsys):
    data = write_jsonl(tmp_path / "r.jsonl", [{"text": t, "label": y} for t, y in REVIEWS])
    recipe = tiny_recipe(data, tmp_path / "out", train={"steps": 1}, eval={"generate": 0})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "recipe.yaml")]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "confusion after" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {"majority_baseline", "per_class_accuracy", "confusion"} <= set(summary["eval_after"])
    assert main(["eval", str(tmp_path / "out")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["classes"] == NAMES and "collapsed_to" in metrics


# --- 2. conversation samples ------------------------------------------------------------------


def test_messages_samples_prompt_with_the_conversation(tiny, tmp_path):
    """A 2-turn conversation: the sample prompts with everything before the last assistant
    turn (ending in the generation prompt) and its gold is that turn."""
    model, tok, _ = tiny
    msgs = [
        {"role": "system", "content": "You answer arithmetic questions with one number only."},
        {"role": "user", "content": "what is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}])
    ex = load_splits(DataConfig(path=str(path), format="messages"), tok).train[0]
    (s,) = ev.samples(model, tok, [ex], 1, 3)
    assert s["prompt"] == tok.apply_chat_template(
        msgs[:-1], tokenize=False, add_generation_prompt=True
    )
    assert s["gold"] == "6"


# --- 3. multi-token choices from one forward of the prompt ------------------------------------


def _multi_token_examples(tok) -> list[Example]:
    """Prompts of different lengths; choices of 1, 2-3 and many tokens (byte-level tokenizer)."""
    texts = ["a wonderful film", "dull, slow and far too long", "ok", "i loved every minute of it"]
    words = [" bad", " great", " so-so, mediocre", "!"]
    out = []
    for k, t in enumerate(texts + texts[:1]):
        prompt = tok(f"{t}\nAnswer:")["input_ids"]
        choices = [tok(w, add_special_tokens=False)["input_ids"] for w in words[: 2 + k % 3]]
        out.append(Example(prompt, prompt, prompt, choices, k % 2))
    return out


def _per_candidate_rows(model, head, examples, bs) -> list[list[float]]:
    """The previous scoring: a row of prompt + choice per candidate."""
    rows = [r for ex in examples for r in ev._choice_rows(ex)]
    flat = iter(ev._score(model, head, rows, 0, bs))
    return [[next(flat) for _ in ex.choice_ids] for ex in examples]


class _Counting:
    """Wraps ``model.forward``: counts calls, and those that build a KV cache (the prompts)."""

    def __init__(self, model):
        self.model, self.inner, self.calls, self.prompts = model, model.forward, 0, 0
        self.key = ev._cache_kwarg(model)  # the keyword that feeds a cache back
        self.shapes: list[tuple[int, ...]] = []  # input_ids of each call

    def __enter__(self):
        @functools.wraps(self.inner)  # keeps the signature evaluate inspects for a cache
        def forward(*args, **kw):
            self.calls += 1
            self.shapes.append(tuple(kw["input_ids"].shape))
            self.prompts += int(kw.get("use_cache", False) and self.key not in kw)
            return self.inner(*args, **kw)

        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        del self.model.forward


@pytest.mark.parametrize("bs", [2, 8])
def test_shared_prompt_scores_equal_per_candidate_rows(tiny, bs):
    model, tok, head = tiny
    examples = _multi_token_examples(tok)
    old = _per_candidate_rows(model, head, examples, bs)
    n_rows = sum(len(ex.choice_ids) for ex in examples)
    with _Counting(model) as count:
        new = ev.choice_scores(model, head, examples, 0, bs)
    # Same sums of the same log-probabilities; only the batching differs (left-padded prompts
    # with a KV cache vs. right-padded whole rows), so each float32 log-prob (|logp| < 16,
    # ulp ~1e-6) may differ by a few ulps from a different reduction order. A score sums at
    # most 16 of them: 16 x 4 ulps x 1e-6 < 1e-4 (relative ~1e-6 of scores of ~80); seen 1e-6.
    for o, n in zip(old, new):
        assert n == pytest.approx(o, abs=1e-4, rel=1e-6)
    old_pick = [max(range(len(s)), key=s.__getitem__) for s in old]
    assert ev.choice_predictions(model, head, examples, 0, bs) == old_pick
    groups = -(-len(examples) // bs)
    assert count.prompts == groups and count.calls == 2 * groups  # a prompt, then all candidates
    # The prompts run once (not once per candidate); the candidate forward feeds only
    # candidate tokens (all but each one's last), one row per candidate.
    group = examples[:bs]
    assert count.shapes[0] == (len(group), max(len(ex.prompt_ids) for ex in group))
    cands = [c for ex in group for c in ex.choice_ids]
    assert count.shapes[1] == (len(cands), max(map(len, cands)) - 1)
    assert sum(r for r, _ in count.shapes[1::2]) == n_rows


def test_progress_still_counts_examples(tiny):
    model, tok, head = tiny
    examples = _multi_token_examples(tok)

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    ev.choice_scores(model, head, examples, 0, 2, bar)
    assert bar.n == len(examples)


def test_prompt_learning_falls_back_to_rows(tiny):
    from peft import PromptTuningConfig, get_peft_model

    _, tok, _ = tiny
    base, _ = load_model("tiny-llama")
    peft_model = get_peft_model(
        base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    peft_model.eval()
    head = find_head(peft_model)
    assert ev._cache_kwarg(peft_model) is None
    examples = _multi_token_examples(tok)
    old = _per_candidate_rows(peft_model, head, examples, 4)
    assert ev.choice_scores(peft_model, head, examples, 0, 4) == old  # the same code path


def test_model_without_cache_falls_back_to_rows(tiny, monkeypatch):
    model, tok, head = tiny
    examples = _multi_token_examples(tok)
    old = _per_candidate_rows(model, head, examples, 4)
    monkeypatch.setattr(ev, "_cache_kwarg", lambda m: None)
    assert ev.choice_scores(model, head, examples, 0, 4) == old


def test_slimtune_eval_prints_json_on_stdout_and_the_table_on_stderr(tmp_path, cls_data, capsys):
    import json

    import yaml

    from slimtune.cli import main

    from .conftest import tiny_recipe

    recipe = tiny_recipe(
        cls_data, tmp_path / "out", params={"name": "lora", "r": 2}, train={"steps": 1}
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "out"), "eval.max_examples=3"]) == 0
    out, err = capsys.readouterr()
    metrics = json.loads(out)
    assert metrics["examples"] == 3  # what was scored, not the held-out set's size
    assert "majority_baseline" in metrics and "confusion" in metrics
    assert "accuracy" in err and "baseline" in err
