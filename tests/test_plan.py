"""Model shapes for the memory planner: bundled configs and exact parameter counts."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from slimtune.errors import SlimtuneError
from slimtune.models import load_model
from slimtune.plan.shapes import ModelShape, bundled, load_shape, read_config

# Published parameter counts (model cards / safetensors metadata) of the bundled configs.
PUBLISHED = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "smollm2-135m": 134_515_008,
    "gemma-3-270m": 268_098_176,
}


def test_bundled_configs_cover_the_models_users_name():
    names = set(bundled())
    for family in ("llama-2-", "llama-3-", "mistral-", "qwen2.5-", "gemma-3-", "smollm2-"):
        assert any(n.startswith(family) for n in names), family


@pytest.mark.parametrize("name", bundled())
def test_parameter_count_matches_the_instantiated_model(name):
    cfg = read_config(name)
    shape = ModelShape.from_config(cfg)
    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg["model_type"], **kwargs))
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    if name in PUBLISHED:
        assert shape.total_params == PUBLISHED[name]


def test_shape_of_the_bundled_real_model_matches_its_weights():
    model, _ = load_model("smollm2-135m")
    assert load_shape("smollm2-135m").total_params == sum(p.numel() for p in model.parameters())


def test_bad_model_configs_are_named(tmp_path):
    with pytest.raises(SlimtuneError, match="not a bundled config"):
        load_shape("no-such-model")
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama",\n "hidden_size": }')
    with pytest.raises(SlimtuneError, match="line 2"):
        load_shape(str(tmp_path))
    bad.write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(SlimtuneError, match="gpt2"):
        load_shape(str(bad))
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(SlimtuneError, match="missing 'num_attention_heads'"):
        load_shape(str(bad))


# --- the planner ------------------------------------------------------------------------------

from dataclasses import replace  # noqa: E402

from slimtune import registry  # noqa: E402
from slimtune.plan import candidates, estimate, label, parse_size, rank, split_method  # noqa: E402
from slimtune.plan.planner import GB, Workload, inference, method, plan  # noqa: E402

TINY = ModelShape(
    family="llama", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
    vocab=256, tied=True,
)  # fmt: skip
W = Workload(seq=32, batch=2, runtime=0.0)


def terms(b, phase=None):
    out = {}
    for t in b.terms:
        if phase is None or t.phase == phase:
            out[t.name] = out.get(t.name, 0.0) + t.bytes
    return out


def test_full_adamw_arithmetic_by_hand():
    b = estimate(TINY, "full", "adamw", W)
    n = TINY.total_params
    assert n == 256 * 64 + 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    t = terms(b)
    assert t["weights"] == 4 * n
    assert t["optimizer state"] == 2 * 4 * n  # two fp32 moments
    assert terms(b, "step")["gradients"] == 4 * n
    # Per token per block, fp32: x, x^, y (attention input), q, k, v (padded batch: k and v
    # repeated to the 4 query heads), attention output, h1, x^2, y2, gate, act, up, product;
    # plus the kernel's log-sum-exp per head.
    h, q, i = 64, 64, 128
    block = 4 * (h + h + h + 3 * q + q + h + h + h + 4 * i) + 4 * 4
    tokens = 64
    # final norm input and normalised input, the head's rows; each block's fp32 mask (B x T x T)
    extra = 3 * 4 * h * tokens + 2 * (2 * 32 * 32 * 4)
    assert t["activations"] == 2 * block * tokens + extra
    assert b.peak == b.total("always") + max(b.phases.values())


def test_fsdp_prices_one_process_share_and_what_it_gathers():
    """train.sharding: fsdp over 2 processes (sharding.py's units: a block each, the rest the
    root): half the weights, optimizer state and step gradients; the root unit's other half,
    two blocks' other halves (one computing, one prefetched) and one block's whole gradients
    while it waits for its reduce-scatter."""
    one = estimate(TINY, "full", "adamw", W)
    two = estimate(TINY, "full", "adamw", replace(W, sharding="fsdp", processes=2))
    a, b = terms(one), terms(two)
    n = TINY.total_params
    assert b["weights"] == a["weights"] / 2 and b["optimizer state"] == a["optimizer state"] / 2
    assert terms(two, "step")["gradients"] == terms(one, "step")["gradients"] / 2
    root = 4 * (256 * 64 + 64)  # tied embedding/head and the final norm
    block = 4 * (n - 256 * 64 - 64) // 2
    assert b["gathered weights"] == root / 2 + 2 * block / 2
    # a block's whole (the head's are priced by the loss terms) and the reduce-scatter's input
    # and output buffers of the largest unit (a block here: the tiny vocabulary's root is less)
    assert block > root
    assert b["unsharded gradients"] == block + block * (1 + 1 / 2)
    assert a["activations"] == b["activations"]  # the same micro-batch per process
    # on the CPU every process first loads the whole model (its other half before sharding)
    assert terms(two, "load") == {"whole model at load": a["weights"] / 2}
    assert "one of 2 processes under train.sharding: fsdp" in two.notes
    # one process: the same as no sharding, but the notes
    same = estimate(TINY, "full", "adamw", replace(W, sharding="fsdp", processes=1))
    assert same.peak == one.peak


def test_budget_with_fsdp_finds_the_fewest_processes():
    shape = load_shape("llama-2-7b")
    work = Workload(seq=1024, batch=1, weights="bf16", device="cuda", sharding="fsdp")
    (r,) = rank(shape, work, 24 * GB, [("full", "adamw")], False, "", True)
    assert r.fits and r.breakdown.peak <= 24 * GB
    n = r.breakdown.work.processes
    fewer = estimate(shape, "full", "adamw", replace(work, processes=n // 2))
    assert n > 1 and fewer.peak > 24 * GB


def test_checkpointing_keeps_block_inputs_and_one_block():
    full = estimate(TINY, "full", "adamw", W)
    ck = estimate(TINY, "full", "adamw", replace(W, checkpointing=True))
    tokens, h = 64, 64
    blocks = terms(full)["activations"] - terms(ck)["activations"]
    per_block = blocks / TINY.layers + h * 4 * tokens  # what the full plan kept per block
    # Byte counts in float64 arithmetic (a division by the layer count): approx's default
    # 1e-6 relative only absorbs that rounding; the planner computes nothing else.
    assert terms(ck)["recompute"] == pytest.approx(per_block)
    assert (
        terms(ck)["activations"] == terms(full)["activations"] - 2 * per_block + 2 * h * 4 * tokens
    )


def test_lora_adapters_and_frozen_base_by_hand():
    b = estimate(TINY, {"name": "lora", "r": 4}, "adamw", W)
    # q (64 x 64) and v (32 x 64) per block: A r x in, B out x r, fp32
    per_block = 4 * 64 + 64 * 4 + 4 * 64 + 32 * 4
    t = terms(b)
    assert b.trainable_params == 2 * per_block
    assert t["adapters"] == 4 * 2 * per_block
    assert t["optimizer state"] == 2 * 4 * 2 * per_block
    assert "autocast copies" not in t
    # Frozen o/gate/up/down keep no input; LoRA keeps the attention input and r per adapter.
    # Block 0's input needs no gradient (the embedding is frozen): its norm keeps nothing.
    h, q, i = 64, 64, 128
    block1 = 4 * (h + h + 3 * q + q + h + 3 * i + 2 * 4) + 4 * 4
    block0 = block1 - 4 * h
    tokens = 64
    extra = 4 * h * tokens + 2 * (2 * 32 * 32 * 4)  # final norm input; per-block masks
    assert t["activations"] == (block0 + block1) * tokens + extra


def test_freeze_last_block_keeps_activations_of_that_block_only():
    b = estimate(TINY, {"name": "freeze", "layers": [-1]}, "sgd", W)
    full = estimate(TINY, "full", "sgd", W)
    assert b.trainable_params == TINY.layer_params
    assert terms(b)["activations"] < terms(full)["activations"] * 0.6
    assert "optimizer state" not in terms(b)  # plain SGD


def test_zeroth_order_has_no_gradients_and_forward_only():
    b = estimate(TINY, "full", "mezo", W)
    t = terms(b)
    assert "gradients" not in t and b.peak_phase == "forward"
    assert terms(b, "backward") == {}
    mom = estimate(TINY, "full", {"name": "zo-sgd-momentum"}, W)
    assert terms(mom)["optimizer state"] - t["optimizer state"] == 4 * TINY.total_params


def test_galore_state_is_low_rank_and_layerwise_keeps_one_gradient():
    r = 4
    b = estimate(TINY, "full", {"name": "galore", "rank": r}, W)
    mats = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 2
    low = 0
    for m, n in mats:  # basis on the smaller side + two moments of the projected gradient
        low += 4 * (r * n + 2 * m * r) if m >= n else 4 * (m * r + 2 * r * n)
    rest = TINY.total_params - sum(m * n for m, n in mats)
    assert terms(b)["optimizer state"] == low + 2 * 4 * rest
    lw = estimate(TINY, "full", {"name": "galore", "rank": r, "layerwise": True}, W)
    assert terms(lw, "backward")["gradients"] == 4 * 256 * 64  # the largest tensor only
    assert "gradients" not in terms(lw, "step")
    eight = estimate(TINY, "full", {"name": "galore", "rank": r, "state_bits": 8}, W)
    assert terms(eight)["optimizer state"] < terms(b)["optimizer state"] / 2


def test_quantised_base_weights():
    b = estimate("llama-2-7b", "lora", "adamw", seq=512, weights="nf4", device="cuda")
    shape = load_shape("llama-2-7b")
    linear = shape.layers * sum(o * i for o, i in shape.linear_shapes().values())
    other = shape.total_params - linear
    # float64 arithmetic on byte counts, summed in another order: approx's default 1e-6.
    assert terms(b)["weights"] == pytest.approx(linear * (0.5 + 1 / 64 + 4 / 16384) + 2 * other)


@pytest.mark.parametrize("name", registry.names("params"))
def test_every_params_method_describes_its_memory(name):
    b = estimate("smollm2-135m", name, "adamw", seq=64, batch=2)
    assert 0 < b.trainable_params <= b.total_params + 10**7
    assert b.peak > terms(b)["weights"]


@pytest.mark.parametrize("name", registry.names("optimizer"))
def test_every_optimizer_describes_its_memory(name):
    b = estimate("smollm2-135m", "full", name, seq=64, batch=2)
    assert b.peak > terms(b)["weights"]
    assert b.trainable_params == b.total_params


def test_methods_without_a_memory_hook_are_refused():
    from slimtune.methods.base import ParamsMethod

    class Bare(ParamsMethod):
        name = "bare"

    with pytest.raises(NotImplementedError, match="bare"):
        plan(TINY, Bare(None), method("optimizer", "adamw"), W)


# Published 7B-class figures and the settings used for each (all on CUDA, so the runtime term is
# the CUDA context, 0.75 GB). LLaMA-Factory's README table (7B): full AMP 120 GB, LoRA 16-bit
# 16 GB, QLoRA 4-bit 6 GB; its example recipes train batch 1 with cutoff_len 2048 and gradient
# checkpointing on. GaLore's README / scripts/single_gpu/llama_7b_checkpointing.sh: 8-bit GaLore
# per layer, rank 1024, batch 16 x 256 tokens, bf16, activation checkpointing: 22.8 GB. LISA
# (Pan et al. 2024): 7B fine-tuning within 24 GB (gamma 2, embeddings and head, AdamW); the
# paper gives no length: read here as pure bf16, batch 1 x 2048, no checkpointing.
HEADLINES = [
    ("full AMP", ("full", "adamw"), dict(weights="fp32", mixed_precision="bf16", checkpointing=True), 120),
    ("LoRA 16-bit", ("lora", "adamw"), dict(weights="bf16", checkpointing=True), 16),
    ("QLoRA 4-bit", ("lora", "adamw"), dict(weights="nf4", checkpointing=True), 6),
    (
        "GaLore 8-bit layer-wise",
        ("full", {"name": "galore", "rank": 1024, "state_bits": 8, "layerwise": True}),
        dict(weights="bf16", checkpointing=True, batch=16, seq=256),
        22.8,
    ),
    ("LISA", ("lisa", "adamw"), dict(weights="bf16"), 24),
]  # fmt: skip


@pytest.mark.parametrize("label,methods,work,published", HEADLINES, ids=[h[0] for h in HEADLINES])
def test_planner_reproduces_published_7b_figures(label, methods, work, published):
    settings = {"seq": 2048, "batch": 1, "device": "cuda", **work}
    b = estimate("llama-2-7b", *methods, **settings)
    # A modelling tolerance (published peaks are rounded, measured on other stacks); the plan
    # itself is exact arithmetic on the shapes, the same on every machine.
    assert abs(b.peak / GB / published - 1) <= 0.20, (label, b.peak / GB)


def test_mezo_is_inference_level_on_7b():
    """MeZO's claim: the memory of inference. Planned at fp16, batch 16 x 512: within 20% of
    a forward-only footprint (weights + runtime + one forward), and far below AdamW's."""
    settings = dict(seq=512, batch=16, weights="fp16", device="cuda")
    mezo = estimate("llama-2-7b", "full", "mezo", **settings)
    forward = inference(load_shape("llama-2-7b"), Workload(**settings))
    assert set(terms(forward)) == {"runtime", "weights", "activations", "loss buffer"}
    assert mezo.peak <= 1.2 * forward.peak, (mezo.peak / GB, forward.peak / GB)
    full = estimate("llama-2-7b", "full", "adamw", **settings, checkpointing=True)
    assert full.peak > 4 * mezo.peak


