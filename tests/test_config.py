from __future__ import annotations

from pathlib import Path

import pytest

from slimtune import config
from slimtune.config import TrainConfig, field_docs
from slimtune.errors import SlimtuneError


def test_overrides_parse_yaml_scalars_and_nest():
    got = config.parse_overrides(["train.steps=10", "params.r=4", "data.label_words=[a, b]", "x=y"])
    assert got == {
        "train": {"steps": 10},
        "params": {"r": 4},
        "data": {"label_words": ["a", "b"]},
        "x": "y",
    }


def test_method_shorthand_and_override_merge():
    cfg = config.from_dict(
        config.merge(
            {"params": "lora", "data": {"path": "x"}}, config.parse_overrides(["params.r=4"])
        )
    )
    assert cfg.params.name == "lora" and cfg.params.r == 4
    assert cfg.optimizer.name == "adamw"


def test_float_from_yaml_string_and_int_from_float():
    cfg = config.from_dict(
        {
            "data": {"path": "x"},
            "optimizer": {"name": "adamw", "lr": "1e-4"},
            "train": {"steps": 3.0},
        }
    )
    assert cfg.optimizer.lr == 1e-4 and cfg.train.steps == 3


def test_field_docs_come_from_attribute_docstrings():
    docs = field_docs(TrainConfig)
    assert "micro-batch" in docs["batch_size"]
    assert set(docs) >= {"steps", "grad_accum", "loss_chunk_tokens"}


def test_round_trip_through_yaml():
    cfg = config.from_dict({"data": {"path": "x"}, "params": {"name": "lora", "r": 2}})
    again = config.from_dict(__import__("yaml").safe_load(config.dump(cfg)))
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"train": {"stepz": 1}}, "train: unknown key 'stepz' (did you mean 'steps'?)"),
        ({"train": {"batch_size": "abc"}}, "train.batch_size: expected an integer, got 'abc'"),
        ({"train": {"schedule": "exp"}}, "train.schedule: expected one of 'cosine'"),
        ({"params": "lorra"}, "params: unknown method 'lorra' (did you mean 'lora'?)"),
        ({"params": {"name": "lora", "rank": 4}}, "params: unknown key 'rank'"),
        ({"params": {"name": "lora", "r": 0}}, "r must be >= 1"),
        ({"train": {"batch_size": 0}}, "train.batch_size: must be >= 1"),
    ],
)
def test_errors_name_the_field(data, message):
    data = {"data": {"path": "x"}, **data}
    with pytest.raises(SlimtuneError, match=None) as err:
        config.from_dict(data)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "recipe", sorted((Path(__file__).parents[1] / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_example_recipes_validate(recipe):
    cfg = config.load(recipe)
    if "federated" in config.read_yaml(recipe):
        from slimtune.federated.core import validate

        validate(cfg)
