"""Issue 17, data: what a new user hits.

Truncation that keeps a template's instruction (and reports what it cut), .txt inputs, and
data.chat_template for tokenizers without one. The tiny tokenizer is byte-level (one token per
UTF-8 byte, no BOS added), so every token count below is exact: equality, no tolerance.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

import pytest

from slimtune import config
from slimtune.config import DataConfig
from slimtune.data import IGNORE, Example, Pair, Splits, Tokenise, load_splits, read_records
from slimtune.errors import SlimtuneError
from slimtune.models import tiny_tokenizer

from .conftest import write_jsonl

TOK = tiny_tokenizer()
TEMPLATE = "Which category is this message?\n\nMessage: {text}\nCategory:"
HEAD, TAIL = TEMPLATE.split("{text}")


def labelled(ex: Example) -> list[int]:
    return [t for t, y in zip(ex.input_ids, ex.labels) if y != IGNORE]


def old_truncate(ex: Example, max_len: int) -> Example:
    """data._truncate before issue 17 (cut the prompt's start), kept verbatim as the reference."""
    extra = len(ex.input_ids) - max_len
    if extra <= 0:
        return ex
    n_prompt = len(ex.prompt_ids)
    cut = min(extra, n_prompt)
    ids, labels = ex.input_ids[cut:], ex.labels[cut:]
    ex.input_ids, ex.labels = ids[:max_len], labels[:max_len]
    ex.prompt_ids = ex.prompt_ids[cut:]
    return ex


def message(i: int) -> str:
    """Texts of 10 .. 200 bytes: some fit in 64 tokens, most do not."""
    return (f"message {i} " + "lorem ipsum dolor sit amet " * 8)[: 10 + 19 * (i % 11)]


@pytest.fixture
def long_cls(tmp_path: Path) -> Path:
    rows = [{"text": message(i), "label": i % 2} for i in range(40)]
    return write_jsonl(tmp_path / "long.jsonl", rows)


def cls_cfg(path: Path, **kw) -> DataConfig:
    kw = {"max_seq_len": 64, "eval_size": 8, **kw}
    return DataConfig(
        path=str(path),
        format="classification",
        label_words=["spam", "ham"],
        template=TEMPLATE,
        **kw,
    )


def full_length(text: str, label: str) -> int:
    # prompt bytes + " label" + </s>
    return len(HEAD + text + TAIL) + 1 + len(label) + 1


# ---------------------------------------------------------------------------------------------
# 1. Truncation
# ---------------------------------------------------------------------------------------------


def test_field_truncation_keeps_instruction_and_answer(long_cls):
    splits = load_splits(cls_cfg(long_cls), TOK)
    texts = {message(i) for i in range(40)}
    for ex in splits.train + splits.eval:
        assert len(ex.input_ids) <= 64
        prompt = TOK.decode(ex.prompt_ids)
        assert prompt.startswith(HEAD) and prompt.endswith(TAIL), prompt
        kept = prompt[len(HEAD) : -len(TAIL)]
        assert any(t.startswith(kept) for t in texts)
        assert TOK.decode(labelled(ex)) in (" spam</s>", " ham</s>")
        assert ex.input_ids[: len(ex.prompt_ids)] == ex.prompt_ids
        assert [TOK.decode(c) for c in ex.choice_ids] == [" spam", " ham"]


def test_truncation_report_counts_and_line(long_cls, caplog):
    with caplog.at_level(logging.INFO, logger="slimtune.data"):
        splits = load_splits(cls_cfg(long_cls), TOK)
    full = load_splits(cls_cfg(long_cls, max_seq_len=4096), TOK)
    # what each example lost: its full length minus 64 (the byte tokenizer cuts exactly that)
    cut = {
        name: [len(e.input_ids) - 64 for e in exs if len(e.input_ids) > 64]
        for name, exs in (("train", full.train), ("eval", full.eval))
    }
    assert cut["train"] and cut["eval"]  # the fixture has long texts in both splits
    rep = splits.truncation
    assert rep.train.examples == 32 and rep.eval.examples == 8
    assert sorted(rep.train.tokens_cut["field"]) == sorted(cut["train"])
    assert sorted(rep.eval.tokens_cut["field"]) == sorted(cut["eval"])
    assert rep.train.cut == len(cut["train"]) and rep.cut == len(cut["train"]) + len(cut["eval"])
    for short, whole in zip(splits.train + splits.eval, full.train + full.eval):
        fits = len(whole.input_ids) <= 64
        assert short.input_ids == whole.input_ids if fits else len(short.input_ids) == 64

    def part(c: list[int]) -> str:
        return (
            f"field {{text}} shortened (median {statistics.median(c):g}, max {max(c)} tokens cut)"
        )

    want = (
        f"data: {len(cut['train'])} of 32 training examples longer than max_seq_len=64: "
        f"{part(cut['train'])}; held-out: {len(cut['eval'])} of 8: {part(cut['eval'])}"
    )
    assert rep.line() == want
    records = [r for r in caplog.records if r.name == "slimtune.data"]
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.WARNING, want)]


