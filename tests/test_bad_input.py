"""Malformed input of every kind ends in exactly one line on stderr that names the field, file
or line, exit code 2, no traceback, and nothing created or changed on disk.

The table is generated from the recipe's dataclasses and the method registry (every numeric
field of the recipe and of each method's options: a wrong type, an out-of-range value, nan and
inf for floats), then extended by hand with damaged files (checkpoints, model weights, GGUF,
adapters, truncated at several offsets; a checkpoint pickle that would run code), unreadable
and unwritable paths, a non-UTF-8 recipe and misspelt settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from slimtune import config, registry
from slimtune.cli import main

from .conftest import REVIEWS, tiny_recipe, write_jsonl

# --------------------------------------------------------------------------------------------
# The check every case makes
# --------------------------------------------------------------------------------------------


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file (size, mtime) and every directory under ``roots``: what 'unchanged' means."""
    out: dict[str, tuple[int, int]] = {}
    for root in roots:
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                out[os.path.join(dirpath, d)] = (-1, -1)
            for f in filenames:
                st = os.stat(os.path.join(dirpath, f))
                out[os.path.join(dirpath, f)] = (st.st_size, st.st_mtime_ns)
    return out


def assert_one_line_exit_2(capsys, argv: list[str], names: list[str], roots: list[Path]) -> str:
    before = snapshot(*roots)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.startswith("slimtune: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in err, (name, err)
    assert snapshot(*roots) == before, "the failed run created or changed files"
    return err


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "reviews.jsonl", [{"text": t, "label": y} for t, y in REVIEWS])


def recipe_file(tmp_path: Path, data_path: Path, **sections) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(data_path, tmp_path / "out", **sections)))
    return path


# --------------------------------------------------------------------------------------------
# 1. Every numeric field of the recipe and of every method's options
# --------------------------------------------------------------------------------------------

# Out-of-range values of the recipe's numeric fields (one each; type errors are generated).
RECIPE_RANGE = {
    "train.steps": -1,
    "train.epochs": 0,
    "train.batch_size": 0,
    "train.grad_accum": 0,
    "train.warmup_steps": -1,
    "train.max_grad_norm": -1.0,
    "train.loss_chunk_tokens": 0,
    "train.eval_every": -1,
    "train.save_every": -1,
    "train.keep_checkpoints": 0,
    "train.log_every": 0,
    "train.seed": -1,
    "data.max_seq_len": 1,
    "data.eval_size": -0.5,
    "data.limit": 0,
    "data.seed": 2**32,
    "eval.batch_size": 0,
    "eval.max_examples": 0,
    "eval.generate": -1,
    "eval.max_new_tokens": 0,
    "federated.round_timeout": -1.0,
    "federated.clip": -1.0,
    "federated.server_lr": 0.0,
    "federated.cpus_per_client": 0.0,
    "federated.seed": -1,
}

# Out-of-range values of method options, by field name (per method where the same name differs).
OPTION_RANGE: dict[str, object] = {
    "r": 0,
    "alpha": 0.0,
    "dropout": 1.0,
    "pissa_niter": -1,
    "loftq_bits": 3,
    "calibration_examples": 0,
    "layers": 0,
    "interval": 0,
    "threshold": 0.0,
    "num_virtual_tokens": 0,
    "o_ratio": 0.0,
    "down_ratio": 1.5,
    "density": 0.0,
    "update_every": 0,
    "drop_fraction": 2.0,
    "grow_window": 0,
    "reselect_every": -1,
    "lr": -1e-4,
    "weight_decay": -0.1,
    "betas": [0.9],
    "eps": 0.0,
    "samples": 0,
    "mask_ratio": 1.0,
    "seed": -1,
    "pool_bits": 5,
    "rank": 0,
    "update_gap": 0,
    "scale": 0.0,
    "history": 0,
    "damping": 0.0,
    "momentum": 1.0,
    "sparsity": 1.0,
    "adam_eps": 0.0,
}
OPTION_RANGE_BY_METHOD = {
    ("freeze", "layers"): [99],  # out of range for the 2-block model
    ("int8", "threshold"): -1.0,  # 0 is valid for LLM.int8 (no outlier split)
}
MODEL_CHECKED = {("freeze", "layers")}  # range checked against the loaded model, below

NUMERIC = (int, float, list[int], list[float], int | None, float | None)


def _numeric_fields(cls: type) -> list[tuple[str, typing.Any]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls) if hints[f.name] in NUMERIC]