def test_budget_ranks_what_fits_by_capacity():
    shape = load_shape("llama-2-7b")
    work = Workload(seq=1024, batch=1, weights="bf16", device="cuda")
    ranked = rank(shape, work, 24 * GB)
    fits = [r for r in ranked if r.fits]
    assert fits and all(r.breakdown.peak <= 24 * GB for r in fits)
    caps = [r.breakdown.trainable_params for r in fits]
    assert caps == sorted(caps, reverse=True)
    names = {(label(r.params), label(r.optimizer)) for r in fits}
    assert ("full", "adamw") not in names
    assert {
        ("lora", "adamw"),
        ("full", "mezo"),
        ("full", "galore(layerwise=True,state_bits=8)"),
    } <= names


def test_sizes_and_method_specs():
    assert parse_size("24GB") == 24 * GB == parse_size("24") == parse_size("24 GiB")
    assert parse_size("512MB") == 512 * 2**20
    with pytest.raises(SlimtuneError, match="--budget"):
        parse_size("lots")
    assert split_method("lora") == ("lora", "adamw")
    assert split_method("galore") == ("full", "galore")
    assert split_method("lora+mezo") == ("lora", "mezo")
    with pytest.raises(SlimtuneError, match="did you mean"):
        split_method("lorra")


def _saved_bytes(spec, padded: bool) -> tuple[float, object, ModelShape]:
    """Bytes autograd keeps for backward (distinct storages, parameters excluded) over one
    training forward of the loop's loss on the tiny model prepared by a params method."""
    from pathlib import Path

    from slimtune import config
    from slimtune.methods.base import PrepareContext
    from slimtune.models import tiny_llama, tiny_tokenizer

    from .conftest import autograd_saved_bytes

    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=3)
    shape = ModelShape.from_config(model.config.to_dict())
    ids = torch.randint(5, 200, (2, 32))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :5] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}

    def calibration():
        while True:
            yield batch

    cfg = config._method("params", spec, "full")
    m = registry.get("params", cfg.name)(cfg)
    # scratch space for methods that write there while preparing (PiSSA's initial adapter)
    with tempfile.TemporaryDirectory(prefix="saved-bytes-") as work:
        model = m.prepare(model, PrepareContext(tiny_tokenizer(), Path(work), 0, calibration))
    model.config.use_cache = False
    return autograd_saved_bytes(model, batch), m, shape