def test_nothing_cut_is_logged_at_info(long_cls, caplog):
    with caplog.at_level(logging.INFO, logger="slimtune.data"):
        splits = load_splits(cls_cfg(long_cls, max_seq_len=4096), TOK)
    assert splits.truncation.cut == 0
    line = "data: no example longer than max_seq_len=4096 (32 training, 8 held-out)"
    assert splits.truncation.line() == line
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.INFO, line)]


def test_prompt_start_reproduces_the_old_ids(long_cls):
    full = load_splits(cls_cfg(long_cls, max_seq_len=4096), TOK)
    old = [old_truncate(e, 64) for e in full.train + full.eval]
    new = load_splits(cls_cfg(long_cls, truncate="prompt_start"), TOK)
    got = new.train + new.eval
    assert [e.input_ids for e in got] == [e.input_ids for e in old]
    assert [e.labels for e in got] == [e.labels for e in old]
    assert [e.prompt_ids for e in got] == [e.prompt_ids for e in old]
    assert new.truncation.train.tokens_cut.keys() == {"prompt_start"}
    assert "prompt start cut (median" in new.truncation.line()


def test_template_too_long_falls_back_to_prompt_start(long_cls):
    # the template alone (HEAD + TAIL = 52 bytes, + " spam</s>") does not fit in 40 tokens
    full = load_splits(cls_cfg(long_cls, max_seq_len=4096), TOK)
    splits = load_splits(cls_cfg(long_cls, max_seq_len=40), TOK)
    got, old = splits.train, [old_truncate(e, 40) for e in full.train]
    assert [e.input_ids for e in got] == [e.input_ids for e in old]
    assert splits.truncation.train.tokens_cut.keys() == {"template"}
    assert splits.truncation.train.cut == 32
    assert "template longer than max_seq_len: prompt start cut (median" in splits.truncation.line()


def test_longest_field_gives_way_first(tmp_path):
    rows = [{"instruction": "Summarise the input.", "input": "word " * 80, "output": "ok"}]
    cfg = DataConfig(
        path=str(write_jsonl(tmp_path / "a.jsonl", rows)), format="alpaca", max_seq_len=100
    )
    (ex,) = load_splits(cfg, TOK).train
    prompt = TOK.decode(ex.prompt_ids)
    assert len(ex.input_ids) == 100
    assert prompt.startswith("### Instruction:\nSummarise the input.\n\n### Input:\nword word")
    assert prompt.endswith("\n\n### Response:\n") and TOK.decode(labelled(ex)) == "ok</s>"


def test_field_cut_inside_a_multibyte_character(tmp_path):
    rows = [{"text": "é" * 40, "label": 0}]  # 80 bytes; an odd cut splits a character
    cfg = DataConfig(
        path=str(write_jsonl(tmp_path / "u.jsonl", rows)),
        format="classification",
        label_words=["no", "yes"],
        max_seq_len=41,  # 92 tokens: 29 bytes of text fit, 14 characters and a half
    )
    (ex,) = load_splits(cfg, TOK).train
    prompt = TOK.decode(ex.prompt_ids)
    assert len(ex.input_ids) <= 41 and "\ufffd" not in prompt
    assert prompt.endswith("\nAnswer:") and set(prompt[: -len("\nAnswer:")]) == {"é"}


def test_formats_without_template_report_prompt_start(tmp_path):
    rows = [{"prompt": "x" * 50, "chosen": "4", "rejected": "5"}] * 3
    cfg = DataConfig(
        path=str(write_jsonl(tmp_path / "p.jsonl", rows)), format="preference", max_seq_len=20
    )
    splits = load_splits(cfg, TOK)
    assert all(len(e.input_ids) == 20 and TOK.decode(labelled(e)) == "4</s>" for e in splits.train)
    assert splits.truncation.line() == (
        "data: 3 of 3 training examples longer than max_seq_len=20: "
        "prompt start cut (median 32, max 32 tokens cut)"
    )


def test_field_and_end_cuts_in_one_line(tmp_path):
    # fixed alpaca text: 17 + 6 ("Do it.") + 13 + 16 = 52 tokens
    rows = [
        {"instruction": "Do it.", "input": "a" * 100, "output": "ok"},  # 155: input gives 75
        {"instruction": "Do it.", "input": "b", "output": "z" * 100},  # 154: the response is cut
    ]
    cfg = DataConfig(
        path=str(write_jsonl(tmp_path / "a.jsonl", rows)), format="alpaca", max_seq_len=80
    )
    splits = load_splits(cfg, TOK)
    assert all(len(e.input_ids) == 80 for e in splits.train)
    assert splits.truncation.line() == (
        "data: 2 of 2 training examples longer than max_seq_len=80: "
        "field {input} shortened in 1 (median 75, max 75 tokens cut), "
        "end cut in 1 (median 74, max 74 tokens cut)"
    )


