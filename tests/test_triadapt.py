"""TriAdaptLoRA (methods/params/triadapt.py): ranks grow as the threshold schedule says, in the
modules whose normalised ||C||_F rose most; growth only adds parameters; only the grown part
trains; the model starts as loaded; the artefact holds the grown part and the schedule."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from slimtune import config, registry
from slimtune.errors import SlimtuneError
from slimtune.loop import train
from slimtune.methods.base import PrepareContext
from slimtune.models import tiny_llama

from .conftest import tiny_recipe

IDS = torch.tensor([[1, 40, 50, 60, 70, 80, 90, 100]])


def prepared(steps=10, **options):
    spec = {"name": "triadapt-lora", "r": 4, "init_r": 1, "step_r": 2, **options}
    method = registry.build("params", config._method("params", spec, "full"))
    torch.manual_seed(0)
    base = tiny_llama(num_hidden_layers=2)
    want = base(input_ids=IDS).logits.detach()
    ctx = PrepareContext(None, None, 0, extras={"total_steps": steps})
    return method, method.prepare(base, ctx), want


def set_norms(method, model, values):
    """Give each module a C whose normalised Frobenius norm is ``values[i]``."""
    with torch.no_grad():
        for w, v in zip(method.wrapped(model).values(), values):
            for p in (*w.c_row, *w.c_col):
                p.zero_()
            w.c_row[0][0, 0] = v * w.blocks  # C[0, 0] only: ||C|| / blocks == v


def test_starts_as_loaded_with_orthonormal_svd_factors():
    method, model, want = prepared()
    torch.testing.assert_close(model(input_ids=IDS).logits, want, atol=0, rtol=0)  # C = 0
    for w in method.wrapped(model).values():
        a, b = torch.cat(list(w.a)), torch.cat(list(w.b), 1)  # every block, grown or not
        eye = torch.eye(w.cap)
        # singular vectors from an fp32 SVD: orthonormal to ~1e-6
        torch.testing.assert_close(a @ a.T, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(b.T @ b, eye, atol=1e-5, rtol=0)


def test_ranks_grow_as_the_linear_threshold_schedule_says():
    method, model, _ = prepared(steps=10)
    names = list(method.wrapped(model))
    assert len(names) == 4  # q_proj, v_proj in 2 blocks: budget 4 x 4 = 16, spent 4
    # after step 1 of 10: unspent 12 x 0.1 -> int 1 module grows, the largest rise
    set_norms(method, model, [0.1, 0.4, 0.2, 0.3])
    method.after_update(model, 0)
    assert list(method.ranks(model).values()) == [1, 3, 1, 1]
    # after step 2: unspent 10 x 0.2 -> 2 modules; rises: +0.4, -0.1, +0.05, +0.3
    set_norms(method, model, [0.5, 0.3, 0.25, 0.6])
    method.after_update(model, 1)
    assert list(method.ranks(model).values()) == [3, 3, 1, 3]
    info = method.artefact_info(model)
    assert info["rank_schedule"][names[0]] == [[0, 1], [2, 3]]
    assert info["rank_schedule"][names[1]] == [[0, 1], [1, 3]]
    assert info["rank_schedule"][names[2]] == [[0, 1]]


def test_exponential_schedule_warmup_interval_and_budget():
    method, model, _ = prepared(steps=10, schedule="exponential", warmup=2, interval=2)
    set_norms(method, model, [0.1, 0.4, 0.2, 0.3])
    for step in range(2):  # done 1, 2: within the warmup
        method.after_update(model, step)
    assert sum(method.ranks(model).values()) == 4
    method.after_update(model, 2)  # done 3: not on the interval
    assert sum(method.ranks(model).values()) == 4
    # done 4: fraction (4 - 2) / (10 - 2) = 0.25; 12 ** 0.25 = 1.86 -> 1 module
    method.after_update(model, 3)
    assert list(method.ranks(model).values()) == [1, 3, 1, 1]
    # the budget: once 16 ranks are spent nothing grows
    for w in method.wrapped(model).values():
        while w.rank < 4:
            w.grow(5)
    set_norms(method, model, [1.0, 2.0, 3.0, 4.0])
    method.after_update(model, 9)
    assert sum(method.ranks(model).values()) == 20  # 5 per module: 1 + 2 + 2 (spent >= 16)
    method.after_update(model, 11)
    assert sum(method.ranks(model).values()) == 20


def test_growth_adds_parameters_with_fresh_optimizer_state_and_only_grown_blocks_train():
    method, model, _ = prepared()
    w = next(iter(method.wrapped(model).values()))
    opt = torch.optim.AdamW(method.param_groups(model, 0.1), lr=1e-2)
    for step in range(2):
        waiting = [p for k in range(w.blocks, len(w.ends)) for p in w.block_params(k)]
        before = [p.detach().clone() for p in waiting]
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
        # blocks not grown yet: no gradient, no optimizer state, unchanged
        assert all(p.grad is None and p not in opt.state for p in waiting)
        assert all(torch.equal(p, q) for p, q in zip(waiting, before))
        # growing keeps every trained entry and adds zero ones: the update only rescales by
        # alpha / R (the authors' rule)
        old_c, old_delta, old_r = w.c().detach().clone(), w.delta().detach().clone(), w.rank
        with torch.no_grad():
            w.grow(step + 1)
        new_c = w.c().detach()
        assert torch.equal(new_c[:old_r, :old_r], old_c)
        assert not new_c[old_r:].any() and not new_c[:, old_r:].any()
        torch.testing.assert_close(w.delta(), old_delta * old_r / w.rank, rtol=1e-6, atol=0)
    # the block grown last starts its optimizer state fresh at its first step
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    newest = w.block_params(w.blocks - 1)
    assert all(int(opt.state[p]["step"]) == 1 for p in newest)
    assert int(opt.state[w.a[0]]["step"]) == 3


def test_run_saves_grown_part_and_schedule_and_reloads(tmp_path, cls_data):
    params = {"name": "triadapt-lora", "r": 4, "init_r": 1, "step_r": 2}
    recipe = tiny_recipe(cls_data, tmp_path / "run", params=params, train={"steps": 6})
    result = train(config.from_dict(recipe))
    info = json.loads((result.run_dir / "slimtune_adapter.json").read_text())
    saved = load_file(str(result.run_dir / "adapter.safetensors"))
    ranks = info["ranks"]
    assert sum(ranks.values()) > len(ranks)  # some module grew
    for name, r in ranks.items():
        assert info["rank_schedule"][name][-1][1] == r
        assert saved[f"{name}.a"].shape[0] == r and saved[f"{name}.c"].shape == (r, r)
    # reloading onto a fresh base gives the same logits: the contract suite checks it


def test_zeroth_order_is_refused(tmp_path, cls_data):
    recipe = tiny_recipe(
        cls_data, tmp_path / "run", params={"name": "triadapt-lora"}, optimizer={"name": "mezo"}
    )
    with pytest.raises(SlimtuneError, match="triadapt-lora: optimizer mezo moves every"):
        train(config.from_dict(recipe))


def test_bad_ranks_are_refused_in_one_line():
    with pytest.raises(SlimtuneError, match="init_r <= r <= max_r"):
        config._method("params", {"name": "triadapt-lora", "r": 8, "max_r": 4}, "full")


def test_fedavg_keeps_the_union_of_grown_blocks():
    from slimtune.federated.aggregate import fedavg

    method, model, _ = prepared()
    first = {k: v.clone() for k, v in method.trainable_state(model).items()}
    w = next(iter(method.wrapped(model).values()))
    with torch.no_grad():
        w.grow(1)
        w.c_row[1].fill_(0.5)
    second = {k: v.clone() for k, v in method.trainable_state(model).items()}
    method.load_trainable_state(model, fedavg([first, second], [1.0, 1.0]))
    assert w.rank == 3 and w.c_row[1].requires_grad  # grown on one client: grown
    assert torch.allclose(w.c_row[1], torch.full_like(w.c_row[1], 0.25))  # averaged with 0


def test_growing_run_resumes_exactly(tmp_path, cls_data):
    from .conftest import assert_resume_exact

    params = {"name": "triadapt-lora", "r": 4, "init_r": 1, "step_r": 2}
    sections = {"params": params, "train": {"steps": 6}}
    straight = train(config.from_dict(tiny_recipe(cls_data, tmp_path / "a", **sections)))
    assert sum(straight.method.ranks(straight.model).values()) > 4  # it grew
    assert_resume_exact(straight, cls_data, tmp_path / "b", 3, **sections)
