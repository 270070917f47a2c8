"""Packing without cross-example attention: whole examples share a row, each keeps its own
positions and attends only to itself, and no token is predicted from another example, so a
packed batch's loss is the sum of its examples' own losses, for every params method that
packs (the others are refused in one line)."""

from __future__ import annotations

import pytest
import torch

from slimtune import config, registry
from slimtune.data import IGNORE, Example, _pack, collate
from slimtune.errors import SlimtuneError
from slimtune.loop import train
from slimtune.loss import causal_lm_loss, find_head
from slimtune.methods.base import PrepareContext
from slimtune.models import tiny_llama

from .conftest import tiny_recipe, write_jsonl
from .test_contract import VARIANTS, method_of

LENGTHS = [7, 12, 3, 9, 15, 5, 11]


def examples() -> list[Example]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        labels = [IGNORE] * (n // 3) + ids[n // 3 :]  # a masked prompt, then the answer
        out.append(Example(ids, labels))
    return out


def test_pack_places_whole_examples_in_order_with_their_own_positions():
    rows = _pack(examples(), 24)
    assert [len(r.input_ids) for r in rows] == [22, 24, 16]  # 7+12+3, 9+15, 5+11
    flat = [t for r in rows for t in r.input_ids]
    assert flat == [t for ex in examples() for t in ex.input_ids]  # order kept, nothing cut
    assert rows[0].positions == [*range(7), *range(12), *range(3)]
    # each example's first label is masked: nothing predicted across a boundary
    assert rows[0].labels[7] == IGNORE and rows[0].labels[19] == IGNORE
    batch = collate(rows, pad_id=0)
    assert batch["position_ids"].shape == batch["input_ids"].shape
    assert batch["position_ids"][2, 16:].tolist() == list(range(8))  # padding: its own run


def loss_sum(model, batch):
    head = find_head(model)
    with torch.no_grad():
        total, n = causal_lm_loss(model, head, batch, 8)
    return float(total), n


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_the_examples_own_losses(attn):
    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=2, attn_implementation=attn).eval()
    packed_sum, packed_n = loss_sum(model, collate(_pack(examples(), 24), pad_id=0))
    alone = [loss_sum(model, collate([ex], pad_id=0)) for ex in examples()]
    assert packed_n == sum(n for _, n in alone)
    # The same products over keys of one example in both (masked keys add exp(-inf) = 0):
    # only the order of fp32 sums differs, ~1e-6 relative on a sum of O(1) token losses; a
    # leak across examples moves it by O(1e-2) or more.
    assert packed_sum == pytest.approx(sum(s for s, _ in alone), rel=1e-5)
    # against the same rows packed the old way (attending across examples): different
    leaky = collate(_pack(examples(), 24), pad_id=0)
    leaky.pop("position_ids")
    assert loss_sum(model, leaky)[0] != pytest.approx(packed_sum, rel=1e-3)


PACKING = [v for v in sorted(VARIANTS) if v != "lora-loftq"]


@pytest.mark.parametrize("variant", PACKING)
def test_every_params_method_packs_or_is_refused(variant, tmp_path):
    """For each params method (at perturbed trainable values, so adapters compute something):
    the packed loss equals the examples' own; a method that cannot pack says so in one line."""
    name = method_of(variant)
    spec = {"name": name, **VARIANTS[variant]}
    method = registry.build("params", config._method("params", spec, "full"))
    if not method.supports_packing:
        rows = [{"text": "a b c d e f g h"}] * 8
        recipe = tiny_recipe(
            write_jsonl(tmp_path / "t.jsonl", rows),
            tmp_path / "run",
            data={"format": "text", "packing": True, "eval_size": 0},
            params=spec,
        )
        with pytest.raises(SlimtuneError, match="data.packing"):
            train(config.from_dict(recipe))
        assert not (tmp_path / "run").exists()
        return
    torch.manual_seed(0)
    ctx = PrepareContext(
        None,
        tmp_path,
        0,
        calibration=lambda: iter([collate(examples()[:4], pad_id=0)]),
        extras={"total_steps": 4},
    )
    model = method.prepare(tiny_llama(num_hidden_layers=2), ctx).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    packed_sum, _ = loss_sum(model, collate(_pack(examples(), 24), pad_id=0))
    alone = sum(loss_sum(model, collate([ex], pad_id=0))[0] for ex in examples())
    # as above: the same products, fp32 sums in another order
    assert packed_sum == pytest.approx(alone, rel=1e-5)


def test_a_packed_run_trains_and_scores_held_out_examples_one_per_row(tmp_path, cls_data):
    seen = []

    def on_step(step, model, row):
        if row is not None:
            seen.append(row["tokens"])

    recipe = tiny_recipe(
        cls_data, tmp_path / "run", data={"packing": True}, params={"name": "lora", "r": 4}
    )
    result = train(config.from_dict(recipe), on_step=on_step)
    # held-out examples stay one per row: accuracy by the label words still works
    assert 0 <= result.summary["eval_after"]["accuracy"] <= 1
    # a packed row holds several 16-review examples: more tokens per step than 4 padded rows
    padded = train(config.from_dict(tiny_recipe(cls_data, tmp_path / "b", params="lora")))
    assert seen[0] > padded.summary["tokens"] / padded.summary["steps"]


def test_zeroth_order_steps_on_packed_rows(tmp_path, cls_data):
    recipe = tiny_recipe(
        cls_data,
        tmp_path / "run",
        data={"packing": True},
        params={"name": "lora", "r": 4},
        optimizer={"name": "mezo", "lr": 1e-3, "samples": 2},
    )
    result = train(config.from_dict(recipe))
    assert result.summary["steps"] == 4


def test_packed_preference_pairs_are_refused(tmp_path):
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}] * 8
    recipe = tiny_recipe(
        write_jsonl(tmp_path / "p.jsonl", rows),
        tmp_path / "run",
        data={"format": "preference", "packing": True, "eval_size": 0},
        params={"name": "lora"},
        objective={"name": "dpo"},
    )
    with pytest.raises(SlimtuneError, match="data.packing: objective dpo scores"):
        train(config.from_dict(recipe))
    assert not (tmp_path / "run").exists()
