"""Zeroth-order optimizers (methods/optim/zo/): their defining behaviour.

No autograd in a step; the weights are bitwise unchanged by the estimate (fp32 and bf16); the
noise is a pure function of its counter; the estimator points along the true gradient on a
convex problem and trains it; sparse MeZO touches only below-threshold weights; the forward
gradient is unbiased on a quadratic; the paired forward equals two separate forwards.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slimtune import config
from slimtune.loop import train
from slimtune.methods.optim import zo

from .conftest import tiny_recipe


class Regression(nn.Module):
    """Linear regression y = W x (+ an embedding and a norm, to exercise those wrappers)."""

    def __init__(self, d: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(d, 1, bias=True)
        nn.init.normal_(self.lin.weight, generator=g)
        self.x = torch.randn(256, d, generator=g)
        self.w_true = torch.randn(1, d, generator=g)
        self.y = self.x @ self.w_true.t()

    def loss(self) -> torch.Tensor:
        return ((self.lin(self.x) - self.y) ** 2).mean()


def regression_optimizer(model: Regression, rule: str = "sgd", **cfg) -> zo.ZerothOrderOptimizer:
    """A zeroth-order optimizer over the regression; its forward stacks the data per copy."""
    from slimtune import registry

    name = {"sgd": "mezo", "momentum": "zo-sgd-momentum", "sign": "zo-sign", "adam": "zo-adam"}
    cls = registry.get("optimizer", cfg.pop("method", name[rule]))

    def forward(batch, spec):
        k = 1 if spec.dual else len(spec.scales)
        err = (model.lin(model.x.repeat(k, 1)) - model.y.repeat(k, 1)) ** 2
        return zo.SegmentForward._finish(err.view(k, -1).mean(dim=1), spec)

    groups = [{"params": list(model.parameters())}]
    return zo.ZerothOrderOptimizer(groups, model, cls.Config(**cfg), cls.rule, forward)


def closure_for(model):
    return lambda forward: forward(None)


def test_noise_is_a_pure_function_of_its_counter():
    key = (3, 5)
    whole = zo._words(key, (1, 0), 0, 1000)
    for start in (0, 1, 15, 16, 17, 333):
        assert torch.equal(zo._words(key, (1, 0), start, 100), whole[start : start + 100])
    assert not torch.equal(zo._words(key, (2, 0), 0, 100), whole[:100])  # another tensor
    assert not torch.equal(zo._words((3, 6), (1, 0), 0, 100), whole[:100])  # another step
    # The noise is integer arithmetic and a table lookup: the same 200,000 numbers on every
    # machine, so these bounds are checks of one fixed sample, set in standard errors: the
    # mean's is 1/sqrt(n) = 2.2e-3 (0.01: 4.5 of them), the variance's sqrt(2/n) = 3.2e-3 at
    # most (0.02: 6), the fourth moment's sqrt(96/n) = 0.022 (0.1: 4.6; uniform's is 1.2
    # away). Seen: |mean| <= 7.8e-4, |var - 1| <= 2.7e-3, kurtosis 3 - 0.011.
    for kind in ("gaussian", "rademacher", "uniform"):
        z = zo._table(kind)[zo._words((0, 0), (0, 0), 0, 200_000)]
        assert abs(z.mean()) < 0.01 and abs(z.var() - 1) < 0.02, kind
    g = zo._table("gaussian")[zo._words((0, 0), (0, 0), 0, 200_000)]
    assert abs((g**4).mean() - 3) < 0.1  # Gaussian kurtosis, not uniform's 1.8


def test_pool_noise_is_consistent_across_slices_and_white():
    """Pool mode: any slice of a tensor's z equals the same slice of its whole z; z has mean 0
    and variance 1 and blocks at random offsets are uncorrelated."""
    w = nn.Parameter(torch.zeros(5 * zo.POOL_BLOCK + 123))
    t = zo._Tensor(w, 7, 0)
    p = zo.Perturber(nn.Linear(1, 1), [t], "gaussian", 0.0, pool_bits=18, seed=0)
    whole = p.z(t, (1, 2), 0, w.numel(), w.detach())
    for start, n in [(0, 10), (zo.POOL_BLOCK - 5, 20), (3 * zo.POOL_BLOCK + 1, zo.POOL_BLOCK)]:
        assert torch.equal(
            p.z(t, (1, 2), start, n, w.detach()[start : start + n]), whole[start : start + n]
        )
    # As above, a fixed sample of n = 327,803: standard errors 1.7e-3 (mean, correlation) and
    # 2.5e-3 (variance), so 0.01 and 0.02 are 6 and 8 of them.
    assert abs(whole.mean()) < 0.01 and abs(whole.var() - 1) < 0.02
    other = p.z(t, (1, 3), 0, w.numel(), w.detach())  # the next step's z
    assert abs(float((whole * other).mean())) < 0.01
    assert not torch.equal(whole, other)
    # The definition, block by block: block b is the pool slice at offset o_b, the b-th pair of
    # 16-bit words of the tensor's offset stream (z is gathered in one call, not block by block)
    pairs = zo.words((1, 2), (7, zo.noise.POOL_STREAM), 0, 12).view(-1, 2)
    pool = p.noise.pool
    for b, (hi, lo) in enumerate(pairs.tolist()):
        o = ((hi << 16) | lo) & ((1 << 18) - 1)
        size = min(zo.POOL_BLOCK, w.numel() - b * zo.POOL_BLOCK)
        assert torch.equal(whole[b * zo.POOL_BLOCK :][:size], pool[o : o + size]), b


def test_estimate_leaves_weights_bitwise_unchanged_and_builds_no_graph():
    model = Regression()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = regression_optimizer(model, lr=0.0, eps=1e-1)
    for _ in range(3):
        loss = opt.step(closure_for(model))
        assert math.isfinite(loss)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # +eps, -eps and back: bit for bit
        assert p.grad is None


def test_bf16_weights_do_not_drift():
    model = Regression().to(torch.bfloat16)
    model.x, model.y = model.x.bfloat16(), model.y.bfloat16()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = regression_optimizer(model, lr=0.0, eps=1e-2)
    for _ in range(20):
        opt.step(closure_for(model))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_estimator_follows_the_true_gradient_and_trains():
    model = Regression()
    true = torch.autograd.grad(model.loss(), model.lin.weight)[0].flatten()
    # Average many one-sample estimates g z (the update direction) at fixed weights.
    opt = regression_optimizer(model, lr=0.0, eps=1e-3)
    est = torch.zeros_like(true)
    n = 400
    for _ in range(n):
        step = opt.param_groups[0]["zo_step"]
        opt.step(closure_for(model))
        (key, g, _), *_ = opt._last_terms
        t = opt.tensors[0]
        est += g * opt.perturber.z(t, key, 0, t.param.numel(), t.param.detach()).flatten()
        assert opt.param_groups[0]["zo_step"] == step + 1
    est /= n
    # The mean of n draws of g z has relative error ~sqrt((d + 1) / n) = 0.15, cos ~0.99 (seen:
    # 0.998, with fixed noise; g's own rounding, u L / eps ~ 1e-3 of it, does not matter).
    cos = torch.nn.functional.cosine_similarity(est, true, dim=0)
    assert cos > 0.9, cos
    # And it trains: MeZO on the regression reaches a low loss.
    model = Regression()
    start = float(model.loss())
    opt = regression_optimizer(model, lr=2e-3, eps=1e-3)
    for _ in range(1500):
        opt.step(closure_for(model))
    # A convex quadratic: the iteration contracts, so rounding differences shrink rather than
    # grow (seen: 1.3e-5 of the start, 770x inside the bound).
    assert float(model.loss()) < 0.01 * start, (start, float(model.loss()))


@pytest.mark.parametrize("rule", ["momentum", "sign", "adam"])
def test_variants_train_the_regression(rule):
    model = Regression()
    start = float(model.loss())
    lr = {"momentum": 2e-4, "sign": 1e-2, "adam": 3e-2}[rule]
    opt = regression_optimizer(model, rule, lr=lr, eps=1e-3)
    for _ in range(1000):
        opt.step(closure_for(model))
    # Convex, as above: seen 2.8e-4 (momentum), 5.3e-4 (sign), 4e-13 (adam) of the start.
    assert float(model.loss()) < 0.1 * start, (rule, start, float(model.loss()))


def test_cons_never_accepts_a_worse_point():
    model = Regression()
    opt = regression_optimizer(model, method="zo-cons", lr=5e-2, eps=1e-3)
    prev = float(model.loss())
    for _ in range(50):
        opt.step(closure_for(model))
        now = float(model.loss())
        # The optimizer chose with its own losses (a stacked forward); the test recomputes
        # them. Two fp32 means of 256 squared residuals, formed in other orders, agree to
        # log2(256) u ~ 5e-7 of the loss, ~5e-6 where a residual is 5x smaller than the terms
        # it is formed from (the loss falls from ~20 to ~0.4). An absolute 1e-6 was below one
        # ulp of the starting loss (1.9e-6). 1e-5 relative covers the rounding and stays below
        # the smallest change a step makes here (2.6e-5 of the loss; seen: every step lowers
        # it), so accepting a worse candidate still fails.
        assert now <= prev * (1 + 1e-5), (prev, now)
        prev = now


def test_sparse_mezo_touches_only_weights_below_threshold():
    model = Regression(d=64)
    before = model.lin.weight.detach().clone()
    opt = regression_optimizer(model, method="sparse-mezo", lr=1e-3, sparsity=0.75)
    thr = opt.state[model.lin.weight]["threshold"]
    small = before.abs() <= thr
    # A count, no rounding: weights at or below their own 25% |w| quantile, 16 of 64 here.
    assert 0.2 < small.float().mean() < 0.3  # a quarter is perturbed at sparsity 0.75
    opt.step(closure_for(model))
    moved = model.lin.weight.detach() != before
    assert moved.any() and not (moved & ~small).any()
    assert not any(
        torch.is_tensor(v) and v.numel() > 1 for s in opt.state.values() for v in s.values()
    )


def test_forward_grad_is_unbiased_on_a_quadratic():
    model = Regression()
    true = torch.autograd.grad(model.loss(), model.lin.weight)[0].flatten()
    opt = regression_optimizer(model, method="forward-grad", lr=0.0)
    est = torch.zeros_like(true)
    n = 2000
    for _ in range(n):
        opt.step(closure_for(model))
        (key, g, _), *_ = opt._last_terms
        t = opt.tensors[0]
        est += g * opt.perturber.z(t, key, 0, t.param.numel(), t.param.detach()).flatten()
    est /= n
    # Unbiased: the mean of g z approaches the gradient (error ~ |grad| sqrt(d / n) = 0.067
    # for d = 9, n = 2000; seen 0.053 with the fixed noise).
    assert torch.linalg.vector_norm(est - true) < 0.15 * torch.linalg.vector_norm(true)
    # The jvp itself is exact: g = grad . z (over weight and bias) for each draw.
    (key, g, _), *_ = opt._last_terms
    grads = torch.autograd.grad(model.loss(), [t.param for t in opt.tensors])
    exact = sum(
        float(
            gr.flatten() @ opt.perturber.z(t, key, 0, t.param.numel(), t.param.detach()).flatten()
        )
        for gr, t in zip(grads, opt.tensors)
    )
    # Forward-mode and reverse-mode AD sum the same 256 x 9 fp32 products in other orders:
    # ~1e-7 relative (seen: 7.8e-8 of |g| ~ 12); 1e-4 relative, while another z is off by O(1).
    assert abs(g - exact) < 1e-4 * (1 + abs(g))


def tiny_zo(tmp_path, data, name="mezo", steps=3, **optim):
    cfg = tiny_recipe(
        data,
        tmp_path,
        model={"name": "tiny-llama", "device": "cpu"},
        optimizer={"name": name, "lr": 1e-3, "eps": 1e-2, **optim},
        train={"steps": steps, "batch_size": 2, "grad_accum": 2},
    )
    return config.from_dict(cfg)


def test_zo_step_builds_no_graph_on_a_real_model(tmp_path, cls_data):
    seen = []

    def check(step, model, row):
        for p in model.parameters():
            assert p.grad is None
        if row is not None:
            seen.append(row)

    orig = torch.Tensor.backward

    def forbidden(*a, **k):
        raise AssertionError("backward called in a zeroth-order step")

    torch.Tensor.backward = forbidden
    try:
        result = train(tiny_zo(tmp_path / "run", cls_data), on_step=check)
    finally:
        torch.Tensor.backward = orig
    assert len(seen) == 3 and all("projected_grad" in r for r in seen)
    assert result.summary["optimizer_state_bytes"] == 0


def tiny_gemma3() -> nn.Module:
    """A 2-block Gemma-3 text model: its input embedding is a subclass that scales its output."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return Gemma3ForCausalLM(cfg)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_paired_forward_equals_separate_forwards(tmp_path, cls_data, arch):
    """The one stacked forward (W + eps z on copy 1, W - eps z on copy 2) gives the losses of
    two plain forwards of the model with those weights, including the tied embedding/head (and
    Gemma's embedding subclass, which scales what it looks up)."""
    from slimtune.data import collate, load_splits
    from slimtune.loss import causal_lm_loss, find_head

    cfg = tiny_zo(tmp_path / "run", cls_data)
    from slimtune.models import load_model

    model, tok = load_model("tiny-llama", "fp32", device=None)
    if arch == "gemma3":
        model = tiny_gemma3()
    model.config.use_cache = False
    splits = load_splits(cfg.data, tok)
    batch = collate(splits.train[:4], tok.pad_token_id)
    groups = [{"params": [p for p in model.parameters()]}]
    opt = zo.ZerothOrder(cfg.optimizer).build(groups, model)
    assert opt.forward.blocked  # the trainable head goes through the vocabulary-block path
    eps = 1e-2
    spec = zo._Pass((0, 7), [eps, -eps, 0.0], active={id(t.param): t for t in opt.tensors})
    model.eval()
    with torch.no_grad(), opt.perturber.perturbed(spec):
        paired = opt.forward(batch, spec)
    opt.perturber.remove()
    head = find_head(model)
    for j, s in enumerate([eps, -eps, 0.0]):
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for t in opt.tensors:
                w = t.param.detach()
                w.add_(opt.perturber.z(t, spec.key, 0, w.numel(), saved[opt.names[t.pid]]), alpha=s)
            plain, _ = causal_lm_loss(model, head, batch, 256)
            for n, p in model.named_parameters():
                p.copy_(saved[n])
        # The stacked forward and a plain one run the same products on the same perturbed
        # values, grouped into other matrix shapes: loss sums of ~200 agree to ~1e-7 relative
        # (seen: 3e-5 absolute, 1.4e-2 of the tolerance); a wrong sign or scale of eps z moves
        # them by ~eps |grad . z|, far more.
        assert torch.allclose(paired[j], plain, rtol=1e-5, atol=1e-5), (j, paired[j], plain)


