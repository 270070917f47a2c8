"""peft's tuners behind slimtune's names: options checked against peft's config classes with
one line, peft's own artefacts, AdaLoRA's rank allocation and the methods' loss terms running
through the step contract (the contract suite covers training, save/load and merge)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model

from slimtune import config
from slimtune.errors import SlimtuneError
from slimtune.loop import train
from slimtune.models import load_model, tiny_llama

from .conftest import tiny_recipe

NAMED = {
    "ia3": "IA3",
    "miss": "MISS",
    "bone": "MISS",
    "vera": "VERA",
    "kasa": "LORA",
    "p-tuning": "P_TUNING",
    "llama-adapter": "ADAPTION_PROMPT",
    "adalora": "ADALORA",
}


def parse(params):
    return config.from_dict({"params": params, "data": {"path": "unused.jsonl"}}).params


def test_unknown_peft_field_is_one_line_naming_the_class_and_a_guess():
    with pytest.raises(SlimtuneError) as e:
        parse({"name": "ia3", "target_modulez": ["k_proj"]})
    msg = str(e.value)
    assert "\n" not in msg
    assert "'target_modulez' is not a field of peft's IA3Config" in msg
    assert "did you mean 'target_modules'" in msg


def test_unknown_type_refused_tuner_and_bad_value_are_one_line():
    with pytest.raises(SlimtuneError, match=r"peft has no tuner 'ia4' \(did you mean 'ia3'\?\)"):
        parse({"name": "peft", "type": "ia4"})
    with pytest.raises(SlimtuneError, match="X-LoRA mixes LoRA adapters trained before"):
        parse({"name": "peft", "type": "xlora"})
    with pytest.raises(SlimtuneError, match="peft's IA3Config: .*feedforward_modules") as e:
        parse({"name": "ia3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]})
    assert "\n" not in str(e.value)
    with pytest.raises(SlimtuneError, match="use params: lora"):
        parse({"name": "peft", "type": "lora", "init_lora_weights": "pissa"})
    with pytest.raises(SlimtuneError, match="options: expected a mapping"):
        parse({"name": "peft", "type": "ia3", "options": [1]})


def test_flat_and_nested_options_are_the_same_recipe_and_round_trip():
    flat = parse({"name": "peft", "type": "lokr", "r": 4, "target_modules": ["q_proj"]})
    nested = parse(
        {"name": "peft", "type": "lokr", "options": {"r": 4}, "target_modules": ["q_proj"]}
    )
    assert flat == nested and flat.options == {"r": 4, "target_modules": ["q_proj"]}
    recipe = {"params": {"name": "peft", "type": "lokr", "r": 4}, "data": {"path": "x.jsonl"}}
    again = config.from_dict(config.from_dict(recipe).to_dict())
    assert again.params == parse({"name": "peft", "type": "lokr", "r": 4})
    assert parse("ia3").options == {}  # peft's defaults for the architecture


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_tuners_write_peft_artefacts_that_peft_loads(tmp_path, cls_data, name):
    extra = {
        "vera": {"r": 16},
        "p-tuning": {"num_virtual_tokens": 4},
        "llama-adapter": {"adapter_len": 4, "adapter_layers": 1},
        "adalora": {"init_r": 4, "target_r": 2},
        "kasa": {"r": 4},
    }.get(name, {})
    recipe = tiny_recipe(cls_data, tmp_path / "run", params={"name": name, **extra})
    result = train(config.from_dict(recipe))
    saved = json.loads((result.run_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == NAMED[name]
    ids = torch.tensor([[1, 30, 31, 32, 33, 34]])
    result.model.eval()
    base, _ = load_model("tiny-llama")
    theirs = PeftModel.from_pretrained(base, result.run_dir).eval()
    with torch.no_grad():
        # the same fp32 tensors through the same peft layers: equal up to a few ulps of the
        # tiny model's O(1) logits (summation order only); 1e-5 absolute, as in the contract
        torch.testing.assert_close(
            theirs(input_ids=ids).logits, result.model(input_ids=ids).logits, atol=1e-5, rtol=0
        )


def test_adalora_allocates_ranks_inside_the_loop_step(tmp_path, cls_data):
    """With 8 steps, tinit 2 and tfinal 2, peft's budget falls from init_r to target_r per
    module between steps 2 and 6 and stays; the masked singular values are exactly zero."""
    params = {"name": "adalora", "init_r": 4, "target_r": 1, "tinit": 2, "tfinal": 2, "deltaT": 1}
    recipe = tiny_recipe(cls_data, tmp_path / "run", params=params, train={"steps": 8})
    kept = []

    def on_step(step, model, row):  # step 0: before training (E starts at zero)
        if step > 0:
            kept.append(
                sum(int((p != 0).sum()) for n, p in model.named_parameters() if "lora_E" in n)
            )

    result = train(config.from_dict(recipe), on_step=on_step)
    modules = sum(1 for n, _ in result.model.named_parameters() if "lora_E" in n)
    assert len(kept) == 8 and kept[0] == 4 * modules  # up to tinit: every rank
    assert kept[-1] == 1 * modules  # the final budget: target_r per module on average
    assert kept == sorted(kept, reverse=True)
    saved = json.loads((result.run_dir / "adapter_config.json").read_text())
    assert saved["rank_pattern"]  # the allocation travels with the artefact


def test_adalora_orthogonality_term_equals_peft_and_reaches_the_gradient():
    """peft adds orth_reg_weight x its orthogonality term to a loss it computes itself; slimtune
    computes the loss, so the method gives the same term through ``regulariser``."""
    from slimtune import registry

    cfg = parse({"name": "adalora", "init_r": 4, "target_r": 2, "orth_reg_weight": 0.5})
    method = registry.build("params", cfg)
    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=2)
    peft_cfg = AdaLoraConfig(
        task_type="CAUSAL_LM", init_r=4, target_r=2, total_step=10, orth_reg_weight=0.5,
        target_modules=["q_proj", "v_proj"], init_lora_weights=False,
    )  # fmt: skip
    ours = get_peft_model(model, peft_cfg)
    ids = torch.tensor([[1, 30, 31, 32, 33, 34]])
    with_reg = ours(input_ids=ids, labels=ids).loss
    plain = ours.base_model.model(input_ids=ids, labels=ids).loss
    term = method.regulariser(ours)
    # the same float32 norms summed in the same order: a few ulps of an O(1) value
    torch.testing.assert_close(term, with_reg - plain, atol=1e-6, rtol=1e-5)
    term.backward()
    a = next(p for n, p in ours.named_parameters() if ".lora_A." in n)
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_kasa_loss_term_reaches_the_step_and_a_forward_only_optimizer_is_refused(
    tmp_path, cls_data
):
    big = {"name": "kasa", "r": 4, "kasa_config": {"beta": 10.0, "gamma": 10.0}}
    none = {"name": "kasa", "r": 4, "kasa_config": {"beta": 0.0, "gamma": 0.0}}
    steps = {"steps": 1}
    rows = {}
    for key, params in (("big", big), ("none", none)):
        recipe = tiny_recipe(cls_data, tmp_path / key, params=params, train=steps)
        run_dir = train(config.from_dict(recipe)).run_dir
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        rows[key] = [json.loads(x) for x in lines if '"lr"' in x][-1]
    # the term is minimised with the loss and reported apart: the first step's objective loss
    # is the same model's on the same batch (the term only changes the update)
    assert rows["big"]["regulariser"] > rows["none"]["regulariser"] >= 0
    # ... up to the float32 rounding of the summed step loss it is recovered from: a few ulps
    # of loss + term (8 ulps allowed; a term left in moves it by the whole term)
    with_term = rows["big"]
    ulps = 8 * 2**-23 * (with_term["loss"] + with_term["regulariser"])
    assert with_term["loss"] == pytest.approx(rows["none"]["loss"], abs=ulps)
    recipe = tiny_recipe(cls_data, tmp_path / "zo", params=big, optimizer={"name": "mezo"})
    with pytest.raises(SlimtuneError, match="singular-value regularisers need gradients"):
        train(config.from_dict(recipe))


def test_adalora_with_a_zeroth_order_optimizer_is_one_line(tmp_path, cls_data):
    recipe = tiny_recipe(
        cls_data, tmp_path / "run", params={"name": "adalora"}, optimizer={"name": "mezo"}
    )
    with pytest.raises(SlimtuneError, match="re-allocates ranks from gradients"):
        train(config.from_dict(recipe))


def test_generic_peft_lora_equals_slimtune_lora(tmp_path, cls_data):
    """``params: peft`` with peft's LoRA fields trains the same model as ``params: lora``."""
    runs = {}
    for key, params in (
        ("lora", {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
        ("peft", {"name": "peft", "type": "lora", "r": 4, "lora_alpha": 8,
                  "target_modules": ["q_proj", "v_proj"]}),
    ):  # fmt: skip
        runs[key] = train(config.from_dict(tiny_recipe(cls_data, tmp_path / key, params=params)))
    a = dict(runs["lora"].model.named_parameters())
    for name, p in runs["peft"].model.named_parameters():
        assert torch.equal(p, a[name]), name  # same seed, same ops: bit-identical
    assert isinstance(LoraConfig, type)