def _bad_values(tp: typing.Any, out_of_range: object | None) -> list[tuple[str, object]]:
    wrong_type = "[many]" if typing.get_origin(tp) is list else "many"
    cases = [("type", wrong_type)]
    if out_of_range is not None:
        cases.append(("range", out_of_range))
    if float in (tp, *typing.get_args(tp)):
        cases += [("nan", ".nan"), ("inf", ".inf"), ("-inf", "-.inf")]
    return cases


def _yaml(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)  # JSON is YAML


def field_cases() -> list[tuple[str, list[str], list[str]]]:
    """(case id, overrides, names the error must contain)."""
    cases = []
    sections = {
        "train": config.TrainConfig,
        "data": config.DataConfig,
        "eval": config.EvalConfig,
        "federated": config.FederatedConfig,
    }
    for section, cls in sections.items():
        for name, tp in _numeric_fields(cls):
            key = f"{section}.{name}"
            for kind, value in _bad_values(tp, RECIPE_RANGE.get(key)):
                cases.append((f"{key}:{kind}", [f"{key}={_yaml(value)}"], [key]))
    for axis in registry.AXES:
        for method in registry.names(axis):
            for name, tp in _numeric_fields(registry.get(axis, method).Config):
                bad = OPTION_RANGE_BY_METHOD.get((method, name), OPTION_RANGE.get(name))
                for kind, value in _bad_values(tp, bad):
                    if (method, name) in MODEL_CHECKED and kind == "range":
                        continue  # checked against the model below (needs its block count)
                    overrides = [f"{axis}={method}", f"{axis}.{name}={_yaml(value)}"]
                    cases.append((f"{axis}={method}.{name}:{kind}", overrides, [axis, name]))
    return cases


FIELD_CASES = field_cases()


def test_the_table_covers_every_numeric_field():
    assert len(FIELD_CASES) >= 200, len(FIELD_CASES)
    for key in RECIPE_RANGE:
        assert any(c[0] == f"{key}:range" for c in FIELD_CASES), key


@pytest.mark.parametrize("case", FIELD_CASES, ids=[c[0] for c in FIELD_CASES])
def test_bad_field(tmp_path, data, capsys, case):
    _, overrides, names = case
    recipe = recipe_file(tmp_path, data)
    assert_one_line_exit_2(capsys, ["train", str(recipe), *overrides], names, [tmp_path])


# --------------------------------------------------------------------------------------------
# 2. Recipes, settings and paths
# --------------------------------------------------------------------------------------------


def _recipe_cases(tmp_path: Path, data: Path) -> dict[str, tuple[list[str], list[str]]]:
    good = recipe_file(tmp_path, data)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(good.read_bytes() + "# caf\xe9\n".encode("latin-1"))
    listed = tmp_path / "list.yaml"
    listed.write_text("- train\n- steps\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  steps: [3\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    no_config = tmp_path / "no-config-model"
    no_config.mkdir()
    latin1_data = tmp_path / "latin1.jsonl"
    latin1_data.write_bytes('{"text": "caf\xe9", "label": 1}\n'.encode("latin-1"))
    r = str(good)
    return {
        "non-UTF-8 recipe": ([str(latin1)], ["latin1.yaml", "line", "UTF-8"]),
        "recipe is a list": ([str(listed)], ["list.yaml", "mapping"]),
        "recipe YAML syntax": ([str(bad_yaml)], ["bad.yaml", "line"]),
        "recipe is a directory": ([str(tmp_path)], [str(tmp_path)]),
        "unknown top-level key": ([r, "trian.steps=3"], ["top level", "trian", "train"]),
        "misspelt report_to": (
            [r, "train.report_to=[tensorbord]"],
            ["train.report_to", "tensorboard"],
        ),
        "unknown bool": ([r, "train.progress=maybe"], ["train.progress"]),
        "betas too long": ([r, "optimizer.betas=[0.9,0.99,0.999]"], ["optimizer", "betas"]),
        "unknown option for the chosen method": (
            [r, "params=full", "params.r=4"],
            ["params", "'r'"],
        ),
        "option given before the method": (
            [r, "params.rank=4", "params=lora"],
            ["params", "'rank'"],
        ),
        "empty override key": ([r, "train..steps=3"], ["train..steps=3"]),
        "output_dir under a file": ([r, f"output_dir={a_file}/run"], ["output_dir", "a-file"]),
        "output_dir on a read-only filesystem": (
            [r, "output_dir=/proc/slimtune-test/run"],
            ["output_dir", "/proc/slimtune-test/run"],
        ),
        "output_dir is a file": ([r, f"output_dir={a_file}"], ["output_dir", "a-file"]),
        "model dir without config.json": ([r, f"model.name={no_config}"], ["model", "config.json"]),
        "missing eval_path": ([r, f"data.eval_path={tmp_path}/none.jsonl"], ["none.jsonl"]),
        "data path is a directory without data": ([r, f"data.path={no_config}"], ["data"]),
        "non-UTF-8 data": ([r, f"data.path={latin1_data}"], ["latin1.jsonl"]),
        "prefix tuning with checkpointing": (
            [r, "params=prefix-tuning", "train.gradient_checkpointing=true"],
            ["prefix-tuning", "train.gradient_checkpointing"],
        ),
        "resume without checkpoint": ([r, "resume=true"], ["resume", "checkpoint"]),
    }


def _recipe_case_names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d)
        return sorted(_recipe_cases(path, write_jsonl(path / "d.jsonl", [{"text": "a"}])))


