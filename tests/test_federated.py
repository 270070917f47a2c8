"""The federated runner: strategies, aggregation, robustness, simulation and deployment."""

from __future__ import annotations

import json
import math
import os
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
from slimtune.federated.strategies import fedkseed, ferret
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
    # Statistical thresholds on a seeded numpy Generator, not rounding tolerances: seen 1.0
    # (> 0.5) and 0.005 (< 0.1). Platform libm differences of an ulp could move a cut by at
    # most one example of 100, far inside either margin.
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
    """The average of B A: product (SVD) is the best rank-r fit, separate averaging is not.
    In float64 (aggregate_lora works in float64 and returns the input dtype), so the check is
    of the algorithm, not of float32 rounding."""
    g = torch.Generator().manual_seed(0)
    names = ("m.lora_A.default.weight", "m.lora_B.default.weight")
    f64 = {"generator": g, "dtype": torch.float64}
    states = [
        {names[0]: torch.randn(4, 16, **f64), names[1]: torch.randn(12, 4, **f64)} for _ in range(3)
    ]
    weights, scale = [1.0, 2.0, 3.0], 2.0
    true = sum(w * scale * s[names[1]] @ s[names[0]] for s, w in zip(states, weights)) / 6
    errors = {}
    for rule in ("product", "separate"):
        out, _ = agg.aggregate_lora(states, weights, [scale] * 3, scale, rule)
        assert out[names[0]].shape == (4, 16) and out[names[1]].shape == (12, 4)
        errors[rule] = float((scale * out[names[1]] @ out[names[0]] - true).norm())
    best = float(torch.linalg.svdvals(true)[4:].norm())  # Eckart-Young: the least rank-4 error
    # Equal in exact arithmetic. Both sides are backward-stable float64 SVDs and products of a
    # 12x16 matrix: their difference is a few eps64 * ||true|| (seen: 3e-16 relative; any
    # BLAS/LAPACK, thread count or CPU stays within 16 * eps64 * ||true||_F / best ~ 1e-14).
    # rel=1e-9 leaves five orders of magnitude of room and still catches any real loss of rank.
    assert errors["product"] == pytest.approx(best, rel=1e-9)
    # A modelling margin, not a rounding one: separate is 2.15x worse here (seeded data).
    assert errors["separate"] > 1.5 * errors["product"]


