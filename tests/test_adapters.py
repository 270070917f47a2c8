"""The defining behaviour of the adapters no library implements (methods/params/adapters.py):
NOLA saves its mixture coefficients only, LoLDU trains only the diagonal, the bottleneck adapters
start as the identity, SSF folds into weights that a plain checkpoint holds."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from slimtune import config, registry
from slimtune.loop import train
from slimtune.methods.base import PrepareContext
from slimtune.models import tiny_llama

from .conftest import tiny_recipe

IDS = torch.tensor([[1, 40, 50, 60, 70, 80, 90, 100]])


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def prepared(spec, seed=0, work=None):
    cfg = config._method("params", spec, "full")
    method = registry.build("params", cfg)
    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=2)
    return method, method.prepare(model, PrepareContext(None, work, seed))


def test_nola_saves_only_its_coefficients_k_plus_l_per_module(tmp_path, cls_data):
    params = {"name": "nola", "bases_a": 16, "bases_b": 12, "target_modules": ["q_proj", "v_proj"]}
    result = train(config.from_dict(tiny_recipe(cls_data, tmp_path / "run", params=params)))
    saved = load_file(str(result.run_dir / "adapter.safetensors"))
    modules = 2 * result.model.config.num_hidden_layers  # q_proj and v_proj per block
    assert {k.rpartition(".")[2] for k in saved} == {"alpha", "beta"}
    # the paper's count: k + l scalars per adapted matrix, nothing else
    assert sum(t.numel() for t in saved.values()) == modules * (16 + 12)
    info = json.loads((result.run_dir / "slimtune_adapter.json").read_text())
    assert info["seed"] == 0 and len(info["modules"]) == modules


def test_nola_bases_are_regenerated_from_the_seed():
    spec = {"name": "nola", "bases_a": 8, "bases_b": 8}
    _, a = prepared(spec, seed=3)
    _, b = prepared(spec, seed=3)
    _, c = prepared(spec, seed=4)

    def bases(m):
        return [t for n, t in m.named_buffers() if n.endswith("a_bases")]

    assert all(torch.equal(x, y) for x, y in zip(bases(a), bases(b)))
    assert not torch.equal(bases(a)[0], bases(c)[0])
    assert logits(a).shape == logits(c).shape


def test_loldu_trains_only_the_diagonal_and_scale_and_starts_at_w(tmp_path, cls_data):
    torch.manual_seed(0)
    plain = logits(tiny_llama(num_hidden_layers=2))
    method, model = prepared({"name": "loldu", "r": 8})
    # W_res + s P L_r diag(z) U_r = W: the same function before training; fp32 LU of 64-wide
    # matrices reconstructs W to ~1e-6 relative, logits O(1): 1e-4 absolute
    torch.testing.assert_close(logits(model), plain, atol=1e-4, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rpartition(".")[2] for n in trainable} == {"z", "s"}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * (8 + 1)

    frozen = {}

    def on_step(step, m, row):
        if step == 0:
            frozen.update({n: b.clone() for n, b in m.named_buffers() if "layers" in n})
            frozen.update({n: p.detach().clone() for n, p in m.named_parameters()})

    params = {"name": "loldu", "r": 8}
    result = train(
        config.from_dict(tiny_recipe(cls_data, tmp_path / "r", params=params)), on_step=on_step
    )
    now = dict(result.model.named_parameters()) | dict(result.model.named_buffers())
    changed = {n for n, t in frozen.items() if not torch.equal(now[n], t)}
    assert changed and {n.rpartition(".")[2] for n in changed} <= {"z", "s"}


@pytest.mark.parametrize("name", ["series-adapter", "parallel-adapter"])
def test_bottleneck_adapters_at_zero_init_leave_logits_unchanged(name):
    torch.manual_seed(0)
    plain = logits(tiny_llama(num_hidden_layers=2))
    _, model = prepared({"name": name, "placement": ["attention", "mlp"], "bottleneck": 8})
    # up is zero: the adapters add exact zeros, so the logits are bitwise the base's
    assert torch.equal(logits(model), plain)
    ups = [p for n, p in model.named_parameters() if ".up." in n]
    assert ups and all(not p.any() for p in ups)


def test_ssf_merged_checkpoint_loads_as_it_computes(tmp_path, cls_data):
    result = train(config.from_dict(tiny_recipe(cls_data, tmp_path / "run", params="ssf")))
    want = logits(result.model)
    merged = result.method.merge(result.model)
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    # W' = diag(scale) W rounds each weight once and b' = scale b + shift folds the shift:
    # a few ulps of the tiny model's O(1) logits; 1e-5 absolute
    torch.testing.assert_close(logits(again), want, atol=1e-5, rtol=0)
    assert again.config.attention_bias and again.config.mlp_bias


def test_nlora_starts_as_loaded_and_inttune_trains_the_middle_matrix_only():
    torch.manual_seed(0)
    plain = logits(tiny_llama(num_hidden_layers=2))
    _, model = prepared({"name": "nlora", "r": 4})
    # W - B N A + B N A: fp32 products of 64-wide matrices, ~1e-6 relative; O(1) logits
    torch.testing.assert_close(logits(model), plain, atol=1e-4, rtol=0)
    _, model = prepared({"name": "nlora", "r": 4, "train": "middle"})
    trainable = {n.rpartition(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"n"}
    blocks = 2 * 7  # every block linear of two blocks
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == blocks * 4 * 4


def test_lofit_selects_heads_by_scale_and_only_they_get_offsets(tmp_path, cls_data):
    seen = {}

    def on_step(step, model, row):
        wrappers = [
            m for n, m in model.named_modules() if n.endswith("o_proj") and hasattr(m, "mask")
        ]
        seen[step] = (
            sum(int(w.mask.sum()) for w in wrappers),
            [w.scale.detach().clone() for w in wrappers],
        )

    params = {"name": "lofit", "heads_fraction": 0.25, "select_at": 0.5}
    recipe = tiny_recipe(cls_data, tmp_path / "run", params=params, train={"steps": 6})
    result = train(config.from_dict(recipe), on_step=on_step)
    heads = result.model.config.num_attention_heads * result.model.config.num_hidden_layers
    k = round(0.25 * heads)
    assert seen[3][0] == 0 and seen[4][0] == k  # phase 1 for 3 steps, then k heads
    # the heads chosen are those whose phase-1 scales had the largest L1 norms
    norms = torch.stack([s.abs().sum(dim=1) for s in seen[3][1]])
    wrappers = [
        m for n, m in result.model.named_modules() if n.endswith("o_proj") and hasattr(m, "mask")
    ]
    mask = torch.stack([w.mask.flatten() for w in wrappers])
    assert set(norms.flatten().topk(k).indices.tolist()) == set(
        mask.flatten().nonzero().flatten().tolist()
    )
    for w in wrappers:  # offsets only on selected heads; the scales were reset and frozen
        assert not w.offset[w.mask.flatten() == 0].any()
        assert not w.scale.any() and not w.scale.requires_grad
    assert any(w.offset[w.mask.flatten() == 1].any() for w in wrappers)
    info = json.loads((result.run_dir / "slimtune_adapter.json").read_text())
    assert len(info["selected_heads"]) == k


@pytest.mark.parametrize("term", ["consistency", "diversity", "svd"])
def test_ba_lora_regularisers_have_the_gradients_finite_differences_give(term):
    """gradcheck: autograd's gradient of each term against central differences, float64 on a
    tiny case (distinct singular values, so the SVD term is differentiable there)."""
    from slimtune.methods.params.ba_lora import consistency, diversity, svd_share

    g = torch.Generator().manual_seed(0)
    h = torch.randn(12, 5, dtype=torch.float64, generator=g, requires_grad=True)
    ref = torch.randn(12, 5, dtype=torch.float64, generator=g)
    fn = {
        "consistency": lambda x: consistency(x, ref),
        "diversity": diversity,
        "svd": lambda x: svd_share(x, 2),
    }[term]
    # float64 central differences with step 1e-6: truncation error ~ eps^2 x the third
    # derivative ~ 1e-12, rounding error ~ u |f| / eps ~ 1e-10 relative on these O(1) terms, on
    # any CPU; 1e-6 / 1e-4 leaves orders of magnitude of room, a wrong gradient is off by O(1)
    assert torch.autograd.gradcheck(fn, (h,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_ba_lora_terms_reach_the_step_and_consistency_starts_at_zero(tmp_path, cls_data):
    spec = {"name": "ba-lora", "pissa_niter": 0, "diversity": 0, "svd": 0}
    method, model = prepared(spec, work=tmp_path)
    model(input_ids=IDS, attention_mask=torch.ones_like(IDS))
    # the adapters are at their initial values: the same model computes the reference
    assert float(method.regulariser(model)) == 0.0
    rows = {}
    for key, weight in (("on", 10.0), ("off", 0.0)):
        params = {"name": "ba-lora", "pissa_niter": 0, "consistency": 0.0, "diversity": weight,
                  "svd": weight}  # fmt: skip
        recipe = tiny_recipe(cls_data, tmp_path / key, params=params, train={"steps": 1})
        run_dir = train(config.from_dict(recipe)).run_dir
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        rows[key] = [json.loads(x) for x in lines if '"lr"' in x][-1]
    assert rows["on"]["regulariser"] != 0  # the terms enter the step (SVD's is negative)
    assert "regulariser" not in rows["off"]  # all weights 0: no term at all
