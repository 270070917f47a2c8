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


def test_method_spec_names_itself_and_replace_keeps_the_name():
    import dataclasses

    from slimtune import registry
    from slimtune.methods.params.lisa import Lisa
    from slimtune.methods.params.lora import Lora
    from slimtune.methods.params.owlore import OwLore

    cfg = config.load(None, ["data.path=x", "params=lora", "params.r=8", "optimizer=mezo"])
    four = dataclasses.replace(cfg.params, r=4)
    assert four.name == "lora" and four.r == 4 and isinstance(four, Lora.Config)
    assert dataclasses.replace(cfg.optimizer, lr=0.5).name == "mezo"
    # the name is the class's, not an option: a recipe cannot set it apart from the method
    assert Lora.Config().name == "lora" and Lisa.Config().name == "lisa"
    assert OwLore.Config().name == "owlore"  # a subclass's Config names the subclass
    with pytest.raises(TypeError):
        Lora.Config(name="lisa")
    assert "name" not in [f.name for f in registry.options(Lora.Config)]
    with pytest.raises(SlimtuneError) as e:
        config.load(None, ["data.path=x", "params=lora", "params.rr=4"])
    assert "did you mean 'r'" in str(e.value) and "name" not in str(e.value).split("allowed")[1]
    # to_dict / config.yaml: name first, then the options, as before
    assert list(cfg.to_dict()["params"])[:2] == ["name", "r"]
    assert config.dump(config.from_dict(cfg.to_dict())) == config.dump(cfg)


def test_registry_build_binds_a_spec_to_its_method():
    import dataclasses

    from slimtune import registry
    from slimtune.methods.optim.adamw import AdamW
    from slimtune.methods.params.lora import Lora

    cfg = config.load(None, ["data.path=x", "params=lora"])
    method = registry.build("params", dataclasses.replace(cfg.params, r=2))
    assert type(method) is Lora and method.cfg.r == 2 and method.cfg.name == "lora"
    optim = registry.build("optimizer", cfg.optimizer)
    assert type(optim) is AdamW and optim.cfg is cfg.optimizer
