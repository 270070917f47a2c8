"""The federated runner: strategies, aggregation, robustness, simulation and deployment."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from slimtune import config, registry
from slimtune.errors import SlimtuneError
from slimtune.federated import aggregate as agg
from slimtune.federated import core, partition, seeds
from slimtune.loop import train

from .conftest import tiny_recipe, write_jsonl
from .test_contract import NEEDS_CUDA, VARIANTS, method_of

LORA = {"name": "lora", "r": 4}
SGD_CONSTANT = {"steps": 2, "batch_size": 2, "schedule": "constant"}


def make_cfg(path: Path, out: Path, **sections):
    sections.setdefault("params", LORA)
    sections.setdefault("overwrite", True)
    return config.from_dict(tiny_recipe(path, out, **sections))


def run_rounds(cfg, rounds: int, clients: list[int], memories=None):
    """The runner without Flower: payload -> client_round -> aggregate, per round."""
    server = core.Server(cfg)
    memories = memories if memories is not None else {pid: {} for pid in clients}
    for rnd in range(rounds):
        replies = []
        for pid in clients:
            arrays, conf = server.payload(rnd, pid)
            up, metrics = core.client_round(cfg, pid, arrays, conf, memory=memories[pid])
            server.delivered(pid, rnd, True)
            replies.append((pid, up, metrics))
        result = server.aggregate(rnd, replies)
        assert result["applied"], result
    return server


# --- partitioners --------------------------------------------------------------------------


def test_iid_partition_is_seeded_and_balanced():
    parts = partition.iid(103, 4, seed=1)
    assert sorted(i for p in parts for i in p) == list(range(103))
    assert {len(p) for p in parts} <= {25, 26}
    assert parts == partition.iid(103, 4, seed=1) != partition.iid(103, 4, seed=2)


def test_dirichlet_partition_skews_labels_and_covers_everything():
    labels = [i % 2 for i in range(400)]
    parts = partition.dirichlet(labels, 4, alpha=0.1, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(400))
    assert parts == partition.dirichlet(labels, 4, alpha=0.1, seed=0)
    shares = [np.mean([labels[i] for i in p]) for p in parts]
    assert max(shares) - min(shares) > 0.5  # small alpha: clients see very different mixes
    balanced = partition.dirichlet(labels, 4, alpha=1000.0, seed=0)
    assert max(abs(np.mean([labels[i] for i in p]) - 0.5) for p in balanced) < 0.1


def test_dirichlet_needs_labels(text_data, tmp_path):
    cfg = make_cfg(
        text_data, tmp_path / "o", data={"format": "text"}, federated={"partition": "dirichlet"}
    )
    base = core.Base.get(cfg)
    with pytest.raises(SlimtuneError, match="labelled"):
        core.load_shard(cfg, base, 0)


# --- fedavg ----------------------------------------------------------------------------------


def test_fedavg_of_one_client_equals_local_training(cls_data, tmp_path):
    """Three rounds of one client (SGD, constant lr) == six local steps, bitwise."""
    opt = {"name": "sgd", "lr": 0.5}
    cfg = make_cfg(
        cls_data, tmp_path / "f", optimizer=opt, train=SGD_CONSTANT, federated={"clients": 1}
    )
    fed = run_rounds(cfg, 3, [0]).trainable()
    local_cfg = make_cfg(
        cls_data, tmp_path / "l", optimizer=opt, train={**SGD_CONSTANT, "steps": 6}
    )
    res = train(local_cfg)
    local = res.method.trainable_state(res.model)
    assert set(fed) == set(local)
    for name in local:
        assert torch.equal(fed[name], local[name]), name


def test_product_aggregation_beats_separate_averaging():
    """The average of B A: product (SVD) is the best rank-r fit, separate averaging is not."""
    g = torch.Generator().manual_seed(0)
    names = ("m.lora_A.default.weight", "m.lora_B.default.weight")
    states = [
        {names[0]: torch.randn(4, 16, generator=g), names[1]: torch.randn(12, 4, generator=g)}
        for _ in range(3)
    ]
    weights, scale = [1.0, 2.0, 3.0], 2.0
    true = sum(w * scale * s[names[1]] @ s[names[0]] for s, w in zip(states, weights)) / 6
    errors = {}
    for rule in ("product", "separate"):
        out, _ = agg.aggregate_lora(states, weights, [scale] * 3, scale, rule)
        assert out[names[0]].shape == (4, 16) and out[names[1]].shape == (12, 4)
        errors[rule] = float((scale * out[names[1]] @ out[names[0]] - true).norm())
    u, s, vh = torch.linalg.svd(true)
    best = float(s[4:].norm())  # Eckart-Young: the smallest error any rank-4 matrix can have
    assert errors["product"] == pytest.approx(best, rel=1e-4)
    assert errors["separate"] > 1.5 * errors["product"]


def test_heterogeneous_ranks_keep_shapes_and_equal_ranks_are_exact():
    g = torch.Generator().manual_seed(1)
    a, b = "m.lora_A.default.weight", "m.lora_B.default.weight"

    def client(r):
        return {
            a: torch.randn(r, 10, generator=g),
            b: torch.randn(6, r, generator=g),
            "n": torch.ones(3),
        }

    scale = agg.lora_scale(16.0, 8, False)
    # Equal ranks: separate is plain FedAvg, bitwise; one client comes back unchanged.
    same = [client(8), client(8)]
    out, _ = agg.aggregate_lora(same, [1.0, 3.0], [scale, scale], scale, "separate")
    plain = agg.fedavg(same, [1.0, 3.0])
    assert all(torch.equal(out[n], plain[n]) for n in plain)
    for rule in ("product", "separate"):
        one, _ = agg.aggregate_lora(same[:1], [1.0], [scale], scale, rule)
        assert all(torch.equal(one[n], same[0][n]) for n in one)
    # Different ranks (each with its own alpha / r): global at the largest rank, views per rank.
    mixed = [client(2), client(4), client(8)]
    scales = [agg.lora_scale(16.0, r, False) for r in (2, 4, 8)]
    for rule in ("product", "separate"):
        out, pairs = agg.aggregate_lora(mixed, [1.0, 1.0, 1.0], scales, scale, rule)
        assert out[a].shape == (8, 10) and out[b].shape == (6, 8) and out["n"].shape == (3,)
        for r, sc in zip((2, 4, 8), scales):
            view = agg.client_view(out, pairs, r, sc, scale)
            assert view[a].shape == (r, 10) and view[b].shape == (6, r)
    # Product: the update every client sees is the best fit of the true average at its rank.
    out, pairs = agg.aggregate_lora(mixed, [1.0, 1.0, 1.0], scales, scale, "product")
    true = sum(sc * s[b] @ s[a] for s, sc in zip(mixed, scales)) / 3
    sv = torch.linalg.svdvals(true.double())
    for r, sc in zip((2, 4, 8), scales):
        view = agg.client_view(out, pairs, r, sc, scale)
        err = float((sc * view[b] @ view[a] - true).norm())
        assert err == pytest.approx(float(sv[r:].norm()), rel=1e-3, abs=1e-5)


def test_heterogeneous_clients_choose_rank_and_batch_from_budgets(cls_data, tmp_path):
    cfg = make_cfg(cls_data, tmp_path / "o", train={"steps": 1, "batch_size": 2})
    model = core.Base.get(cfg).model
    small = core.estimate_lora_mb(model, cfg, 2, 1)
    for r, b in [(16, 2), (16, 1)]:
        fits = core.estimate_lora_mb(model, cfg, r, b)
        assert core.choose_rank_batch(model, cfg, fits, "c") == (r, b, fits)
    budgets = [small + 0.01, 1e6]
    cfg = make_cfg(
        cls_data,
        tmp_path / "o",
        train={"steps": 1, "batch_size": 2},
        federated={"memory_budgets_mb": budgets, "ranks": [2, 4, 8], "batch_sizes": [1, 2]},
    )
    server = run_rounds(cfg, 2, [0, 1])
    pairs = agg.lora_pairs(list(server.state))
    assert server.state[pairs[0][0]].shape[0] == 8
    with pytest.raises(SlimtuneError, match="below the smallest configuration"):
        core.choose_rank_batch(model, cfg, small / 2, "client 0")


def test_compeft_is_8x_smaller_and_keeps_sign_and_top_entries():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 96, generator=g)
    parts = agg.compeft_encode(delta, 0.1)
    wire = sum(p.nbytes for p in parts.values())
    assert delta.numel() * 4 / wire >= 8
    out = agg.compeft_decode(parts, delta.shape)
    kept = out != 0
    assert int(kept.sum()) == round(0.1 * delta.numel())
    assert torch.equal(torch.sign(out[kept]), torch.sign(delta[kept]))
    assert float(delta.abs()[kept].min()) >= float(delta.abs()[~kept].max())
    assert float(out.abs().max()) == pytest.approx(float(delta.abs()[kept].mean()), rel=1e-6)
    # All tensors of an update travel in three arrays and come back tensor by tensor.
    deltas = {"b": delta, "a": torch.randn(3, 5, generator=g), "c": torch.randn(7, generator=g)}
    packed = agg.compeft_pack(deltas, 0.1)
    assert set(packed) == {"compeft.mask", "compeft.sign", "compeft.scale"}
    back = agg.compeft_unpack(packed, {n: tuple(t.shape) for n, t in deltas.items()})
    for name, t in deltas.items():
        assert torch.equal(back[name], agg.compeft_decode(agg.compeft_encode(t, 0.1), t.shape))
    with pytest.raises(ValueError):
        agg.compeft_unpack(packed, {"a": (3, 5), "b": (64, 96)})


def test_compeft_round_trains_and_reports(cls_data, tmp_path):
    cfg = make_cfg(
        cls_data,
        tmp_path / "o",
        train={"steps": 2, "batch_size": 2},
        federated={"compress": "compeft"},
    )
    server = run_rounds(cfg, 1, [0, 1])
    moved = [n for n, t in server.state.items() if not torch.equal(t, server.theta0[n])]
    assert moved


# --- robustness ----------------------------------------------------------------------------


def test_nan_and_misshapen_updates_are_rejected_and_the_model_kept(cls_data, tmp_path, caplog):
    cfg = make_cfg(cls_data, tmp_path / "o", train={"steps": 1, "batch_size": 2})
    server = core.Server(cfg)
    arrays, conf = server.payload(0, 0)
    good, m = core.client_round(cfg, 0, arrays, conf)
    name = next(iter(good))
    poisoned = dict(good, **{name: np.full_like(good[name], np.nan)})
    misshapen = dict(good, **{name: good[name][:1]})
    before = server.trainable()
    with caplog.at_level("WARNING"):
        out = server.aggregate(0, [(1, poisoned, m), (2, misshapen, m)])
    assert out["applied"] is False and out["accepted"] == 0
    assert "NaN" in out["rejected"][0]["reason"] and "shape" in out["rejected"][1]["reason"]
    assert "rejected" in caplog.text
    after = server.trainable()
    assert all(torch.equal(before[n], after[n]) for n in before)
    # With a good update beside it, only the good one is averaged in.
    out = server.aggregate(0, [(0, good, m), (1, poisoned, m)])
    assert out["applied"] and out["accepted"] == 1
    assert all(torch.equal(server.state[n], torch.from_numpy(good[n])) for n in good)


def test_too_few_updates_leave_the_model_unchanged(cls_data, tmp_path):
    cfg = make_cfg(
        cls_data, tmp_path / "o", train={"steps": 1, "batch_size": 2}, federated={"min_clients": 2}
    )
    server = core.Server(cfg)
    arrays, conf = server.payload(0, 0)
    up, m = core.client_round(cfg, 0, arrays, conf)
    before = server.trainable()
    out = server.aggregate(0, [(0, up, m)])  # the other client dropped
    assert out["applied"] is False
    assert all(torch.equal(before[n], server.trainable()[n]) for n in before)


# --- fedkseed --------------------------------------------------------------------------------


def fedkseed_cfg(path, out, **fed):
    return make_cfg(
        path,
        out,
        optimizer={"name": "mezo", "lr": 1e-2, "eps": 1e-2},
        train={"steps": 5, "batch_size": 2, "schedule": "constant"},
        federated={"strategy": "fedkseed", "clients": 2, "seeds": 64, **fed},
    )


@pytest.mark.parametrize("sampling", ["uniform", "pro"])
def test_fedkseed_clients_and_server_rebuild_identical_weights(cls_data, tmp_path, sampling):
    cfg = fedkseed_cfg(cls_data, tmp_path / "o", seed_sampling=sampling)
    memories = {0: {}, 1: {}}
    server = run_rounds(cfg, 2, [0, 1], memories)
    scalars = server.payload(2)[0]["scalars"]
    assert np.count_nonzero(scalars) > 0
    # A client: the initial weights, then theta_0 + sum_s C_s z_s from the K scalars alone.
    base = core.Base.get(cfg)
    model, method = base.prepared(cfg, tmp_path / "w")
    method.load_trainable_state(model, base.initial_state(cfg))
    opt = registry.get("optimizer", "mezo")(cfg.optimizer).build(
        method.param_groups(model, 0.0), model
    )
    seeds.rebuild_fedkseed(opt, scalars, cfg.federated.seed)
    mine, theirs = method.trainable_state(model), server.trainable()
    assert all(torch.equal(mine[n], theirs[n]) for n in mine)
    assert any(not torch.equal(theirs[n], server.theta0[n]) for n in theirs)
    # The clients' stored scalars (kept between rounds) are the server's.
    assert all(np.array_equal(memories[p]["scalars"], server.snapshots[1]) for p in (0, 1))


def test_fedkseed_uploads_seed_scalar_pairs_and_syncs_only_changes(cls_data, tmp_path):
    cfg = fedkseed_cfg(cls_data, tmp_path / "o", seeds=4096)
    server = core.Server(cfg)
    memory: dict = {}
    arrays, conf = server.payload(0, 7)
    assert set(arrays) == {"sync"} and arrays["sync"].nbytes == 0  # nothing changed yet
    up, m = core.client_round(cfg, 0, arrays, conf, memory=memory)
    idx, val = seeds.unpack_pairs(up["picks"])
    assert len(idx) <= cfg.train.steps and up["picks"].nbytes == 8 * len(idx)
    assert np.all((idx >= 0) & (idx < 4096)) and np.all(np.isfinite(val))
    server.delivered(7, 0, True)
    server.aggregate(0, [(7, up, m)])
    arrays, conf = server.payload(1, 7)
    assert arrays["sync"].nbytes == 8 * len(idx) and conf["base"] == 0
    dense = core.resolve_scalars(arrays, conf, memory)
    assert np.array_equal(dense, server.scalars.astype(np.float32))
    # A node the server has no record of gets the changes since the all-zero start.
    arrays, conf = server.payload(1, 99)
    assert np.array_equal(core.resolve_scalars(arrays, conf, {}), dense)
    with pytest.raises(SlimtuneError, match="holds round"):
        core.resolve_scalars(*server.payload(1, 7), {"version": 5, "scalars": dense})


def test_fedkseed_rejects_bad_optimizers(cls_data, tmp_path):
    with pytest.raises(SlimtuneError, match="mezo"):
        core.validate(make_cfg(cls_data, tmp_path / "o", federated={"strategy": "fedkseed"}))
    with pytest.raises(SlimtuneError, match="weight_decay"):
        core.validate(
            make_cfg(
                cls_data,
                tmp_path / "o",
                optimizer={"name": "mezo", "weight_decay": 0.1},
                federated={"strategy": "fedkseed"},
            )
        )
    with pytest.raises(SlimtuneError, match="first-order"):
        core.validate(
            make_cfg(cls_data, tmp_path / "o", optimizer="mezo", federated={"strategy": "ferret"})
        )


# --- ferret ----------------------------------------------------------------------------------


@pytest.mark.parametrize("d,n", [(64, 4096), (256, 4096)])
def test_ferret_reconstruction_approximates_the_update(d, n):
    """u = sum_k <delta, z_k> z_k / n is unbiased with relative error about sqrt((d+1)/n);
    stated tolerance: within 1.5x of that."""
    g = torch.Generator().manual_seed(d)
    delta = torch.randn(d, generator=g)
    dirs = seeds.Directions(seed=3)
    counts, coords = seeds.ferret_project([delta], dirs, rnd=0, budget=n)
    assert counts.tolist() == [n] and coords.shape == (n,)
    (u,) = seeds.ferret_reconstruct(counts, coords, [delta], dirs, rnd=0)
    rel = float((u - delta).norm() / delta.norm())
    assert rel < 1.5 * math.sqrt((d + 1) / n)
    assert float(torch.nn.functional.cosine_similarity(u, delta, dim=0)) > 0.9


def test_ferret_counts_follow_update_norms():
    deltas = [torch.ones(10), torch.ones(10) * 0.5, torch.zeros(10)]
    assert seeds.ferret_counts(deltas, 100) == [100, 50, 2]


def test_ferret_round_trains_and_clients_rebuild_the_server_weights(cls_data, tmp_path):
    cfg = make_cfg(
        cls_data,
        tmp_path / "o",
        optimizer={"name": "sgd", "lr": 0.5},
        train={"steps": 2, "batch_size": 2},
        federated={"strategy": "ferret", "seeds": 20, "clients": 2},
    )
    memories = {0: {}, 1: {}}
    server = run_rounds(cfg, 2, [0, 1], memories)
    history = server.payload(2)[0]
    assert set(history) == {"r0.counts", "r0.coords", "r1.counts", "r1.coords"}
    # A client that answered round 1 keeps table 0 and is sent only table 1.
    tables, conf = server.payload(2, 0)
    assert set(tables) == {"r1.counts", "r1.coords"} and conf["base"] == 1
    full = core.resolve_history(tables, conf, memories[0])
    assert set(full) == set(history) and all(np.array_equal(full[k], history[k]) for k in full)
    with pytest.raises(SlimtuneError, match="holds round"):
        core.resolve_history(tables, conf, {"version": 0})
    base = core.Base.get(cfg)
    model, method = base.prepared(cfg, tmp_path / "w")
    method.load_trainable_state(model, base.initial_state(cfg))
    core.rebuild_ferret(list(method.trainable_state(model).values()), history, cfg.federated)
    mine, theirs = method.trainable_state(model), server.trainable()
    assert all(torch.equal(mine[n], theirs[n]) for n in mine)


# --- on Flower ---------------------------------------------------------------------------------


def fed_cli(recipe: dict, tmp_path: Path, *extra: str, env=None) -> subprocess.CompletedProcess:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return subprocess.run(
        [sys.executable, "-m", "slimtune", "fed", str(path), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.mark.slow
def test_simulation_continues_when_a_client_drops(cls_data, tmp_path):
    """Three virtual clients, one of which cannot read its data file: every round goes on
    with the other two (min_clients 2), the failure is logged, bytes are accounted."""
    rows = [json.loads(x) for x in cls_data.read_text().splitlines()]
    files = [str(write_jsonl(tmp_path / f"c{i}.jsonl", rows[i::2])) for i in range(2)]
    files.append(str(tmp_path / "missing.jsonl"))
    out = tmp_path / "run"
    recipe = tiny_recipe(
        cls_data,
        out,
        params=LORA,
        train={"steps": 2, "batch_size": 2},
        federated={
            "clients": 3,
            "rounds": 2,
            "min_clients": 2,
            "partition": "files",
            "files": files,
        },
    )
    res = fed_cli(recipe, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "bytes per client per round" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dropped_or_failed"] == 2
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["applied"] and r["accepted"] == 2 and len(r["failed"]) == 1
        assert "missing.jsonl" in r["failed"][0]["error"]
        assert len(r["bytes_up"]) == 2 and min(r["bytes_up"]) > r["payload_bytes_up"][0] > 0
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedkseed", "ferret"])
def test_simulation_keeps_shared_state_on_the_nodes(cls_data, tmp_path, strategy):
    """On Flower, FedKSeed clients keep the K scalars and Ferret clients the past coordinate
    tables in their node state, so after the first round only what changed travels down."""
    out = tmp_path / "run"
    optimizer = (
        {"name": "mezo", "lr": 1e-3, "eps": 1e-2}
        if strategy == "fedkseed"
        else {"name": "sgd", "lr": 0.5}
    )
    recipe = tiny_recipe(
        cls_data,
        out,
        params=LORA,
        optimizer=optimizer,
        train={"steps": 3, "batch_size": 2},
        federated={"strategy": strategy, "seeds": 512, "clients": 2, "rounds": 3},
    )
    res = fed_cli(recipe, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    assert all(r["applied"] and not r["failed"] and r["replied"] == 2 for r in rows)
    for prev, row in zip(rows, rows[1:]):
        if strategy == "fedkseed":  # changed scalars only: 8 bytes per seed sent up last round
            changed = sum(b // 8 for b in prev["payload_bytes_up"])
            assert all(0 < b <= 8 * changed for b in row["payload_bytes_down"])
        else:  # the last round's averaged table only (its counts: the largest per tensor)
            assert all(0 < b <= sum(prev["payload_bytes_up"]) for b in row["payload_bytes_down"])
    if strategy == "fedkseed":
        assert all(b <= 8 * 3 for r in rows for b in r["payload_bytes_up"])


@pytest.mark.slow
def test_simulation_is_reproducible_from_the_seeds(cls_data, tmp_path):
    """Partial participation (1 of 2 clients per round) samples the same partitions and ends
    with the same adapter, bitwise, in two runs (Flower draws new node ids every run)."""
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        recipe = tiny_recipe(
            cls_data,
            out,
            params=LORA,
            train={"steps": 1, "batch_size": 2},
            federated={"clients": 2, "clients_per_round": 1, "rounds": 3, "seed": 5},
        )
        res = fed_cli(recipe, tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs.append(
            ([r["partitions"] for r in rows[1:]], (out / "adapter_model.safetensors").read_bytes())
        )
    assert runs[0] == runs[1]
    assert len({tuple(p) for p in runs[0][0]}) == 2  # both partitions were sampled


@pytest.mark.slow
def test_deployment_superlink_and_two_supernodes_on_loopback(cls_data, tmp_path):
    from slimtune.federated.deploy import flower_env

    from .flower_procs import Deployment

    home = tmp_path / "flwr-home"
    home.mkdir()
    env = flower_env(home)
    out = tmp_path / "run"
    recipe = tiny_recipe(
        cls_data,
        out,
        params=LORA,
        train={"steps": 2, "batch_size": 2},
        federated={"clients": 2, "rounds": 1},
    )
    nodes = [{"partition-id": 0}, {"partition-id": 1}]
    with Deployment(tmp_path, nodes, env) as dep:
        res = fed_cli(recipe, tmp_path, "--superlink", dep.superlink, "--insecure", env=env)
    assert dep.leftovers() == []
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "finished:completed" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["dropped_or_failed"] == 0
    assert summary["bytes_up_per_client_round"]["mean"] > 0
    assert (out / "adapter_model.safetensors").is_file()


def test_fed_cli_rejects_bad_settings_in_one_line(cls_data, tmp_path):
    recipe = tiny_recipe(cls_data, tmp_path / "o", federated={"strategy": "fedkseed"})
    res = fed_cli(recipe, tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "mezo" in res.stderr
    res = fed_cli(recipe, tmp_path, "federated.rounds=0")
    assert res.returncode == 2 and "federated.rounds" in res.stderr
    res = fed_cli(tiny_recipe(tmp_path / "nope.jsonl", tmp_path / "o"), tmp_path)
    assert res.returncode == 2 and "nope.jsonl" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()


# --- every params method ---------------------------------------------------------------------

FED_CASES = [v for v in sorted(VARIANTS) if v not in NEEDS_CUDA]


@pytest.mark.parametrize("variant", FED_CASES)
def test_fedavg_exchanges_the_trainable_state_of_every_params_method(cls_data, tmp_path, variant):
    """Two clients, one round: both updates are accepted and the global state moves, keeping
    its tensors and shapes (for a new method the moment it registers)."""
    params = {"name": method_of(variant), **VARIANTS[variant]}
    cfg = make_cfg(cls_data, tmp_path / "o", params=params, train={"steps": 2, "batch_size": 2})
    server = run_rounds(cfg, 1, [0, 1])
    state = server.trainable()
    assert set(state) == set(server.theta0)
    assert all(state[n].shape == server.theta0[n].shape for n in state)
    assert any(not torch.equal(state[n], server.theta0[n]) for n in state)
    assert math.isfinite(server.evaluate()["loss"])