@pytest.mark.parametrize("shape", [(10, 3, 8), (10, 8), (10, 2, 3, 8)])
def test_stacked_linear_writes_each_copy_into_one_output(monkeypatch, shape):
    """A plain nn.Linear over stacked copies multiplies each copy straight into its slice of one
    output (no concatenation of per-copy outputs) and computes bit for bit what the module's
    own forward computes on each copy: the same GEMM calls on the same operands."""
    from slimtune.methods.optim.zo import perturbation

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4, bias=False))
    x = torch.randn(shape)  # two stacked copies of 5 rows
    tensors = [zo.PerturbedTensor(p, i, 0) for i, p in enumerate(model.parameters())]
    perturber = zo.Perturber(model, tensors, "gaussian", 0.0, 22, 0)
    spec = zo.Pass((0, 3), [1e-2, -1e-2], active={id(t.param): t for t in tensors})

    def run():
        with torch.no_grad(), perturber.perturbed(spec):
            return model(x)

    calls, real = [], perturbation._LinearInto.run
    monkeypatch.setattr(
        perturbation._LinearInto, "run", lambda self, j, s: (calls.append(j), real(self, j, s))
    )
    fast = run()
    assert calls == [0, 1, 0, 1]  # both layers, both copies took the fast path
    monkeypatch.setattr(perturbation._LinearInto, "of", classmethod(lambda cls, *a: None))
    assert torch.equal(fast, run())
    assert not torch.equal(fast[:5], fast[5:])  # the copies saw different weights


