"""What a user reads: no deprecation noise, an evaluation progress bar, samples with their gold."""

from __future__ import annotations

import inspect
import warnings

import pytest

from slimtune import config
from slimtune.cli import print_report
from slimtune.config import DataConfig, EvalConfig
from slimtune.data import load_splits
from slimtune.evaluate import evaluate, prompt_and_gold
from slimtune.loop import train
from slimtune.loss import find_head
from slimtune.models import load_model, tiny_tokenizer

from .conftest import REVIEWS, tiny_recipe, write_jsonl

TOK = tiny_tokenizer()

# peft 0.21.2 (the newest release) reads transformers' deprecated alias itself, in
# PeftModel.__init__: ``getattr(model, "is_gradient_checkpointing", True)``. slimtune calls the
# current API (activation_checkpointing_enable); this one warning, raised inside peft, is
# allowed for peft methods until peft follows the rename (test_peft_allowance_is_still_needed).
PEFT_INTERNAL = "`is_gradient_checkpointing` is deprecated"


def _run(tmp_path, params="full", **train_opts):
    """A 2-step tiny-llama run with 2 samples; every warning recorded."""
    data = write_jsonl(tmp_path / "reviews.jsonl", [{"text": t, "label": y} for t, y in REVIEWS])
    recipe = tiny_recipe(
        data,
        tmp_path / "run",
        params={"name": params},
        train={"steps": 2, "eval_before": True, **train_opts},
        eval={"generate": 2, "max_new_tokens": 3},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(config.from_dict(recipe))
    future = [w for w in caught if issubclass(w.category, FutureWarning)]
    return result, future


def _messages(future):
    return [f"{w.filename}:{w.lineno}: {w.message}" for w in future]


@pytest.mark.parametrize("train_opts", [{}, {"gradient_checkpointing": True}], ids=["plain", "gc"])
def test_full_run_has_no_future_warning(tmp_path, train_opts):
    _, future = _run(tmp_path, "full", **train_opts)
    assert not future, _messages(future)


@pytest.mark.parametrize("train_opts", [{}, {"gradient_checkpointing": True}], ids=["plain", "gc"])
def test_lora_run_has_no_future_warning_of_its_own(tmp_path, train_opts):
    _, future = _run(tmp_path, "lora", **train_opts)
    ours = [w for w in future if PEFT_INTERNAL not in str(w.message)]
    assert not ours, _messages(ours)


def test_peft_allowance_is_still_needed():
    """Fails once peft stops reading the deprecated alias: then drop PEFT_INTERNAL above."""
    from peft import PeftModel

    assert '"is_gradient_checkpointing"' in inspect.getsource(PeftModel.__init__)


def test_report_samples_show_prompt_prediction_and_gold(tmp_path, capsys):
    result, _ = _run(tmp_path, "full")
    samples = result.summary["eval_after"]["samples"]
    assert len(samples) == 2
    for s in samples:
        assert s["gold"].strip() in ("negative", "positive")
        assert s["choice"].strip() in ("negative", "positive")
        assert s["correct"] == (s["choice"] == s["gold"])
    capsys.readouterr()
    print_report(result.summary)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("sample: ")]
    assert len(lines) == 2
    for line, s in zip(lines, samples):
        verdict = "right" if s["correct"] else "wrong"
        assert repr(s["prompt"][-60:]) in line and repr(s["completion"]) in line
        assert f"gold {s['gold'].strip()!r}: {verdict}" in line, line


def test_report_sample_without_choices_shows_gold(capsys):
    summary = {
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
        "eval_after": {"samples": [{"prompt": "2+2=", "completion": "5", "gold": "4"}]},
    }
    print_report(summary)
    assert "sample: ...'2+2=' -> '5' (gold '4')" in capsys.readouterr().out


def test_messages_sample_prompts_up_to_last_assistant_turn(tmp_path):
    msgs = [
        {"role": "system", "content": "You are a terse assistant for arithmetic questions."},
        {"role": "user", "content": "what is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}])
    ex = load_splits(DataConfig(path=str(path), format="messages"), TOK).train[0]
    prompt, gold = prompt_and_gold(ex, max_new=8)
    expected = TOK.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    assert TOK.decode(prompt) == expected
    assert TOK.decode(gold, skip_special_tokens=True) == "6"


def test_plain_text_sample_gold_is_the_continuation(tmp_path):
    text = "the quick brown fox jumps over the lazy dog " * 3
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": text}, {"text": text}])
    ex = load_splits(DataConfig(path=str(path), format="text", eval_size=0), TOK).train[0]
    prompt, gold = prompt_and_gold(ex, max_new=10)
    assert prompt == ex.input_ids[:16] and gold == ex.input_ids[16:26]


@pytest.fixture(scope="module")
def tiny_eval():
    model, tok = load_model("tiny-llama")
    data = [{"text": t, "label": y} for t, y in REVIEWS]
    return model, tok, data


def _evaluate(tiny_eval, tmp_path, **kw):
    model, tok, data = tiny_eval
    path = write_jsonl(tmp_path / "r.jsonl", data)
    cfg = DataConfig(
        path=str(path), format="classification", label_words=["negative", "positive"], eval_size=6
    )
    examples = load_splits(cfg, tok).eval
    ev = EvalConfig(batch_size=4, generate=2, max_new_tokens=2)
    return evaluate(model, tok, find_head(model), examples, ev, **kw)


def test_evaluate_progress_bar_on_stderr(tiny_eval, tmp_path, capsys):
    metrics = _evaluate(tiny_eval, tmp_path, progress=True, desc="eval after")
    err = capsys.readouterr().err
    # one bar counting examples: 6 for the loss, 6 choice-scored, 2 generated
    assert "eval after" in err and "14/14" in err and "ex/s" in err
    assert {"loss", "accuracy", "samples"} <= set(metrics)


def test_evaluate_progress_off_or_other_rank_is_silent(tiny_eval, tmp_path, capsys, monkeypatch):
    quiet = _evaluate(tiny_eval, tmp_path)
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("RANK", "1")
    shown = _evaluate(tiny_eval, tmp_path, progress=True)
    assert capsys.readouterr() == ("", "")
    assert quiet["loss"] == shown["loss"] and quiet["samples"] == shown["samples"]


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_learning_samples_follow_the_adapter(kind):
    """Each sampled token is the greedy next token of the adapted model (peft 0.21.2's generate
    drops the prefix of prefix tuning and re-inserts prompt tuning's virtual tokens each step)."""
    import torch
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    from slimtune.data import Example
    from slimtune.evaluate import samples

    model, tok = load_model("tiny-llama")
    make = PromptTuningConfig if kind == "prompt" else PrefixTuningConfig
    peft_model = get_peft_model(model, make(task_type="CAUSAL_LM", num_virtual_tokens=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.normal_(0, 3)  # far from the base model, so that a dropped prompt shows
    peft_model.eval()
    prompt = tok("this movie was good")["input_ids"]
    (s,) = samples(peft_model, tok, [Example(prompt, prompt, prompt_ids=prompt)], 1, 6)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for token in tok(s["completion"], add_special_tokens=False)["input_ids"]:
            logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            assert int(logits[0, -1].argmax()) == token
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
