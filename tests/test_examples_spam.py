"""examples/spam_assassin.py (the README walkthrough's converter) on a tarball laid out like the
npm package, and its JSONL through slimtune's classification reader."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

from slimtune import config
from slimtune.data import load_splits
from slimtune.models import load_model

ROOT = Path(__file__).parents[1]

HAM = "From: a@b.c\nSubject: Lunch?\nContent-Type: text/plain\n\nShall we meet at noon?\n"
SPAM = (
    "From: x@y.z\nSubject: WIN BIG\nMIME-Version: 1.0\n"
    'Content-Type: multipart/alternative; boundary="B"\n\n--B\nContent-Type: text/html\n\n'
    "<p>Claim your <b>prize</b> &amp; more</p>\n--B--\n"
)


def _converter():
    spec = importlib.util.spec_from_file_location(
        "spam_assassin", ROOT / "examples/spam_assassin.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tarball(path: Path) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in [("easy-ham-1/00001.a.txt", HAM), ("spam-1/00001.b.txt", SPAM)]:
            data = text.encode("latin-1")
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_converter_writes_subject_and_plain_body_with_0_1_labels(tmp_path):
    _tarball(tmp_path / "spam.tgz")
    assert _converter().main([str(tmp_path / "spam.tgz"), str(tmp_path / "spam.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "spam.jsonl").read_text().splitlines()]
    assert rows == [
        {"text": "Subject: Lunch? Shall we meet at noon?", "label": 0},
        {"text": "Subject: WIN BIG Claim your prize & more", "label": 1},
    ]


def test_converter_refuses_a_missing_tarball_in_one_line(tmp_path, capsys):
    assert _converter().main([str(tmp_path / "none.tgz"), str(tmp_path / "x.jsonl")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "x.jsonl").exists()


def test_the_walkthrough_recipe_reads_the_converted_data(tmp_path):
    _tarball(tmp_path / "spam.tgz")
    _converter().main([str(tmp_path / "spam.tgz"), str(tmp_path / "spam.jsonl")])
    cfg = config.load(
        ROOT / "examples/lora-spam.yaml",
        [f"data.path={tmp_path / 'spam.jsonl'}", "data.eval_size=0", "model.name=tiny-llama"],
    )
    _, tok = load_model("tiny-llama")
    examples = load_splits(cfg.data, tok).train
    assert sorted(ex.answer for ex in examples) == [0, 1]