@pytest.mark.parametrize(
    "params",
    [
        {"name": "lora", "target_modules": ["q_proj", "v_proj"]},
        {"name": "prompt-tuning", "num_virtual_tokens": 4},
        {"name": "prefix-tuning", "num_virtual_tokens": 4},
        {"name": "lisa", "layers": 1, "interval": 1},
        {"name": "ia3"},
        {"name": "vera", "r": 16},
        {"name": "peft", "type": "loha", "target_modules": ["q_proj", "v_proj"], "r": 4},
        {"name": "p-tuning", "num_virtual_tokens": 4},
        {"name": "nola", "bases_a": 8, "bases_b": 8},
        {"name": "ssf"},
        {"name": "loldu", "r": 4},
        {"name": "series-adapter", "bottleneck": 8},
    ],
    ids=lambda p: p.get("type", p["name"]),
)
def test_mezo_over_params_methods(tmp_path, cls_data, params):
    """MeZO moves exactly the trainable tensors of adapters, virtual tokens and LISA's sampled
    blocks, and the rest stays bitwise frozen."""
    before, trainable = {}, {}

    def snap(step, model, row):
        if row is None:
            before.update({n: p.detach().clone() for n, p in model.named_parameters()})
        if step < 3:  # LISA re-samples: record what trains in each step
            trainable[step] = {n for n, p in model.named_parameters() if p.requires_grad}

    recipe = tiny_recipe(
        cls_data,
        tmp_path / "run",
        model={"name": "tiny-llama", "device": "cpu"},
        params=params,
        optimizer={"name": "mezo", "lr": 1e-2, "eps": 1e-1},
        train={"steps": 3, "batch_size": 2},
    )
    result = train(config.from_dict(recipe), on_step=snap)
    after = dict(result.model.named_parameters())
    ever = set().union(*trainable.values()) if params["name"] == "lisa" else trainable[0]
    for n, old in before.items():
        if n not in ever:
            assert torch.equal(after[n], old), f"frozen {n} changed"
    assert any(not torch.equal(after[n], before[n]) for n in ever)


def test_no_wrapper_outlives_a_step(tmp_path, cls_data):
    """After training, no module keeps a zeroth-order forward wrapper (a deep copy for merge or
    export would otherwise call the original modules)."""
    result = train(tiny_zo(tmp_path / "run", cls_data, steps=2))
    assert not [m for m in result.model.modules() if "forward" in m.__dict__]