def test_chat_prompt_from_a_template_keeps_the_instruction(long_cls):
    splits = load_splits(cls_cfg(long_cls, chat=True, max_seq_len=96), TOK)
    assert splits.truncation.train.tokens_cut.keys() == {"field"}
    for ex in splits.train:
        prompt = TOK.decode(ex.prompt_ids)
        assert len(ex.input_ids) <= 96 and prompt.startswith("<|user|>" + HEAD)
        assert prompt.endswith(TAIL + "</s><|assistant|>")


def test_long_conversation_loses_its_end(tmp_path):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 60}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}])
    splits = load_splits(DataConfig(path=str(path), format="messages", max_seq_len=32), TOK)
    assert len(splits.train[0].input_ids) == 32
    # <|user|>hi</s><|assistant|> (8 + 2 + 1 + 13) + 60 x + </s> = 85 tokens, 53 over
    assert splits.truncation.line().endswith("end cut (median 53, max 53 tokens cut)")


def test_splits_built_by_hand_need_no_report():
    assert Splits([], []).truncation.cut == 0  # federated/core.py builds Splits(shard, [])


def test_truncate_is_a_checked_choice():
    assert config.load(None, ["data.path=x.jsonl"]).data.truncate == "field"
    with pytest.raises(
        SlimtuneError, match="data.truncate: expected one of 'field', 'prompt_start'"
    ):
        config.load(None, ["data.path=x.jsonl", "data.truncate=end"])


# ---------------------------------------------------------------------------------------------
# 2. .txt inputs
# ---------------------------------------------------------------------------------------------


def test_txt_file_one_document_per_block(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first doc\nline two\n\n\nsecond\n   \nthird\n\n")
    recs = read_records(str(path))
    assert [r.row["text"] for r in recs] == ["first doc\nline two", "second", "third"]
    assert [r.where.rsplit(" ", 1)[-1] for r in recs] == ["1", "5", "7"]
    splits = load_splits(DataConfig(path=str(path), max_seq_len=32), TOK)
    assert sorted(TOK.decode(e.input_ids) for e in splits.train) == [
        "first doc\nline two</s>",
        "second</s>",
        "third</s>",
    ]


def test_txt_directory_one_document_per_file(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("bee\n\nsecond block, same document\n")
    (tmp_path / "docs" / "a.txt").write_text("ay")
    (tmp_path / "docs" / "notes.md").write_text("not read")
    recs = read_records(str(tmp_path / "docs"))
    assert [r.row["text"] for r in recs] == ["ay", "bee\n\nsecond block, same document"]
    assert "b.txt" in recs[1].where


def test_txt_not_utf8_names_file_and_line(tmp_path):
    (tmp_path / "docs").mkdir()
    bad = tmp_path / "docs" / "bad.txt"
    bad.write_bytes(b"fine\n\nfine too\n\xff broken\n")
    (tmp_path / "docs" / "a.txt").write_text("ok")
    for path in (bad, tmp_path / "docs"):
        with pytest.raises(SlimtuneError) as e:
            load_splits(DataConfig(path=str(path)), TOK)
        assert str(e.value) == f"data file {str(bad)!r} line 4: not UTF-8 text (byte 15)"


def test_txt_directory_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlimtuneError) as e:
        load_splits(DataConfig(path=str(tmp_path / "empty")), TOK)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"data: {str(tmp_path / 'empty')!r}: empty directory")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.md").write_text("x")
    with pytest.raises(SlimtuneError, match=r"other': no \.txt files and not a saved dataset"):
        load_splits(DataConfig(path=str(tmp_path / "other")), TOK)
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(SlimtuneError, match=r"blank.txt': no records \(empty dataset\)"):
        load_splits(DataConfig(path=str(tmp_path / "blank.txt")), TOK)


def test_txt_needs_format_text(tmp_path):
    (tmp_path / "n.txt").write_text("hello")
    cfg = DataConfig(path=str(tmp_path / "n.txt"), format="classification", label_words=["a"])
    with pytest.raises(SlimtuneError, match=r"unknown extension '.txt' for format classification"):
        load_splits(cfg, TOK)


# ---------------------------------------------------------------------------------------------
# 3. data.chat_template
# ---------------------------------------------------------------------------------------------

BRACKETS = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
MSGS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def bare_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = None  # like a Gemma GGUF tokenizer
    return tok


