"""LoRA-GGPO (methods/params/ggpo.py): the perturbation is the paper's formula, computing with
it equals computing with W + eps (outputs and the factors' gradients), W is never written, and
nothing is perturbed before the first momentum, outside a training step or with the adapters
off; its state resumes exactly; optimizers without a first moment are refused."""

from __future__ import annotations

import copy

import pytest
import torch

from slimtune import config, registry
from slimtune.errors import SlimtuneError
from slimtune.loop import train
from slimtune.methods.base import PrepareContext
from slimtune.models import tiny_llama

from .conftest import assert_resume_exact, tiny_recipe

IDS = torch.tensor([[1, 40, 50, 60, 70, 80, 90, 100, 7, 9]])
RHO, BETA = 0.05, 0.9


def prepared(**options):
    spec = {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"], "ggpo": True}
    cfg = config._method("params", {**spec, **options}, "full")
    method = registry.build("params", cfg)
    torch.manual_seed(0)
    model = method.prepare(tiny_llama(num_hidden_layers=2), PrepareContext(None, None, 0))
    return method, model


def loss_of(model):
    return model(input_ids=IDS, labels=IDS).loss


def dense(layer, m_a, m_b, gbar):
    """The paper's perturbation of one layer, as a dense out x in matrix."""
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    v = s * (m_b @ a + b @ m_a)
    return -RHO * v / v.norm() * min(1 / gbar, 10.0)


def grad_norm(layer):
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    with torch.no_grad():
        return float((s * (b.grad @ a + b @ a.grad)).norm())


def test_perturbation_is_the_formula_and_equals_training_at_w_plus_eps():
    method, model = prepared()
    ggpo = method.ggpo
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    # step 0: no momentum yet, so no perturbation; the backward measures each layer's norm
    method.on_step_start(model, 0, opt)
    assert not ggpo.active
    model.train()
    loss_of(model).backward()
    want = {n: grad_norm(layer) for n, layer in ggpo.layers.items()}
    opt.step()
    method.after_update(model, 0)
    opt.zero_grad(set_to_none=True)
    # first value of the moving average: the norm itself. A Gram-matrix trace in float64 against
    # a dense out x in product in float32: both round once per product of O(1) sums over <= 64
    # terms, ~1e-6 relative.
    for n, g in want.items():
        assert float(ggpo.gbar[n]) == pytest.approx(g, rel=1e-5)

    # step 1: the perturbation is the paper's, along AdamW's exp_avg
    method.on_step_start(model, 1, opt)
    assert set(ggpo.active) == set(ggpo.layers)
    reference = copy.deepcopy(model)
    for n, layer in ggpo.layers.items():
        st_a = opt.state[layer.lora_A["default"].weight]["exp_avg"]
        st_b = opt.state[layer.lora_B["default"].weight]["exp_avg"]
        eps = dense(layer, st_a, st_b, float(ggpo.gbar[n]))
        with torch.no_grad():  # the copy computes with W + eps itself, unhooked
            ref = reference.get_submodule(n)
            ref.base_layer.weight.add_(eps)
    saved = dict(ggpo.active)
    loss = loss_of(model)
    loss.backward()
    # the copy's hooks are the original's (deepcopy keeps them): switch them off while it runs
    ggpo.active = {}
    ref_loss = loss_of(reference)
    ref_loss.backward()
    ggpo.active = saved
    # Same function: x (W + eps)^T against x W^T + (x Q^T) P^T, a reassociation of sums of
    # <= 64 fp32 products per entry through two blocks: ~1e-6 relative on an O(1) loss.
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert float(loss) != pytest.approx(float(loss_of(model.eval())), rel=1e-9)  # it perturbs
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ref = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for n, g in got.items():
        # gradients: the same reassociation, backward adds one more product chain; relative to
        # the gradient's own scale
        torch.testing.assert_close(g, ref[n], rtol=1e-4, atol=1e-5 * float(ref[n].abs().max()))
    # W itself was never written
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_nothing_is_perturbed_outside_a_training_step_or_with_adapters_off():
    method, model = prepared()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        method.on_step_start(model, step, opt)
        model.train()
        loss_of(model).backward()
        opt.step()
        method.after_update(model, step)
        opt.zero_grad(set_to_none=True)
    model.train()
    plain = loss_of(model).item()
    method.on_step_start(model, 2, opt)
    assert method.ggpo.active
    assert loss_of(model).item() != plain  # perturbed in the step
    with model.disable_adapter():  # a reference policy: the loaded model, unperturbed
        model_off = loss_of(model).item()
    saved = dict(method.ggpo.active)
    method.ggpo.active = {}
    with model.disable_adapter():
        assert loss_of(model).item() == model_off
    method.ggpo.active = saved
    model.eval()
    assert loss_of(model).item() == plain  # evaluation inside the step: unperturbed
    model.train()
    method.after_update(model, 2)
    assert loss_of(model).item() == plain  # after the step: unperturbed


def test_ggpo_trains_resumes_exactly_and_keeps_no_state_in_the_adapter(tmp_path, cls_data):
    params = {"name": "lora", "r": 4, "ggpo": True}
    sections = {"params": params, "train": {"steps": 4}}
    straight = train(config.from_dict(tiny_recipe(cls_data, tmp_path / "a", **sections)))
    ckpt = assert_resume_exact(straight, cls_data, tmp_path / "b", 2, **sections)
    from safetensors.torch import load_file

    assert any(k.endswith("ggpo_gbar") for k in load_file(str(ckpt / "trainable.safetensors")))
    saved = load_file(str(straight.run_dir / "adapter_model.safetensors"))
    assert not any("ggpo" in k for k in saved)
    # a plain LoRA run with the same seed differs: the perturbation changed the training
    plain = train(
        config.from_dict(
            tiny_recipe(
                cls_data, tmp_path / "c", params={**params, "ggpo": False}, train={"steps": 4}
            )
        )
    )
    assert plain.summary["train_loss"] != straight.summary["train_loss"]


@pytest.mark.parametrize(
    "optimizer,match",
    [
        ({"name": "mezo"}, "optimizer mezo does not keep"),
        ({"name": "sgd"}, "optimizer sgd does not keep"),
        ({"name": "adamw", "state_bits": 8}, "optimizer adamw does not keep"),
    ],
)
def test_optimizers_without_a_first_moment_are_refused(tmp_path, cls_data, optimizer, match):
    recipe = tiny_recipe(
        cls_data, tmp_path / "run", params={"name": "lora", "ggpo": True}, optimizer=optimizer
    )
    with pytest.raises(SlimtuneError, match=match):
        train(config.from_dict(recipe))
    assert not (tmp_path / "run").exists()


def test_ggpo_with_dora_is_refused_in_one_line():
    with pytest.raises(SlimtuneError, match="ggpo does not combine with dora"):
        config._method("params", {"name": "lora", "ggpo": True, "dora": True}, "full")


def test_ggpo_runs_over_a_quantised_base_without_writing_it(tmp_path, cls_data):
    """The perturbation sits beside the layer, so a 4-bit W (which the authors' in-place
    W += eps cannot touch) stays bit-identical while the adapter trains at W + eps."""
    from .test_quantised_bases import quantised_state

    seen = {}

    def on_step(step, model, row):
        if step == 0:
            seen["before"] = quantised_state(model)

    def run(out, ggpo):
        params = {"name": "lora", "r": 4, "ggpo": ggpo}
        recipe = tiny_recipe(cls_data, out, base="nf4", params=params, train={"steps": 3})
        return train(config.from_dict(recipe), on_step=on_step)

    result = run(tmp_path / "a", True)
    assert len(result.method.ggpo.layers) == 2 * result.model.config.num_hidden_layers
    assert all(float(g) > 0 for g in result.method.ggpo.gbar.values())
    after = quantised_state(result.model)
    assert seen["before"] and all(torch.equal(after[k], v) for k, v in seen["before"].items())
    assert run(tmp_path / "b", False).summary["train_loss"] != result.summary["train_loss"]