def test_heterogeneous_ranks_keep_shapes_and_equal_ranks_are_exact():
    g = torch.Generator().manual_seed(1)
    a, b = "m.lora_A.default.weight", "m.lora_B.default.weight"
    f64 = {"generator": g, "dtype": torch.float64}  # the SVD checks below: see their comment

    def client(r):
        return {
            a: torch.randn(r, 10, **f64),
            b: torch.randn(6, r, **f64),
            "n": torch.ones(3, dtype=torch.float64),
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
    sv = torch.linalg.svdvals(true)
    # Exact arithmetic: err == ||sv[r:]|| (0 for r=8, above the rank 6 of a 6x10 matrix).
    # float64 SVD, truncation, rescaling and product leave a few eps64 * ||true||_F (seen:
    # 3e-14 at ||true||_F = 38, i.e. 4 eps64 * ||true||_F, on any BLAS/thread count of the same
    # order); abs = 1e-10 * ||true||_F leaves five orders of magnitude, and float32 (3e-6
    # here) would not pass it.
    tol = 1e-10 * float(true.norm())
    for r, sc in zip((2, 4, 8), scales):
        view = agg.client_view(out, pairs, r, sc, scale)
        err = float((sc * view[b] @ view[a] - true).norm())
        assert err == pytest.approx(float(sv[r:].norm()), rel=0, abs=tol), r


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
    # Exact: the scale travels as the float32 that encode computed with this same reduction
    # (torch.mean of the same kept values, in the same order, in this process), and decoding
    # multiplies it by +-1.
    assert float(out.abs().max()) == float(delta.abs()[kept].mean())
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
    """A ComPEFT client reports as raw_bytes what the uncompressed upload of the same tensors
    weighs (the dense state the server sends down), and sends exactly the bitmap, sign bits
    and one float32 scale per tensor."""
    cfg = make_cfg(
        cls_data,
        tmp_path / "o",
        train={"steps": 2, "batch_size": 2},
        federated={"compress": "compeft"},
    )
    server = core.Server(cfg)
    replies = []
    for pid in (0, 1):
        arrays, conf = server.payload(0, pid)
        up, m = core.client_round(cfg, pid, arrays, conf)
        dense = sum(a.nbytes for a in arrays.values())
        sizes = [a.size for a in arrays.values()]
        sent = sum((n + 7) // 8 + (max(1, round(0.1 * n)) + 7) // 8 + 4 for n in sizes)
        assert m["raw_bytes"] == dense
        assert sum(a.nbytes for a in up.values()) == sent and dense / sent > 8
        replies.append((pid, up, m))
    assert server.aggregate(0, replies)["accepted"] == 2
    moved = [n for n, t in server.state.items() if not torch.equal(t, server.theta0[n])]
    assert moved


def test_traffic_pairs_bytes_per_client_and_compression_over_the_same_replies(capsys):
    """summary.json's byte fields from metrics rows with a client that sent no reply, one that
    failed, one whose update was rejected and one that reported no raw size; and the report.
    All byte counts are integers below 2**53, so the sums are exact in float64 and each
    expected mean or ratio is one correctly rounded division: exact equality holds."""
    from slimtune.cli import print_fed_report
    from slimtune.federated import app

    rows = [
        {  # node 11: no reply within round_timeout, 12: failed, 13: replied
            "clients": [11, 12, 13],
            "bytes_down": [100, 100, 100],
            "payload_bytes_down": [80, 80, 80],
            "replied_clients": [13],
            "bytes_up": [30],
            "payload_bytes_up": [10],
            "raw_bytes_up": [80],
            "missing": 1,
            "failed": [{"node": 12, "error": "RuntimeError: x"}],
            "rejected": [],
        },
        {  # all replied; 12's update rejected (its bytes travelled all the same); 13 sent raw
            "clients": [11, 12, 13],
            "bytes_down": [100, 100, 100],
            "payload_bytes_down": [80, 80, 80],
            "replied_clients": [11, 12, 13],
            "bytes_up": [31, 32, 50],
            "payload_bytes_up": [10, 12, 40],
            "raw_bytes_up": [80, 96, None],
            "missing": 0,
            "failed": [],
            "rejected": [{"node": 12, "reason": "x: contains NaN or inf"}],
        },
    ]
    out = app.traffic(rows)
    assert out["bytes_up_per_client_round"] == {"mean": 143 / 4, "max": 50.0, "total": 143.0}
    assert out["bytes_down_per_client_round"]["total"] == 600.0
    # down + up per chosen client and round, up 0 for 11 and 12 in round 1.
    per_client = [100, 100, 130, 131, 132, 150]
    assert out["bytes_per_client_round"] == {
        "mean": sum(per_client) / 6,
        "max": 150.0,
        "total": float(sum(per_client)),
    }
    assert out["payload_bytes_up_per_client_round"]["total"] == 72.0
    assert (out["missing"], out["failed"], out["rejected"], out["dropped_or_failed"]) == (
        1,
        1,
        1,
        2,
    )
    # Raw over sent of the three replies that reported a raw size: (80+80+96) / (10+10+12).
    assert out["uplink_compression"] == 8.0
    assert out["uplink_compression_basis"] == {
        "replies": 3,
        "raw_bytes": 256,
        "sent_payload_bytes": 32,
    }
    no_raw = [dict(r, raw_bytes_up=[None] * len(r["bytes_up"])) for r in rows]
    assert "uplink_compression" not in app.traffic(no_raw)
    assert app.traffic([])["bytes_per_client_round"]["mean"] == 0.0
    # A client's raw size is used only when it is a byte count.
    for bad in (float("nan"), float("inf"), -1, True, "80", [80]):
        assert app._raw_bytes({"raw_bytes": bad}) is None
    assert app._raw_bytes({"raw_bytes": 80}) == 80 and app._raw_bytes({}) is None

    summary = {
        "strategy": "fedavg",
        "params": "lora",
        "optimizer": "adamw",
        "model": "tiny-llama",
        "rounds": 2,
        "clients": 3,
        "local_steps": 0,
        "local_epochs": 1.5,
        **out,
        "eval_before": {"loss": 2.0},
        "eval_after": {"loss": 1.0},
        "wall_seconds": 3.0,
    }
    print_fed_report(summary)
    text = capsys.readouterr().out
    assert "3 clients, 1.5 local epoch(s) per round" in text
    assert "uplink compression 8.0x (raw tensor bytes / tensor bytes sent" in text
    assert "over the same 3 replies" in text
    assert "clients dropped or failed: 2 (1 sent no reply within the round, 1 failed)" in text
    assert "updates rejected by the server's checks: 1" in text


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
    dense = fedkseed.resolve_scalars(arrays, conf, memory)
    assert np.array_equal(dense, server.scalars.astype(np.float32))
    # A node the server has no record of gets the changes since the all-zero start.
    arrays, conf = server.payload(1, 99)
    assert np.array_equal(fedkseed.resolve_scalars(arrays, conf, {}), dense)
    with pytest.raises(SlimtuneError, match="holds round"):
        fedkseed.resolve_scalars(*server.payload(1, 7), {"version": 5, "scalars": dense})


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
    stated tolerance: within 1.5x of that (seen 0.87x and 0.99x, cosine 0.995 and 0.969 for
    the seeded draws). A statistical bound: float32 rounding of the n projections moves rel
    by ~1e-6, whatever the CPU."""
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
    full = ferret.resolve_history(tables, conf, memories[0])
    assert set(full) == set(history) and all(np.array_equal(full[k], history[k]) for k in full)
    with pytest.raises(SlimtuneError, match="holds round"):
        ferret.resolve_history(tables, conf, {"version": 0})
    base = core.Base.get(cfg)
    model, method = base.prepared(cfg, tmp_path / "w")
    method.load_trainable_state(model, base.initial_state(cfg))
    ferret.rebuild_ferret(list(method.trainable_state(model).values()), history, cfg.federated)
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
    # A learning claim, not a rounding one: 5.53 -> 5.35 here (AdamW lr 1e-2), a gap 1e4 times
    # what float32 reductions differing across CPUs or thread counts could move either loss.
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    assert (out / "adapter_model.safetensors").is_file()


# The ServerApp of `slimtune fed` on Flower's simulation engine, with a ClientApp that wraps
# slimtune's: partition 1 fails its first round, partition 0 answers its first round only once
# the server has closed that round (its metrics row is written), so it is late past
# round_timeout on every machine, whatever the speed, and then arrives (the engine finishes
# every task before it stops, so a server that crashed is noticed after 3 x round_timeout).
# Two actors whatever the core count: a blocked client never holds up the other.
LATE_AND_FAILING = """
import json, sys, time
from pathlib import Path

import yaml
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from slimtune import config
from slimtune.cli import print_fed_report
from slimtune.federated import app, core

recipe = yaml.safe_load(Path(sys.argv[1]).read_text())
rows = Path(recipe["output_dir"]) / "metrics.jsonl"
inner = app.make_client_app(recipe)
client = ClientApp()


def closed(rnd):
    try:
        return any(json.loads(x)["round"] > rnd for x in rows.read_text().splitlines())
    except (OSError, ValueError):
        return False


@client.train()
def fit(msg, context):
    pid, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["round"])
    if (pid, rnd) == (1, 0):
        raise RuntimeError("partition 1 fails its first round")
    if (pid, rnd) == (0, 0):  # 3 x round_timeout: only if the server died (no row comes)
        end = time.monotonic() + 3 * recipe["federated"]["round_timeout"]
        while not closed(rnd) and time.monotonic() < end:
            time.sleep(0.2)
    return inner(msg, context)


@client.query()
def which(msg, context):
    return inner(msg, context)


cfg = config.from_dict(recipe)
out = {}
n = cfg.federated.clients
run_simulation(
    server_app=app.make_server_app(recipe, out, core.Server(cfg)),
    client_app=client,
    num_supernodes=n,
    backend_config={
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": n, "logging_level": 40, "log_to_driver": False},
    },
)
print_fed_report(out["summary"])
"""


@pytest.mark.slow
def test_simulation_with_round_timeout_reports_late_and_failed_clients(cls_data, tmp_path):
    """round_timeout with a client that answers too late and one that fails, in the same
    (first) round: the run completes, the round changes nothing, the next round goes on with
    both, and summary.json and the report give the dropped clients and the ComPEFT uplink
    compression measured over the replies that arrived."""
    out = tmp_path / "run"
    recipe = tiny_recipe(
        cls_data,
        out,
        params=LORA,
        train={"steps": 2, "batch_size": 2},
        # round_timeout: what round 1 waits for the late client. Round 2 (both answer) ends as
        # soon as they do: 0.3 s seen here on 2 busy cores, 30x below the limit.
        federated={"clients": 2, "rounds": 2, "compress": "compeft", "round_timeout": 10},
    )
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "run.py").write_text(LATE_AND_FAILING)
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "0"}
    res = subprocess.run(
        [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "recipe.yaml")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    first, second = rows[1], rows[2]
    assert first["partitions"] == [0, 1] and first["replied"] == 0 and not first["applied"]
    assert first["missing"] == 1 and first["missing_clients"] == first["clients"][:1]
    assert [f["node"] for f in first["failed"]] == first["clients"][1:]
    assert "partition 1 fails its first round" in first["failed"][0]["error"]
    assert first["eval"] == rows[0]["eval"] and first["bytes_up"] == []
    assert second["replied"] == 2 and second["applied"] and second["accepted"] == 2
    assert second["missing"] == 0 and not second["failed"]
    assert second["replied_clients"] == second["clients"]
    # Raw size of each reply: the dense fp32 state, i.e. what the server sent down.
    assert second["raw_bytes_up"] == second["payload_bytes_down"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["missing"], summary["failed"], summary["dropped_or_failed"]) == (1, 1, 2)
    basis = summary["uplink_compression_basis"]
    assert basis == {
        "replies": 2,
        "raw_bytes": sum(second["raw_bytes_up"]),
        "sent_payload_bytes": sum(second["payload_bytes_up"]),
    }
    # Integer byte counts: the ratio is one correctly rounded division, compared exactly.
    assert summary["uplink_compression"] == basis["raw_bytes"] / basis["sent_payload_bytes"] > 8
    # Per chosen client and round: down + up (up 0 without a reply), 4 client-rounds. The
    # mean of 4 integers below 2**53 is exact times 4 (a division by a power of two).
    traffic = summary["bytes_per_client_round"]
    total = sum(sum(r["bytes_down"]) + sum(r["bytes_up"]) for r in rows[1:])
    assert traffic["total"] == total and traffic["mean"] * 4 == total
    assert summary["eval_after"] == second["eval"]
    assert "uplink compression" in res.stdout and "over the same 2 replies" in res.stdout
    assert "clients dropped or failed: 2 (1 sent no reply within the round, 1 failed)" in (
        res.stdout
    )
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
