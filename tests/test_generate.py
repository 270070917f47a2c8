"""slimtune generate and chat (issue 22): a prompts file in, JSONL out (greedy equals the
model's own greedy decoding, sampling is seeded per prompt); chat reads stdin, streams each
reply, /reset starts over; both on adapters, merged adapters and prompt-learning models."""

from __future__ import annotations

import io
import json

import pytest
import torch

from slimtune import config
from slimtune.cli import main
from slimtune.generate import Generator, Sampling, chat_loop, read_prompts
from slimtune.loop import train

from .conftest import REVIEWS, tiny_recipe, write_jsonl


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished tiny runs: LoRA and prompt tuning, trained on chat prompts."""
    root = tmp_path_factory.mktemp("runs")
    data = write_jsonl(root / "r.jsonl", [{"text": t, "label": y} for t, y in REVIEWS])
    out = {}
    for name, params in {
        "lora": {"name": "lora", "r": 4},
        "prompt": {"name": "prompt-tuning", "num_virtual_tokens": 4},
    }.items():
        recipe = tiny_recipe(
            data, root / name, params=params, data={"chat": True}, train={"steps": 2}
        )
        out[name] = train(config.from_dict(recipe))
    return out


def prompts_file(tmp_path, kind="txt"):
    if kind == "txt":
        path = tmp_path / "p.txt"
        path.write_text("a wonderful film\n\nthe worst script\n")
        return path
    rows = [
        {"prompt": "a joy to watch"},
        {"messages": [{"role": "user", "content": "flat jokes"}]},
    ]
    return write_jsonl(tmp_path / "p.jsonl", rows)


def test_generate_writes_one_json_line_per_prompt_equal_to_greedy(runs, tmp_path, capsys):
    run = runs["lora"]
    out = tmp_path / "out.jsonl"
    args = [str(run.run_dir), "--prompts", str(prompts_file(tmp_path)), "--out", str(out)]
    assert main(["generate", *args, "--max-new-tokens", "6"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a wonderful film", "the worst script"]
    assert "2 prompts" in capsys.readouterr().err
    # the same as the trained model's own greedy decoding of the chat-wrapped prompt
    gen = Generator(run.model, run.tokenizer, run_cfg(run).data, None)
    ids = gen.encode("a wonderful film")
    x = torch.tensor([ids])
    want = run.model.generate(
        input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False
    )[0, len(ids) :].tolist()
    assert rows[0]["completion"] == gen.decode(gen._trim(want))
    # greedy does not depend on the batch: one at a time gives the same lines
    out1 = tmp_path / "one.jsonl"
    args1 = [str(run.run_dir), "--prompts", str(prompts_file(tmp_path)), "--out", str(out1)]
    assert main(["generate", *args1, "--max-new-tokens", "6", "--batch-size", "1"]) == 0
    assert out1.read_text() == out.read_text()


def run_cfg(run):
    return config.from_dict(config.read_yaml(run.run_dir / "config.yaml"))


def test_sampling_is_seeded_per_prompt_and_jsonl_prompts_take_messages(runs, tmp_path):
    run = runs["lora"]
    path = prompts_file(tmp_path, "jsonl")

    def sample(seed, out):
        args = [str(run.run_dir), "--prompts", str(path), "--out", str(out), "--sample"]
        assert main(["generate", *args, "--seed", str(seed), "--max-new-tokens", "8"]) == 0
        return [json.loads(x) for x in out.read_text().splitlines()]

    a, b = sample(1, tmp_path / "a.jsonl"), sample(1, tmp_path / "b.jsonl")
    assert a == b
    assert a[1]["prompt"] == [{"role": "user", "content": "flat jokes"}]
    c = sample(2, tmp_path / "c.jsonl")
    assert [r["completion"] for r in c] != [r["completion"] for r in a]


def test_merged_and_prompt_learning_models_generate(runs, tmp_path):
    path = prompts_file(tmp_path)
    for run, extra in ((runs["lora"], ["--merge"]), (runs["prompt"], [])):
        out = tmp_path / f"{run.run_dir.name}.jsonl"
        args = [str(run.run_dir), "--prompts", str(path), "--out", str(out), *extra]
        assert main(["generate", *args, "--max-new-tokens", "4"]) == 0
        assert len(out.read_text().splitlines()) == 2


def test_chat_streams_replies_and_reset_starts_over(runs):
    run = runs["lora"]
    gen = Generator(run.model, run.tokenizer, run_cfg(run).data, True)
    written, notes = [], []
    talks = chat_loop(
        gen,
        ["hello\n", "how are you\n", "/reset\n", "again\n", "/exit\n", "ignored\n"],
        Sampling(max_new_tokens=4),
        written.append,
        notes.append,
    )
    assert [len(t) for t in talks] == [4, 2]  # two turns, then one after /reset
    assert talks[1][0] == {"role": "user", "content": "again"}
    assert notes == ["(new conversation)"]
    # what was streamed is what the history holds
    replies = [m["content"] for t in talks for m in t if m["role"] == "assistant"]
    assert "".join(written).replace("\n", "") == "".join(replies).replace("\n", "")


def test_chat_cli_reads_stdin(runs, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/reset\nhi\n"))
    assert main(["chat", str(runs["lora"].run_dir), "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert "(new conversation)" in captured.err
    # greedy: the same first turn after /reset gives the same reply (each ends its line)
    out = captured.out
    assert out.endswith("\n") and out[: len(out) // 2] == out[len(out) // 2 :]


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"prompt": "ok"}\n{"text": 3}\n', r"p.jsonl:2: expected 'prompt'"),
        ('{"prompt": "ok"}\nnot json\n', r"p.jsonl:2: not JSON"),
        ("", "no prompt in the file"),
    ],
)
def test_bad_prompt_files_are_named_in_one_line(runs, tmp_path, capsys, content, match):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    assert main(["generate", str(runs["lora"].run_dir), "--prompts", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert pytest.importorskip("re").search(match, err)


def test_read_prompts_txt_skips_blank_lines(tmp_path):
    assert read_prompts(prompts_file(tmp_path)) == ["a wonderful film", "the worst script"]
