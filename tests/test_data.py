from __future__ import annotations

import json

import datasets
import pytest

from slimtune.config import DataConfig
from slimtune.data import IGNORE, collate, index_stream, load_splits, read_records
from slimtune.errors import SlimtuneError
from slimtune.models import tiny_tokenizer

from .conftest import REVIEWS, write_jsonl

TOK = tiny_tokenizer()


def labelled(ex):
    return [t for t, y in zip(ex.input_ids, ex.labels) if y != IGNORE]


def test_classification_masks_prompt_and_keeps_choices(cls_data):
    cfg = DataConfig(path=str(cls_data), format="classification", label_words=["neg", "pos"])
    ex = load_splits(cfg, TOK).train[0]
    assert TOK.decode(labelled(ex)) in (" neg</s>", " pos</s>")
    assert [TOK.decode(c) for c in ex.choice_ids] == [" neg", " pos"]
    assert ex.input_ids[: len(ex.prompt_ids)] == ex.prompt_ids


def test_chat_classification_uses_template(cls_data):
    cfg = DataConfig(
        path=str(cls_data),
        format="classification",
        label_words=["no", "yes"],
        chat=True,
        system="be brief",
    )
    ex = load_splits(cfg, TOK).train[0]
    prompt = TOK.decode(ex.prompt_ids)
    assert prompt.startswith("<|system|>be brief</s><|user|>") and prompt.endswith("<|assistant|>")


def test_alpaca_with_and_without_input(tmp_path):
    rows = [
        {"instruction": "add", "input": "2 and 3", "output": "5"},
        {"instruction": "say hi", "output": "hi"},
    ]
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl", rows)), format="alpaca", seed=1)
    exs = load_splits(cfg, TOK).train
    texts = sorted(TOK.decode(e.prompt_ids) for e in exs)
    assert "### Input:\n2 and 3" in texts[0] and "### Input" not in texts[1]
    assert sorted(TOK.decode(labelled(e)) for e in exs) == ["5</s>", "hi</s>"]


def test_messages_learn_only_assistant_turns(tmp_path):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see you"},
    ]
    cfg = DataConfig(
        path=str(write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}])), format="messages"
    )
    ex = load_splits(cfg, TOK).train[0]
    assert TOK.decode(labelled(ex)) == "hello</s>see you</s>"


def test_text_blocks_and_packing(text_data):
    plain = load_splits(DataConfig(path=str(text_data), max_seq_len=64), TOK).train
    assert all(len(e.input_ids) <= 64 for e in plain)
    packed = load_splits(DataConfig(path=str(text_data), max_seq_len=64, packing=True), TOK).train
    # packing places the same blocks, whole and in order, into fewer rows of at most 64
    assert all(len(e.input_ids) <= 64 for e in packed)
    assert [t for e in packed for t in e.input_ids] == [t for e in plain for t in e.input_ids]
    assert len(packed) < len(plain)
    starts = sum(e.positions.count(0) for e in packed)
    assert starts == len(plain)  # each block restarts its positions


def test_truncation_drops_prompt_start_not_response(cls_data):
    cfg = DataConfig(
        path=str(cls_data), format="classification", label_words=["neg", "pos"], max_seq_len=12
    )
    for ex in load_splits(cfg, TOK).train:
        assert len(ex.input_ids) == 12
        assert TOK.decode(labelled(ex)) in (" neg</s>", " pos</s>")


def test_preference_keeps_rejected(tmp_path):
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "p.jsonl", rows)), format="preference")
    ex = load_splits(cfg, TOK).train[0]
    assert TOK.decode(labelled(ex)) == "4</s>" and TOK.decode(ex.rejected_ids) == "5</s>"


def test_split_is_deterministic_and_disjoint(cls_data):
    cfg = DataConfig(
        path=str(cls_data), format="classification", label_words=["n", "p"], eval_size=0.25
    )
    a, b = load_splits(cfg, TOK), load_splits(cfg, TOK)
    assert [e.input_ids for e in a.train] == [e.input_ids for e in b.train]
    assert len(a.eval) == 4 and len(a.train) == len(REVIEWS) - 4
    assert not {tuple(e.input_ids) for e in a.eval} & {tuple(e.input_ids) for e in a.train}


def test_readers_agree(tmp_path):
    rows = [{"text": t, "label": y} for t, y in REVIEWS[:5]]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with (tmp_path / "d.csv").open("w") as f:
        f.write("text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    write_jsonl(tmp_path / "d.jsonl", rows)
    want = [r["text"] for r in rows]
    for name in ("d.json", "d.csv", "d.parquet", "saved", "d.jsonl"):
        assert [r.row["text"] for r in read_records(str(tmp_path / name))] == want, name
    assert [r.row["text"] for r in read_records(str(tmp_path / "dict"), "train")] == want


def test_collate_pads_right_and_masks():
    from slimtune.data import Example

    b = collate([Example([5, 6, 7], [5, 6, 7]), Example([8], [8])], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [8, IGNORE, IGNORE]]


def test_index_stream_resumes_exactly():
    full = [x for _, x in zip(range(50), index_stream(7, seed=3))]
    tail = [x for _, x in zip(range(30), index_stream(7, seed=3, start=20))]
    assert full[20:] == tail
    assert sorted(full[:7]) == list(range(7)) and full[:7] != full[7:14]


def test_missing_column_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"sentence": "hi", "label": 0}])
    cfg = DataConfig(path=str(path), format="classification", label_words=["a", "b"])
    with pytest.raises(SlimtuneError, match=r"line 1: missing column 'text'.*data.columns.text"):
        load_splits(cfg, TOK)