SAVED_CASES = [(n, False) for n in registry.names("params")] + [("full", True), ("lora", True)]
# peft's tuners through the generic entry: the planner measures them on the meta device
PEFT_TYPES = {
    "peft-ia3": {"type": "ia3"},
    "peft-loha": {"type": "loha", "target_modules": ["q_proj", "v_proj"], "r": 4},
    "peft-lokr": {"type": "lokr", "target_modules": ["q_proj", "v_proj"], "r": 4},
    "peft-oft": {"type": "oft", "target_modules": ["q_proj"], "r": 4, "oft_block_size": 0},
    "peft-hra": {"type": "hra", "target_modules": ["q_proj", "v_proj"], "r": 4},
    "peft-fourierft": {"type": "fourierft", "target_modules": ["q_proj", "v_proj"]},
}
OTHER_SPECS = {
    "parallel-adapter-both": {"name": "parallel-adapter", "placement": ["attention", "mlp"]},
    "series-adapter-both": {"name": "series-adapter", "placement": ["attention", "mlp"]},
}
SAVED_CASES += [(n, False) for n in [*PEFT_TYPES, *OTHER_SPECS]]


@pytest.mark.parametrize("name,padded", SAVED_CASES)
def test_planned_activations_match_what_autograd_keeps(name, padded):
    spec = {"name": name, "layers": 1} if name in ("lisa", "owlore") else name
    if name in PEFT_TYPES:
        spec = {"name": "peft", **PEFT_TYPES[name]}
    spec = OTHER_SPECS.get(name, spec)
    saved, m, shape = _saved_bytes(spec, padded)
    work = Workload(seq=32, batch=2, runtime=0.0, padded=padded)
    b = plan(shape, m, method("optimizer", "adamw"), work)
    planned = sum(t.bytes for t in b.terms if t.name == "activations")
    # A modelling tolerance between two exact byte counts (the planner's formula, the tensors
    # autograd keeps), not a rounding one: the same on every MKL/ATen path tried (AVX-512, AVX2,
    # default; one or two threads); hft is the closest, 7.4% off.
    assert planned == pytest.approx(saved, rel=0.08), (planned, saved)


