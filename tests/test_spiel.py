"""SpIEL: the budget of trainable entries holds exactly through drop-and-regrow."""

from __future__ import annotations

import torch

from slimtune import config
from slimtune.loop import train
from slimtune.methods.base import PrepareContext
from slimtune.methods.params.spiel import SpIEL
from slimtune.models import tiny_llama, tiny_tokenizer

from .conftest import assert_resume_exact, tiny_recipe


def test_budget_is_kept_exactly_through_drop_and_regrow():
    torch.manual_seed(0)
    model = tiny_llama()
    method = SpIEL(SpIEL.Config(density=0.05, update_every=3, grow_window=2, drop_fraction=0.5))
    ctx = PrepareContext(tiny_tokenizer(), work_dir=None, seed=0, extras={"total_steps": 12})
    model = method.prepare(model, ctx)
    sizes = {n: len(layer.values) for n, layer in method.layers.items()}
    linear_weights = sum(layer.base.weight.numel() for layer in method.layers.values())
    assert method.budget == sum(sizes.values())
    assert abs(method.budget - 0.05 * linear_weights) <= len(sizes)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    history = []
    for step in range(10):
        method.on_step_start(model, step, opt)
        ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append({n: layer.indices.clone() for n, layer in method.layers.items()})
        for n, layer in method.layers.items():
            assert len(torch.unique(layer.indices)) == sizes[n]  # no duplicate, none lost
    # the updates at steps 3, 6 and 9 really moved entries
    name = next(iter(sizes))
    assert not torch.equal(history[2][name].sort().values, history[3][name].sort().values)


def test_spiel_saves_sparsely(tmp_path, cls_data):
    result = train(
        config.from_dict(
            tiny_recipe(
                cls_data,
                tmp_path / "sp",
                params={"name": "spiel", "density": 0.02, "update_every": 2, "grow_window": 1},
            )
        )
    )
    files = {p.name for p in result.run_dir.iterdir()}
    assert {"spiel_delta.safetensors", "spiel_config.json"} <= files
    assert "model.safetensors" not in files
    size = (result.run_dir / "spiel_delta.safetensors").stat().st_size
    dense = sum(p.numel() * 4 for p in result.model.parameters())
    assert size < 0.2 * dense


def test_spiel_resume_is_bitwise_exact(tmp_path, cls_data):
    """A checkpoint inside a grow window carries the gradient accumulator."""
    params = {"name": "spiel", "density": 0.05, "update_every": 3, "grow_window": 2}
    steps = {"steps": 7, "batch_size": 2, "progress": False, "eval_before": False}
    cpu = {"name": "tiny-llama", "device": "cpu"}
    recipe = tiny_recipe(cls_data, tmp_path / "a", model=cpu, params=params, train=steps)
    straight = train(config.from_dict(recipe))
    assert_resume_exact(
        straight, cls_data, tmp_path / "b", 5, model=cpu, params=params, train=steps
    )
