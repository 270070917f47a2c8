"""The CLI: bad input gives one line naming the problem and exit code 2, never a traceback,
and nothing is written to the output directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slimtune.cli import main

from .conftest import tiny_recipe, write_jsonl


def recipe_file(tmp_path: Path, data_path: Path, **sections) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(data_path, tmp_path / "out", **sections)))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


BAD = {
    "unknown key": (
        ["train.stepz=3"],
        "config: train: unknown key 'stepz' (did you mean 'steps'?)",
    ),
    "wrong type": (
        ["train.batch_size=many"],
        "config: train.batch_size: expected an integer, got 'many'",
    ),
    "bad choice": (
        ["train.schedule=exp"],
        "config: train.schedule: expected one of 'cosine', 'linear', 'constant'",
    ),
    "unknown method": (["params=lorra"], "params: unknown method 'lorra' (did you mean 'lora'?)"),
    "unknown method option": (
        ["params.name=lora", "params.rank=4"],
        "config: params: unknown key 'rank'; allowed keys: r, alpha",
    ),
    "negative value": (["train.batch_size=-1"], "config: train.batch_size: must be >= 1, got -1"),
    "missing data file": (
        ["data.path=/nonexistent/train.jsonl"],
        "data: '/nonexistent/train.jsonl': no such file or directory",
    ),
    "unreadable model path": (
        ["model.name=/nonexistent/model"],
        "model: '/nonexistent/model': not a model directory",
    ),
    "unknown extension": (["data.path=notes.txt"], "unknown extension '.txt'"),
    "bad override syntax": (["train.steps"], "override 'train.steps': expected key=value"),
    "bad optimizer state bits": (
        ["optimizer.name=galore", "optimizer.state_bits=4"],
        "config: optimizer.state_bits: expected one of 8, 32, got 4",
    ),
    "layerwise with fp16 loss scaling": (
        ["optimizer.name=galore", "optimizer.layerwise=true", "train.mixed_precision=fp16"],
        "optimizer: galore: layerwise updates cannot be combined with train.mixed_precision=fp16",
    ),
    "out-of-range layer": (
        ["params.name=freeze", "params.layers=[5]"],
        "config: params.layers: 5 is out of range for 2 blocks",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_one_line_exit_2(tmp_path, cls_data, capsys, case):
    overrides, message = BAD[case]
    if case == "unknown extension":
        (tmp_path / "notes.txt").write_text("x")
        overrides = [f"data.path={tmp_path / 'notes.txt'}"]
    code, err = run_cli(capsys, "train", str(recipe_file(tmp_path, cls_data)), *overrides)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("slimtune: error: "), err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def bad_data_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"text": "ok", "label": 0}\n{"text": "ok", "label": 1}\n{"text": oops}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    columns = write_jsonl(tmp_path / "columns.jsonl", [{"review": "good", "label": 1}] * 8)
    label = write_jsonl(
        tmp_path / "label.jsonl", [{"text": "good", "label": 1}] * 7 + [{"text": "x", "label": 7}]
    )
    csv = tmp_path / "short.csv"
    csv.write_text("text,label\ngood,1\nbad\n")
    return {
        "malformed line": (malformed, "malformed.jsonl' line 3: invalid JSON"),
        "empty dataset": (empty, "empty.jsonl': no records (empty dataset)"),
        "wrong columns": (
            columns,
            "line 1: missing column 'text' (format classification; columns present: review, label",
        ),
        "label out of range": (
            label,
            "line 8: label 7 is neither an index below 2 nor one of ['negative', 'positive']",
        ),
        "csv field count": (csv, "short.csv' line 3: 1 fields, header has 2"),
    }


@pytest.mark.parametrize(
    "case",
    ["malformed line", "empty dataset", "wrong columns", "label out of range", "csv field count"],
)
def test_bad_data_one_line_exit_2(tmp_path, capsys, case):
    data, message = bad_data_cases(tmp_path)[case]
    recipe = recipe_file(tmp_path, data, data={"eval_size": 0, "seed": 0})
    code, err = run_cli(capsys, "train", str(recipe))
    assert code == 2 and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_bad_yaml_names_the_line(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name: tiny-llama\ntrain: [steps: 3\n")
    code, err = run_cli(capsys, "train", str(path))
    assert code == 2 and f"recipe '{path}' line" in err and err.count("\n") == 1


def test_missing_recipe(tmp_path, capsys):
    code, err = run_cli(capsys, "train", str(tmp_path / "nope.yaml"))
    assert code == 2 and "no such file" in err


def test_non_empty_output_dir_untouched(tmp_path, cls_data, capsys):
    recipe = recipe_file(tmp_path, cls_data)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    code, err = run_cli(capsys, "train", str(recipe))
    assert code == 2 and "is not empty; set resume=true" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_subprocess_shows_no_traceback(tmp_path, cls_data):
    recipe = recipe_file(tmp_path, cls_data)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "slimtune",
            "train",
            str(recipe),
            "params.r=4",
            "params.name=lora",
            "data.path=/no/such.jsonl",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1]
        == "slimtune: error: data: '/no/such.jsonl': no such file or directory"
    )
    assert "Traceback" not in proc.stderr


def test_nan_loss_exit_1_with_message(tmp_path, cls_data, capsys):
    recipe = recipe_file(
        tmp_path,
        cls_data,
        optimizer={"name": "sgd", "lr": 1e30},
        train={"steps": 5, "save_every": 1, "max_grad_norm": 0, "progress": False},
    )
    code, err = run_cli(capsys, "train", str(recipe))
    assert code == 1 and "training stopped at step" in err and "last good checkpoint" in err


def test_train_eval_merge_methods_end_to_end(tmp_path, cls_data, capsys):
    recipe = recipe_file(tmp_path, cls_data, params={"name": "lora", "r": 4})
    assert main(["train", str(recipe), "train.steps=2"]) == 0
    out = capsys.readouterr().out
    assert "held-out" in out and "run directory" in out
    assert main(["eval", str(tmp_path / "out")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"accuracy", "loss", "perplexity", "examples"} <= set(metrics)
    assert main(["merge", str(tmp_path / "out"), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "lora" in listing and "Rank of the update." in listing and "adamw" in listing


def test_every_shipped_recipe_validates():
    from importlib.resources import files

    from slimtune import config

    root = Path(__file__).parents[1]
    recipes = [
        Path(str(files("slimtune").joinpath("recipes/demo.yaml"))),
        *sorted((root / "examples").glob("*.yaml")),
    ]
    assert len(recipes) > 1
    for path in recipes:
        config.load(path)  # raises SlimtuneError on any unknown key or bad value


def test_eval_and_merge_load_the_model_as_the_recipe_says(tmp_path, cls_data, capsys, monkeypatch):
    """model.attn_implementation and model.trust_remote_code reach from_pretrained in
    ``slimtune eval`` (run directory or recipe) and ``slimtune merge``, as in training."""
    from transformers import AutoModelForCausalLM

    from slimtune.models import tiny_llama, tiny_tokenizer

    base = tmp_path / "base"
    tok = tiny_tokenizer()
    tiny_llama(vocab_size=len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    model = {"name": str(base), "attn_implementation": "eager", "trust_remote_code": True}
    recipe = recipe_file(tmp_path, cls_data, model=model, params={"name": "lora", "r": 2})
    assert main(["train", str(recipe), "train.steps=1"]) == 0
    loads = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(source, *args, **kwargs):
        loads.append(kwargs)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    assert main(["eval", str(tmp_path / "out")]) == 0
    assert main(["eval", str(recipe)]) == 0
    assert main(["merge", str(tmp_path / "out"), str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert len(loads) == 3
    for kwargs in loads:
        assert kwargs["attn_implementation"] == "eager" and kwargs["trust_remote_code"] is True


def test_import_and_help_stay_light():
    """``import slimtune`` and building the CLI import neither torch nor transformers (they take
    seconds); ``slimtune.bench`` does not import the CLI (no import cycle)."""
    code = (
        "import sys, slimtune, slimtune.bench, slimtune.plan\n"
        "assert 'slimtune.cli' not in sys.modules\n"
        "from slimtune.cli import build_parser\n"
        "build_parser()\n"
        "heavy = {'torch', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert callable(slimtune.load_model) and 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