def messages_cfg(tmp_path: Path, **kw) -> DataConfig:
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": MSGS}])
    return DataConfig(path=str(path), format="messages", **kw)


def test_missing_chat_template_says_set_it(tmp_path, cls_data):
    for cfg, key in (
        (messages_cfg(tmp_path), "data.format"),
        (
            DataConfig(
                path=str(cls_data), format="classification", label_words=["a", "b"], chat=True
            ),
            "data.chat",
        ),
    ):
        with pytest.raises(SlimtuneError) as e:
            load_splits(cfg, bare_tokenizer())
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(
            f"config: {key}: the tokenizer has no chat template"
        )
        assert "set data.chat_template" in msg


@pytest.mark.parametrize("as_file", [False, True])
def test_chat_template_string_or_file(tmp_path, as_file):
    template = BRACKETS
    if as_file:
        (tmp_path / "chat.jinja").write_text(BRACKETS)
        template = str(tmp_path / "chat.jinja")
    tok = bare_tokenizer()
    (ex,) = load_splits(messages_cfg(tmp_path, chat_template=template), tok).train
    assert TOK.decode(ex.input_ids) == "[user] hi\n[assistant] hello\n"
    assert TOK.decode(labelled(ex)) == "hello\n"
    assert tok.chat_template is None  # the tokenizer object is left as it was


def test_chat_template_replaces_the_tokenizers(tmp_path):
    (ex,) = load_splits(messages_cfg(tmp_path, chat_template=BRACKETS), TOK).train
    assert TOK.decode(ex.input_ids) == "[user] hi\n[assistant] hello\n"


def test_bad_chat_template_is_one_line(tmp_path):
    for template, words in (
        ("{% for m in messages %}oops", "data.chat_template: not a valid Jinja template (line 1"),
        (str(tmp_path / "none.jinja"), "none.jinja': no such file (give a Jinja chat template"),
    ):
        with pytest.raises(SlimtuneError) as e:
            load_splits(messages_cfg(tmp_path, chat_template=template), bare_tokenizer())
        assert "\n" not in str(e.value) and words in str(e.value), str(e.value)


def test_long_conversation_drops_its_oldest_exchanges_first(tmp_path):
    """The system message and the last exchange stay (samples prompt up to the last assistant
    turn); whole exchanges go from the front until the conversation fits."""
    msgs = [{"role": "system", "content": "Be brief."}]
    for k in range(3):
        msgs += [
            {"role": "user", "content": f"q{k} " * 8},
            {"role": "assistant", "content": f"a{k}"},
        ]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}])
    tokenise = Tokenise(TOK, DataConfig(path=str(path), format="messages"))
    full = tokenise(Pair(None, msgs))
    last_two = tokenise(Pair(None, msgs[:1] + msgs[3:]))
    last_one = tokenise(Pair(None, msgs[:1] + msgs[5:]))
    assert len(last_one.input_ids) < len(last_two.input_ids) < len(full.input_ids)
    cfg = DataConfig(path=str(path), format="messages", max_seq_len=len(last_two.input_ids))
    splits = load_splits(cfg, TOK)
    (ex,) = splits.train
    assert ex.input_ids == last_two.input_ids and ex.labels == last_two.labels
    cut = len(full.input_ids) - len(last_two.input_ids)
    assert splits.truncation.line().endswith(
        f"oldest turns dropped (median {cut}, max {cut} tokens cut)"
    )
    # one token short of the last exchange: nothing left to drop, so its end is cut
    cfg = DataConfig(path=str(path), format="messages", max_seq_len=len(last_one.input_ids) - 1)
    splits = load_splits(cfg, TOK)
    assert splits.truncation.train.tokens_cut.keys() == {"end"}
    # truncate: prompt_start keeps the old cut (the conversation's end)
    cfg = DataConfig(
        path=str(path), format="messages", max_seq_len=len(last_two.input_ids),
        truncate="prompt_start",
    )  # fmt: skip
    assert load_splits(cfg, TOK).train[0].input_ids == full.input_ids[: cfg.max_seq_len]


def test_a_run_saves_the_chat_template_it_trained_with(tmp_path):
    from transformers import AutoTokenizer

    from slimtune.loop import train

    from .conftest import tiny_recipe

    rows = [{"messages": MSGS}] * 8
    recipe = tiny_recipe(
        write_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "run", train={"steps": 1}
    )
    recipe["data"] = {"path": str(tmp_path / "m.jsonl"), "format": "messages",
                      "chat_template": BRACKETS}  # fmt: skip
    recipe["params"] = {"name": "lora", "r": 2}
    train(config.from_dict(recipe))
    assert AutoTokenizer.from_pretrained(tmp_path / "run").chat_template == BRACKETS