def test_plan_cli(capsys, tmp_path):
    from slimtune.cli import main

    assert main(["plan", "--model", "llama-3-8b", "--method", "lora,galore", "--seq", "1024",
                 "--weights", "bf16", "--device", "cuda", "--checkpointing"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "lora + adamw on llama-3-8b" in out and "full + galore on llama-3-8b" in out
    assert "predicted peak:" in out and "optimizer state" in out and "(checkpointed)" in out
    assert main(["plan", "--model", "smollm2-135m", "--budget", "2GB", "--seq", "256"]) == 0
    out = capsys.readouterr().out
    assert "yes   lora + adamw" in out and "no    full + adamw" in out
    assert main(["plan", "--model", "llama-2-70b", "--budget", "1GB"]) == 1  # nothing fits
    capsys.readouterr()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: smollm2-135m}\ndata: {path: x.jsonl, max_seq_len: 64}\n"
                      "params: {name: lora, r: 4}\ntrain: {batch_size: 2}\n")  # fmt: skip
    assert main(["plan", str(recipe), "--json"]) == 0
    (b,) = json.loads(capsys.readouterr().out)
    assert (b["params"], b["workload"]["seq"], b["workload"]["batch"]) == ("lora", 64, 2)
    assert b["trainable_params"] == 30 * 4 * (576 + 576 + 576 + 192)  # r 4 on q and v
    # With a budget, the recipe (its own options: r 4) is ranked among every candidate.
    assert main(["plan", str(recipe), "--budget", "3GB"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith(("yes", "no "))]
    (mine,) = [r for r in rows if r.endswith("your recipe")]
    assert mine.startswith("yes   lora + adamw") and f"{30 * 4 * 1920:,}" in mine
    assert len(rows) == len(candidates())
    assert sum(r.split()[1:4] == ["lora", "+", "adamw"] for r in rows) == 1
    assert main(["plan", "--model", "gpt-5"]) == 2
    assert "not a bundled config" in capsys.readouterr().err
    assert main(["plan", "--model", "smollm2-135m", "--budget", "lots"]) == 2


def test_budget_table_and_recipe_workload_from_the_library():
    """What ``plan --budget`` prints is built in ``slimtune.plan`` (the CLI only parses args):
    the recipe's pair first among the candidates, named as the recipe names it."""
    from slimtune import config
    from slimtune.plan import (
        format_ranking,
        recipe_specs,
        shape_for,
        with_candidates,
        workload_for,
    )

    cfg = config.load(None, ["data.path=x", "data.max_seq_len=64", "params=lora", "params.r=4"])
    work = workload_for(cfg, batch=2, seq=None, runtime="0.5GB")
    assert (work.seq, work.batch, work.runtime) == (64, 2, 0.5 * GB)
    mine = recipe_specs(cfg)
    assert mine[0]["name"] == "lora" and mine[0]["r"] == 4 and mine[1]["name"] == "adamw"
    pairs = with_candidates(mine)
    assert pairs[0] is mine and len(pairs) == len(candidates())
    ranked = rank(shape_for("smollm2-135m"), work, 3 * GB, pairs, True, "smollm2-135m")
    text = format_ranking(ranked, "smollm2-135m", work, 3 * GB, mine)
    lines = text.splitlines()
    assert lines[0] == "smollm2-135m: batch 2 x seq 64, weights fp32, cpu; budget 3.00 GB"
    (row,) = [r for r in lines if r.endswith("your recipe")]
    assert row.startswith("yes   lora + adamw")
    n_fit = sum(r.fits for r in ranked)
    assert lines[-1] == f"{n_fit} of {len(ranked)} fit, largest trainable capacity first"


def test_flops_per_token_by_hand():
    """A frozen weight that gradients pass through costs 2 (forward) + 2 (input gradient)
    FLOPs per token, a trainable one 2 more for its weight gradient; LoRA's A and B are
    trainable matrices (6 each); attention 2 x seq x q per block forward, twice that backward."""
    h, q, kv, i, v, layers, seq = 64, 64, 32, 128, 256, 2, W.seq
    block = h * q + 2 * h * kv + q * h + 3 * h * i  # q, k, v, o, gate, up, down
    dense = layers * block + v * h  # the tied head computes; the embedding is a lookup
    attn = 2 * seq * q * layers
    full = estimate(TINY, "full", "adamw", W)
    assert full.flops_per_token == 6 * dense + 3 * attn
    r = 2
    adapters = layers * r * ((h + q) + 2 * (h + kv) + (q + h))  # A r x in, B out x r
    spec = {"name": "lora", "r": r, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    lora = estimate(TINY, spec, "adamw", W)
    assert lora.trainable_params == adapters
    assert lora.flops_per_token == 4 * dense + 3 * attn + 6 * adapters
    zo = estimate(TINY, "full", "mezo", W)  # two forwards of the batch, no backward
    assert zo.flops_per_token == 2 * (2 * dense + attn)


def test_cpu_plan_names_the_trim_memory_setting_it_assumes(capsys, tmp_path):
    from slimtune import config
    from slimtune.cli import main
    from slimtune.plan.planner import workload_of

    trimmed = estimate(TINY, "lora", "adamw", W)
    untrimmed = estimate(TINY, "lora", "adamw", replace(W, trim_memory=False))
    # untrimmed: live memory plus half the activations for the pages glibc keeps, and a note
    # naming the setting and the range [live, live + activations] the resident set lies in
    acts = terms(trimmed)["activations"]
    assert terms(untrimmed)["allocator retention"] == acts / 2
    assert untrimmed.peak == trimmed.peak + acts / 2
    assert "allocator retention" not in terms(trimmed)
    (note,) = untrimmed.notes
    assert "train.trim_memory=false (CPU), this run's setting" in note
    assert f"between {trimmed.peak / GB:.2f} and {(trimmed.peak + acts) / GB:.2f} GB" in note
    assert "train.trim_memory=true" in trimmed.notes[0]
    for zo in ("mezo", "zo-adam"):  # the forward phase's activations, for forward-only methods
        kept = estimate(TINY, "full", zo, replace(W, trim_memory=False))
        assert kept.by_name()["allocator retention"] == terms(kept)["activations"] / 2
        assert kept.peak_phase == "forward"
    cuda = estimate(TINY, "lora", "adamw", replace(W, device="cuda", trim_memory=False))
    assert not cuda.notes and "allocator retention" not in terms(cuda)
    cfg = config.load(None, ["data.path=x", "train.trim_memory=true"])
    assert (
        workload_of(cfg).trim_memory
        and not workload_of(config.load(None, ["data.path=x"])).trim_memory
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: smollm2-135m, device: cpu}\ndata: {path: x.jsonl}\n")
    assert main(["plan", str(recipe)]) == 0
    assert "note: peak assumes train.trim_memory=false (CPU), this run's setting" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize("flag", ["--method", "--methods"])
def test_plan_takes_both_spellings_of_the_method_option(capsys, flag):
    from slimtune.cli import main

    assert main(["plan", "--model", "smollm2-135m", flag, "lora,mezo", "--seq", "64"]) == 0
    out = capsys.readouterr().out
    assert "lora + adamw on smollm2-135m" in out and "full + mezo on smollm2-135m" in out