@pytest.mark.parametrize("case", _recipe_case_names())
def test_bad_recipe_or_path(tmp_path, data, capsys, case):
    argv, names = _recipe_cases(tmp_path, data)[case]
    assert_one_line_exit_2(capsys, ["train", *argv], names, [tmp_path])


def test_tracker_not_installed(tmp_path, data, capsys):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(getattr(x, "value", x)) for x in get_available_trackers()}
    missing = [n for n in LOGGER_TYPE_TO_CLASS if n not in available]
    assert missing, "every accelerate tracker is installed here"
    recipe = recipe_file(tmp_path, data)
    argv = ["train", str(recipe), f"train.report_to=[{missing[0]}]"]
    assert_one_line_exit_2(capsys, argv, ["train.report_to", missing[0]], [tmp_path])


# --------------------------------------------------------------------------------------------
# 3. Damaged files: checkpoints, model weights, GGUF, adapters
# --------------------------------------------------------------------------------------------

OFFSETS = (0, 7, 0.5)  # empty, inside the header, half the data (a fraction of the size)


def _truncate(path: Path, offset: float) -> None:
    size = path.stat().st_size
    keep = int(size * offset) if isinstance(offset, float) else offset
    with path.open("r+b") as f:
        f.truncate(keep)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished LoRA run with checkpoints at steps 1 and 2 (copied by each case)."""
    from slimtune.loop import train

    root = tmp_path_factory.mktemp("finished")
    rows = [{"text": t, "label": y} for t, y in REVIEWS]
    data = write_jsonl(root / "reviews.jsonl", rows)
    recipe = tiny_recipe(
        data,
        root / "run",
        params={"name": "lora", "r": 4},
        train={"steps": 2, "save_every": 1, "progress": False, "eval_before": False},
    )
    train(config.from_dict(recipe))
    return root / "run"


def _copy_run(finished_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    # The copy must read its data from this case's directory, not the fixture's.
    shutil.copy(finished_run.parent / "reviews.jsonl", tmp_path / "reviews.jsonl")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["path"] = str(tmp_path / "reviews.jsonl")
    cfg["output_dir"] = str(run)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run


CKPT_FILES = ["trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"]


@pytest.mark.parametrize("offset", OFFSETS, ids=["empty", "header", "half"])
@pytest.mark.parametrize("name", CKPT_FILES)
def test_damaged_checkpoint_file(tmp_path, capsys, finished_run, name, offset):
    run = _copy_run(finished_run, tmp_path)
    last = sorted((run / "checkpoints").iterdir())[-1]
    _truncate(last / name, offset)
    argv = ["train", str(run / "config.yaml"), "resume=true", "train.steps=3"]
    argv.append("resume_changes=[train.steps]")
    assert_one_line_exit_2(capsys, argv, [f"{last / name}", "resume"], [tmp_path])


class _Payload:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng.pt"])
def test_checkpoint_pickle_is_refused_unrun(tmp_path, capsys, finished_run, name):
    import torch

    run = _copy_run(finished_run, tmp_path)
    last = sorted((run / "checkpoints").iterdir())[-1]
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(str(marker))}, last / name)
    argv = ["train", str(run / "config.yaml"), "resume=true"]
    assert_one_line_exit_2(capsys, argv, [name, "refused"], [tmp_path])
    assert not marker.exists()


@pytest.mark.parametrize("offset", OFFSETS, ids=["empty", "header", "half"])
@pytest.mark.parametrize("artefact", ["adapter_model.safetensors", "adapter_config.json"])
@pytest.mark.parametrize("command", ["eval", "merge"])
def test_damaged_adapter(tmp_path, capsys, finished_run, artefact, offset, command):
    run = _copy_run(finished_run, tmp_path)
    _truncate(run / artefact, offset)
    argv = [command, str(run)] + ([str(tmp_path / "merged")] if command == "merge" else [])
    assert_one_line_exit_2(capsys, argv, [str(run)], [tmp_path])
    assert not (tmp_path / "merged").exists()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    from slimtune.models import load_model

    out = tmp_path_factory.mktemp("model") / "tiny"
    model, tok = load_model("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("offset", OFFSETS, ids=["empty", "header", "half"])
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_damaged_model_directory(tmp_path, data, capsys, saved_model, name, offset):
    model_dir = tmp_path / "model"
    shutil.copytree(saved_model, model_dir)
    _truncate(model_dir / name, offset)
    recipe = recipe_file(tmp_path, data)
    argv = ["train", str(recipe), f"model.name={model_dir}"]
    assert_one_line_exit_2(capsys, argv, ["model", str(model_dir)], [tmp_path])


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    """A valid GGUF container (header, metadata, two tensors) written by the gguf package."""
    import gguf
    import numpy as np

    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((8, 4), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "offset", [0, 3, 40, 0.5, -40], ids=["empty", "magic", "kv", "half", "tail"]
)
def test_damaged_gguf(tmp_path, data, capsys, monkeypatch, small_gguf, offset):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    shutil.copy(small_gguf, path)
    _truncate(path, offset if offset >= 0 else path.stat().st_size + offset)
    recipe = recipe_file(tmp_path, data)
    argv = ["train", str(recipe), f"model.name={path}"]
    assert_one_line_exit_2(capsys, argv, ["model", "model.gguf"], [tmp_path])


def test_not_a_gguf(tmp_path, data, capsys, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    recipe = recipe_file(tmp_path, data)
    argv = ["train", str(recipe), f"model.name={path}"]
    assert_one_line_exit_2(capsys, argv, ["model.gguf", "not a GGUF"], [tmp_path])


# --------------------------------------------------------------------------------------------
# 4. The same promise from a real process (the in-process cases cannot see stray stderr)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, name",
    [(["optimizer.lr=.nan"], "optimizer.lr"), (["train.report_to=[wandbb]"], "train.report_to")],
)
def test_subprocess_one_line(tmp_path, data, overrides, name):
    recipe = recipe_file(tmp_path, data)
    before = snapshot(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "slimtune", "train", str(recipe), *overrides],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0], proc.stderr
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> Path:
    """The same 16 reviews as JSONL, JSON, CSV, Parquet and a datasets.save_to_disk directory."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("data")
    rows = [{"text": t, "label": y} for t, y in REVIEWS]
    write_jsonl(root / "d.jsonl", rows)
    (root / "d.json").write_text(json.dumps(rows))
    (root / "d.csv").write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in REVIEWS))
    pq.write_table(pa.Table.from_pylist(rows), root / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(root / "saved"))
    return root


