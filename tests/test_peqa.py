"""PEQA: only the quantisation scales train (integers, zero points and everything else stay
bit-identical through slimtune's loop), the artefact is the scales alone, the quantisation
error is round-to-nearest's, 3 bits work, and the integer export reads back exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from slimtune import config
from slimtune.errors import SlimtuneError
from slimtune.loop import train
from slimtune.methods.base import PrepareContext
from slimtune.methods.params.peqa import (
    PEQA,
    QuantLinear,
    pack,
    quant_layers,
    quantise,
    read_quantised,
    unpack,
)
from slimtune.models import load_model, tiny_llama, tiny_tokenizer

from .conftest import assert_resume_exact, tiny_recipe

IDS = torch.tensor([[1, 40, 50, 60, 70, 80, 90, 100, 7, 9]])
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS.to(model.device)).logits


def prepared(**cfg):
    model = tiny_llama(vocab_size=len(tiny_tokenizer()))
    dense = copy.deepcopy(model)
    method = PEQA(PEQA.Config(**cfg))
    model = method.prepare(model, PrepareContext(tiny_tokenizer(), work_dir=None, seed=0))
    return dense, model, method


def train_steps(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for s in range(steps):
        ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(s))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_only_scales_train_through_the_loop_and_the_artefact_is_the_scales(tmp_path, cls_data):
    recipe = tiny_recipe(cls_data, tmp_path / "run", params={"name": "peqa"})
    before = {}

    def on_step(step, model, row):
        if step == 0:  # before the first update
            before.update({n: t.detach().clone() for n, t in model.state_dict().items()})
            before["_trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}

    result = train(config.from_dict(recipe), on_step=on_step)
    trainable = before.pop("_trainable")
    # every linear of both blocks is quantised; its scale is the one tensor that trains
    assert trainable == {f"model.layers.{i}.{n}.scale" for i in range(2) for n in LINEAR_PATHS}
    after = result.model.state_dict()
    assert any(n.endswith(".qweight") for n in after) and any(n.endswith(".zero") for n in after)
    for name, old in before.items():
        if name in trainable:
            assert not torch.equal(after[name], old), f"scale {name} did not change"
        else:  # integers, zero points, embeddings, norms: bit-identical
            assert torch.equal(after[name], old), f"frozen {name} changed"
    assert after["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.uint8

    run_dir = result.run_dir
    scales = load_file(str(run_dir / "peqa_scales.safetensors"))
    assert set(scales) == trainable
    assert all(t.dtype == torch.float32 and t.shape[1] == 1 for t in scales.values())
    settings = json.loads((run_dir / "peqa_config.json").read_text())
    assert settings["bits"] == 4 and settings["group_size"] == 0
    assert not list(run_dir.glob("model*.safetensors"))  # no dense weights in the artefact
    dense_bytes = sum(p.numel() * 4 for p in tiny_llama(vocab_size=259).parameters())
    # one fp32 per output row of 14 linears (1,024 scales, ~5 KB with the header) against
    # ~0.36 MB of fp32 weights
    assert (run_dir / "peqa_scales.safetensors").stat().st_size < 0.02 * dense_bytes

    base, _ = load_model("tiny-llama")
    loaded = PEQA.load(base, run_dir)
    # the base quantised again gives the same integers; same fp32 scales, same products:
    # bit-identical logits
    assert torch.equal(logits(loaded), logits(result.model))


LINEAR_PATHS = [f"self_attn.{n}" for n in LINEARS[:4]] + [f"mlp.{n}" for n in LINEARS[4:]]


@pytest.mark.parametrize("bits,group_size", [(4, 0), (3, 0), (4, 16), (2, 32), (8, 0)])
def test_quantisation_error_is_round_to_nearest(bits, group_size):
    dense, model, _ = prepared(bits=bits, group_size=group_size)
    originals = dict(dense.named_modules())
    layers = quant_layers(model)
    assert len(layers) == 14
    for name, layer in layers.items():
        w = originals[name].weight.detach().double()
        out, n = w.shape
        q = unpack(layer.qweight, n)
        assert int(q.max()) <= 2**bits - 1 and int(layer.zero.max()) <= 2**bits - 1
        s = layer.scale.detach().double()
        g = n // s.shape[1]
        s_full = s.repeat_interleave(g, dim=1)
        err = (w - layer.dequantised().double()).abs()
        # Round-to-nearest on a grid of step s that covers [min(W, 0), max(W, 0)] misses each
        # weight by at most s/2 (a clamp only moves a value that lay exactly half a step out).
        # On top, fp32 rounding: W/s (|W/s + z| <= 2^b) is off by <= 2^(b-24) steps, and the
        # fp32 product s (Wq - z) by 2^-24 |W| <= 2^(b-24) s; 2^(b-20) s bounds both with room.
        # A wrong zero point or scale would miss by a whole step s. Seen: at most 0.49999 s
        # for 2, 3, 4 and 8 bits, per channel and in groups.
        assert (err <= s_full * (0.5 + 2 ** (bits - 20))).all(), name
        # and RTN uses the grid it has: somewhere in the layer the error nears half a step
        assert (err / s_full).max() > 0.4, name


def test_three_bits_train_save_load_merge(tmp_path):
    _, model, method = prepared(bits=3, target_modules=["q_proj", "down_proj"])
    layers = quant_layers(model)
    assert sorted({n.split(".")[-1] for n in layers}) == ["down_proj", "q_proj"]
    assert all(layer.qweight.shape[0] == 3 for layer in layers.values())  # 3 bit-planes
    untrained = logits(model)
    start = {n: m.scale.detach().clone() for n, m in layers.items()}
    train_steps(model)
    want = logits(model)
    assert all(not torch.equal(m.scale, start[n]) for n, m in layers.items())
    # training moved the logits, far beyond fp32 rounding of O(1) logits (~1e-7): a "moved"
    # check, so a loose 1e-4 only makes it stricter about what counts as movement
    assert not torch.allclose(want, untrained, atol=1e-4)

    method.save(model, tiny_tokenizer(), tmp_path)
    loaded = PEQA.load(tiny_llama(vocab_size=len(tiny_tokenizer())), tmp_path)
    assert torch.equal(logits(loaded), want)
    merged = method.merge(copy.deepcopy(model))
    assert not quant_layers(merged)
    assert all(type(m) is torch.nn.Linear for n, m in merged.named_modules() if "q_proj" in n)
    # merge stores the very fp32 weight the forward rebuilt; F.linear gets the same operands
    assert torch.equal(logits(merged), want)


def test_export_quantised_round_trip(tmp_path):
    _, model, method = prepared(bits=4, group_size=32)
    train_steps(model, steps=2)
    path = tmp_path / "peqa_int4.safetensors"
    method.export_quantised(model, path)
    stored = load_file(str(path))
    layers = quant_layers(model)
    assert len(stored) == 3 * len(layers)
    for n, m in layers.items():
        assert torch.equal(stored[f"{n}.qweight"], m.qweight)
        assert torch.equal(stored[f"{n}.zero"], m.zero)
        assert torch.equal(stored[f"{n}.scale"], m.scale.detach())
        # packed: 4 bits per weight (in_features is a multiple of 8 here)
        assert stored[f"{n}.qweight"].numel() == m.out_features * m.in_features // 2
    dense = read_quantised(path)
    merged = dict(method.merge(copy.deepcopy(model)).named_modules())
    for n, w in dense.items():
        assert torch.equal(w, merged[n].weight)


def test_scale_gradient_matches_autograd_of_the_dense_formula():
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 6)
    layer = QuantLinear(lin, bits=4, group_size=8)
    x = torch.randn(2, 5, 24, requires_grad=True)
    layer(x).square().sum().backward()
    gx, gs = x.grad.clone(), layer.scale.grad.clone()
    x.grad = None
    s = layer.scale.detach().clone().requires_grad_(True)
    d = unpack(layer.qweight, 24).double() - layer.zero.double().repeat_interleave(8, dim=1)
    w = s.double().repeat_interleave(8, dim=1) * d
    torch.nn.functional.linear(x.double(), w, lin.bias.double()).square().sum().backward()
    # The custom backward forms the same sums in fp32, in another order than this fp64
    # reference: x gradients are O(1) (seen: 1.2e-7 off), scale gradients O(100), sums over
    # 10 tokens x 8 columns (seen: 1.5e-5 off 250). torch's fp32 defaults (1e-5 absolute +
    # 1.3e-6 relative) hold both; a missing (Wq - z) factor or group sum is O(1) off or more.
    torch.testing.assert_close(gx, x.grad.float())
    torch.testing.assert_close(gs, s.grad.float())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    q = torch.randint(0, 2**bits, (5, 13), dtype=torch.uint8)  # 13: padded to 16 columns
    packed = pack(q, bits)
    assert packed.shape == (bits, 5, 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, 13), q)
    q2, s, z = quantise(torch.zeros(3, 8), bits, 8)  # an all-zero row: exact, no division by 0
    assert not q2.any() and not z.any() and torch.isfinite(s).all()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="bits must be one of"):
        PEQA.Config(bits=5)
    with pytest.raises(ValueError, match="group_size must be >= 0"):
        PEQA.Config(group_size=-1)
    with pytest.raises(SlimtuneError, match="group_size: 48 does not divide"):
        prepared(group_size=48)
    with pytest.raises(SlimtuneError, match="'lm_head' names no linear"):
        prepared(target_modules=["lm_head"])


def test_bf16_model_merges_to_bf16_with_the_same_logits():
    model = tiny_llama(vocab_size=len(tiny_tokenizer())).to(torch.bfloat16)
    method = PEQA(PEQA.Config())
    model = method.prepare(model, PrepareContext(tiny_tokenizer(), work_dir=None, seed=0))
    layer = next(iter(quant_layers(model).values()))
    assert layer.scale.dtype == torch.float32
    want = logits(model)
    merged = method.merge(copy.deepcopy(model))
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    # the forward casts the rebuilt fp32 weight to bf16 exactly as merge stores it
    assert torch.equal(logits(merged), want)


def test_resume_from_a_checkpoint_of_the_scales_is_bitwise_exact(tmp_path, cls_data):
    # a checkpoint holds the scales only; resuming quantises the base again and must land on
    # the same integers and zero points (buffers compared too) and the same trained scales
    params = {"name": "peqa", "bits": 3, "group_size": 16}
    steps = {"steps": 4, "batch_size": 2, "progress": False, "eval_before": False}
    recipe = tiny_recipe(cls_data, tmp_path / "a", params=params, train=steps)
    straight = train(config.from_dict(recipe))
    ckpt = assert_resume_exact(
        straight, cls_data, tmp_path / "b", kill_at=2, params=params, train=steps
    )
    assert ckpt.is_dir()
