"""The objective axis: a contract over its registry, and a test-only objective (defined here,
with no edit under src/) that runs end to end through slimtune.train."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from slimtune import config, registry
from slimtune.data import DataConfig, collate, load_splits
from slimtune.errors import SlimtuneError
from slimtune.loop import train
from slimtune.loss import causal_lm_loss, find_head
from slimtune.methods.base import Objective, ObjectiveContext
from slimtune.models import load_model

from .conftest import tiny_recipe


def _batch(cls_data, pairs: bool = False):
    """Four examples of the classification data; for an objective that reads preference pairs,
    the same reviews as pairs (the right label chosen, the other rejected)."""
    model, tok = load_model("tiny-llama")
    cfg = config.from_dict(tiny_recipe(cls_data, cls_data.parent / "unused"))
    if pairs:
        rows = [json.loads(x) for x in cls_data.read_text().splitlines()]
        words = [" negative", " positive"]
        path = cls_data.parent / "pairs.jsonl"
        path.write_text("".join(json.dumps({"prompt": r["text"], "chosen": words[r["label"]],
                                            "rejected": words[1 - r["label"]]}) + "\n"
                                for r in rows))  # fmt: skip
        cfg.data = DataConfig(path=str(path), format="preference")
    return model, load_splits(cfg.data, tok), tok


@pytest.mark.parametrize("name", registry.names("objective"))
def test_objective_contract(cls_data, name, tmp_path):
    """A finite scalar loss with gradients for every trainable weight it reaches, a positive
    normaliser, and the default objective equal to loss.py's causal-LM loss bit for bit."""
    cls = registry.get("objective", name)
    model, splits, tok = _batch(cls_data, pairs=cls.pairs)
    pad = tok.pad_token_id
    objective = registry.build("objective", cls.Config())  # the objective at its defaults
    head = find_head(model)
    full = registry.build("params", registry.get("params", "full").Config())
    objective.setup(ObjectiveContext(model, full, splits, head, 8, 4, pad, tokenizer=tok))
    objective.on_step_start(0, 1, model, tmp_path)  # SPIN: the first iteration's answers
    # after setup and the hook: a precomputed reference (and SPIN's answers) ride along
    batch = collate(splits.train[:4], pad)
    loss = objective.loss_sum(model, head, batch, 8)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert objective.targets(batch) > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    if name == "causal-lm":
        with torch.no_grad():
            assert torch.equal(loss.detach(), causal_lm_loss(model, head, batch, 8)[0])


class Doubled(Objective):
    """Test-only: twice the causal-LM loss (a power of two, so exact in floating point)."""

    @dataclass
    class Config(Objective.Config):
        pass

    def loss_sum(self, model, head, batch, chunk):
        return 2.0 * causal_lm_loss(model, head, batch, chunk)[0]


@pytest.fixture
def doubled():
    registry.load_all()
    registry.register("objective", "test-doubled")(Doubled)
    try:
        yield
    finally:
        registry._REGISTRY["objective"].pop("test-doubled")


def _first_loss(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rows if "lr" in r)


def test_a_test_only_objective_runs_through_train(tmp_path, cls_data, doubled):
    train_section = {"steps": 2, "progress": False, "eval_before": False}
    plain = tiny_recipe(cls_data, tmp_path / "plain", train=train_section)
    twice = tiny_recipe(cls_data, tmp_path / "twice", objective="test-doubled", train=train_section)
    train(config.from_dict(plain))
    result = train(config.from_dict(twice))
    assert result.summary["steps"] == 2
    # the first step's loss is computed before any update: exactly twice the plain one
    assert _first_loss(tmp_path / "twice") == 2 * _first_loss(tmp_path / "plain")
    saved = (tmp_path / "twice" / "config.yaml").read_text()
    assert "objective:\n  name: test-doubled" in saved


def test_zeroth_order_refuses_another_objective_in_one_line(tmp_path, cls_data, doubled):
    recipe = tiny_recipe(cls_data, tmp_path / "run", optimizer="mezo", objective="test-doubled")
    with pytest.raises(SlimtuneError, match="optimizer: mezo cannot minimise objective"):
        train(config.from_dict(recipe))
    assert not (tmp_path / "run").exists()