DATA_DAMAGE = {
    "jsonl cut inside a record": ("d.jsonl", 0.5, "line"),
    "json cut": ("d.json", 0.5, "line 1"),
    "json empty": ("d.json", 0, "line 1"),
    "parquet empty": ("d.parquet", 0, "Parquet"),
    "parquet header only": ("d.parquet", 7, "Parquet"),
    "parquet cut": ("d.parquet", 0.5, "Parquet"),
    "saved dataset arrow cut": ("saved", 0.5, "saved dataset"),
    "saved dataset info corrupt": ("saved/dataset_info.json", 3, "saved dataset"),
}


@pytest.mark.parametrize("case", sorted(DATA_DAMAGE))
def test_damaged_data_file(tmp_path, capsys, data_files, case):
    name, offset, words = DATA_DAMAGE[case]
    shutil.copytree(data_files, tmp_path / "data")
    target = tmp_path / "data" / name
    if target.is_dir():  # the Arrow file of a saved dataset
        target = next(target.glob("*.arrow"))
    _truncate(target, offset)
    data_path = tmp_path / "data" / name.split("/")[0]
    recipe = recipe_file(tmp_path, data_path, data={"eval_size": 0})
    err = assert_one_line_exit_2(capsys, ["train", str(recipe)], [words], [tmp_path])
    assert name.split("/")[0] in err
