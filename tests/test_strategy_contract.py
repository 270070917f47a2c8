"""The strategy contract, parametrised over the strategy registry: one round on two in-process
clients (core's transport-free client and server, no Flower) moves the global model, keeps its
tensors' shapes and sends bytes both ways. A test-only strategy (coordinate-wise median)
registers here, with no edit under src/, and runs end to end through the Flower simulation."""

from __future__ import annotations

import json

import pytest
import torch

from slimtune import config, registry
from slimtune.federated import core
from slimtune.federated.strategies import Strategy, to_numpy, to_torch

from .conftest import tiny_recipe


@registry.register("strategy", "fedmedian")
class FedMedian(Strategy):
    """Coordinate-wise median of the clients' trainable states (Yin et al., 2018): the global
    state goes down dense, each client sends its own back."""

    def load(self, model, opt, method, local):
        method.load_trainable_state(model, {n: to_torch(a) for n, a in local.arrays.items()})

    def upload(self, start, end, local):
        return {n: to_numpy(t) for n, t in end.items()}, {}

    def start(self, server):
        server.state = {n: t.clone() for n, t in server.theta0.items()}

    def payload(self, server, rnd, node, conf):
        return {n: to_numpy(t) for n, t in server.state.items()}, conf

    def decode(self, server, arrays, metrics):
        if set(arrays) != set(server.theta0):
            return None, "expected the trainable tensors"
        return {n: to_torch(a, server.theta0[n]) for n, a in arrays.items()}, None

    def aggregate(self, server, rnd, updates, weights):
        server.state = {
            n: torch.stack([u[n] for u, _ in updates]).median(0).values for n in server.theta0
        }

    def sync(self, server):
        server.method.load_trainable_state(server.model, server.state)


# What each strategy needs beyond the defaults (LoRA, AdamW) to pass its validate hook.
NEEDS = {"fedkseed": {"optimizer": {"name": "mezo", "lr": 1e-2, "eps": 1e-2}}}


def recipe(data, out, strategy, **fed):
    sections = {
        "params": {"name": "lora", "r": 4},
        "train": {"steps": 2, "batch_size": 2, "schedule": "constant"},
        "federated": {"strategy": strategy, "clients": 2, "seeds": 64, **fed},
        "overwrite": True,
        **NEEDS.get(strategy, {}),
    }
    return tiny_recipe(data, out, **sections)


@pytest.mark.parametrize("name", registry.names("strategy"))
def test_one_round_moves_the_global_model_and_keeps_shapes(cls_data, tmp_path, name):
    cfg = config.from_dict(recipe(cls_data, tmp_path / "o", name))
    server = core.Server(cfg)
    before = server.trainable()
    replies, down, up = [], 0, 0
    for pid in (0, 1):
        arrays, conf = server.payload(0, pid)
        down += sum(a.nbytes for a in arrays.values())
        sent, metrics = core.client_round(cfg, pid, arrays, conf, memory={})
        up += sum(a.nbytes for a in sent.values())
        server.delivered(pid, 0, True)
        replies.append((pid, sent, metrics))
    result = server.aggregate(0, replies)
    assert result["applied"] and result["accepted"] == 2 and not result["rejected"]
    after = server.trainable()
    assert set(after) == set(before)
    assert all(after[n].shape == before[n].shape for n in before)
    assert any(not torch.equal(after[n], before[n]) for n in before)
    assert up > 0
    # The first round may send nothing (fedkseed: the scalars are all zero, ferret: no past
    # tables); the next one sends the change.
    arrays, _ = server.payload(1, 0)
    assert down >= 0 and sum(a.nbytes for a in arrays.values()) > 0


def test_a_test_only_strategy_runs_through_the_flower_simulation(cls_data, tmp_path):
    from slimtune.federated import app

    out = tmp_path / "run"
    cfg = config.from_dict(recipe(cls_data, out, "fedmedian", rounds=2))
    summary = app.simulate(cfg)
    assert summary["strategy"] == "fedmedian"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    assert len(rows) == 2
    assert all(r["applied"] and r["replied"] == 2 and not r["failed"] for r in rows)
    assert summary["bytes_up_per_client_round"]["total"] > 0
    assert summary["eval_after"]["loss"] != summary["eval_before"]["loss"]


def test_an_unknown_strategy_is_refused_naming_the_choices(cls_data, tmp_path):
    with pytest.raises(Exception, match="federated.strategy: expected one of 'fedavg'"):
        config.from_dict(recipe(cls_data, tmp_path / "o", "fedmean"))
