"""GaLore: parity with the reference (galore-torch), low-rank state, layer-wise mode
(accumulation honoured, clipping real), 8-bit state, checkpoints that load with weights_only."""

from __future__ import annotations

import io
import math

import pytest
import torch

from slimtune import config
from slimtune.loop import train
from slimtune.methods.optim.galore import GaLoreAdamW, galore_param_groups, make_basis, project
from slimtune.models import load_model

from .conftest import tiny_recipe


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model, _ = load_model("tiny-llama")
    return model


def batches(n: int, seed: int = 1, batch: int = 2, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (batch, length), generator=g) for _ in range(n)]


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def test_projection_side_follows_the_shape():
    tall, wide = torch.randn(12, 5), torch.randn(5, 12)
    q = make_basis(tall, 3)  # m >= n: right, r x n
    p = make_basis(wide, 3)  # m < n: left, m x r
    assert q.shape == (3, 5) and p.shape == (5, 3)
    assert project(tall, q).shape == (12, 3) and project(wide, p).shape == (3, 12)
    # LAPACK's singular vectors are orthonormal to a small multiple of n u (n = 5, u = 6e-8:
    # fp32's unit roundoff), ~3e-7 (seen: <= 4.2e-7 on every MKL/ATen path); 1e-5 is far from
    # a wrong side or an unnormalised basis (errors of order 1).
    torch.testing.assert_close(q @ q.t(), torch.eye(3), atol=1e-5, rtol=0)


def test_parity_with_galore_torch_after_20_steps():
    """Same tiny model, seed and batches; galore-torch's GaLoreAdamW is the reference.

    Each step the gradients are computed once, on our model, and both optimizers are given the
    same values, so what is compared is the optimizers alone: the same SVD basis (the same fp32
    LAPACK call on the same values, refreshed at steps 1, 6, 11, 16), the same Adam moments in
    the projected space, the same projected-back, scaled update and decoupled weight decay.
    Letting each model compute its own gradients would compare a chaotic system instead: a
    one-ulp difference in a weight changes the next gradient, and the SVD refresh turns that
    into a rotation of the basis of order eps/(singular-value gap); with MKL's AVX2 path (AMD
    CPUs, or MKL_CBWR=AVX2 here) that grew to 6.5e-4 in 20 steps.

    Tolerance 2e-6 absolute, from the operations. Tensors without a projection (embedding,
    norms) take the same elementwise ops in the same order on both sides and end bitwise equal.
    The projected matrices differ only in the summation order of two products: the reference
    keeps LAPACK's column-major V^T/U slice, we a contiguous copy, so BLAS runs other kernels
    for R = G Q^T (n <= 64 terms) and N Q (r = 4 terms). Each side's R is within
    n u sum|G||Q| of the exact one (u = 6e-8, fp32's unit roundoff); Adam's direction
    m / (sqrt(v) + eps) passes that on with a factor up to (1 - b1) / (sqrt(v) + eps), large
    (to 1e5) for components near zero (seen: |R| down to 1e-8), and the update multiplies it by
    step_size * scale * |Q|. Carried through the moments and summed over the 20 steps with
    this run's own gradients, that first-order worst case is 8.4e-7 on the worst element;
    adding the update and the weight decay to |w| < 0.125 may round 1 ulp (7.5e-9) apart twice
    a step, 3e-7 more. Nothing else feeds back (the gradients are shared), so the difference
    stays under 1.2e-6. Measured: 0 with MKL's AVX-512 and SSE4.2 paths, <= 7.5e-9
    (1 ulp) with its AVX2 and COMPATIBLE paths (MKL_CBWR), one thread or two,
    ATEN_CPU_CAPABILITY default or avx2. A real deviation is larger: weight decay scaled by
    alpha moves the result by 1.3e-5, moments reset at a basis refresh by 1.1e-3."""
    from galore_torch import GaLoreAdamW as Reference

    rank, gap, scale, lr, wd = 4, 5, 0.25, 1e-3, 0.01
    ours_model, ref_model = tiny_model(), tiny_model()
    ours = GaLoreAdamW(galore_param_groups(ours_model, rank, gap, scale, wd), lr=lr)
    ref_groups = []
    for g in galore_param_groups(ref_model, rank, gap, scale, wd):
        g = dict(g)
        if g.pop("rank") is not None:
            g.update(rank=rank, update_proj_gap=g.pop("update_gap"), proj_type="std")
        ref_groups.append(g)
    ref = Reference(ref_groups, lr=lr, weight_decay=wd, no_deprecation_warning=True)
    assert any("rank" in g for g in ref.param_groups)
    for ids in batches(20):
        ours.zero_grad()
        ref.zero_grad()
        lm_loss(ours_model, ids).backward()
        for a, b in zip(ours_model.parameters(), ref_model.parameters()):
            b.grad = a.grad.clone()
        ours.step()
        ref.step()
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0, msg=name)
    # and it trained: the weights moved far more than the tolerance
    start = tiny_model()
    moved = max(
        (a - b).abs().max().item() for a, b in zip(ours_model.parameters(), start.parameters())
    )
    assert moved > 1e-3


def test_state_is_low_rank_and_tensors_only():
    model = tiny_model()
    opt = GaLoreAdamW(galore_param_groups(model, rank=2), lr=1e-3)
    lm_loss(model, batches(1)[0]).backward()
    opt.step()
    low = {id(p) for p in opt.param_groups[0]["params"]}
    for p, state in opt.state.items():
        if id(p) in low:
            assert min(state["exp_avg"].shape) == 2, (p.shape, state["exp_avg"].shape)
            assert state["exp_avg"].numel() < p.numel()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)  # no Python objects in the state


def _run(tmp_path, data, name, accum=1, **optim):
    recipe = tiny_recipe(
        data,
        tmp_path / name,
        optimizer={"name": "galore", "lr": 1e-2, "rank": 4, "update_gap": 2, **optim},
        train={
            "steps": 4,
            "batch_size": 4 // accum,
            "grad_accum": accum,
            "max_grad_norm": 0.0,
            "progress": False,
            "eval_before": False,
        },
    )
    return train(config.from_dict(recipe))


@pytest.mark.parametrize("accum", [1, 4])
def test_layerwise_equals_whole_step(tmp_path, cls_data, accum):
    """Layer-wise runs each parameter's update inside backward, whole-step after it: the same
    floating-point operations on the same values, as each update reads only its own gradient
    and state, so the two agree bitwise on any CPU (seen: 0 under MKL's AVX-512, AVX2 and
    COMPATIBLE paths, ATen default/AVX2, one or two threads). The 1e-6 absolute tolerance is
    no rounding budget (4 Adam steps with SVD refreshes would magnify a one-ulp difference far
    beyond it); a different operation order would have to be argued anew. With accumulation 4
    this also shows the hooks wait for the last micro-batch: stepping on every micro-batch (the
    reference's behaviour) would give other weights."""
    whole = _run(tmp_path, cls_data, f"whole{accum}", accum)
    layer = _run(tmp_path, cls_data, f"layer{accum}", accum, layerwise=True)
    assert whole.summary["train_loss"] == pytest.approx(layer.summary["train_loss"], abs=1e-6)
    for (n, a), b in zip(whole.model.named_parameters(), layer.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)


def test_layerwise_clipping_is_real():
    """The gradients the update sees are clipped: step 1 by each parameter's share of the
    budget, later steps by max_norm / (global norm of the previous step)."""
    model = tiny_model()
    opt = GaLoreAdamW(
        galore_param_groups(model, rank=4), lr=1e-3, layerwise=True, max_grad_norm=1e-3
    )
    seen: list[float] = []
    original = opt._step_param

    def spy(p, grad, group):
        seen.append(float(grad.float().pow(2).sum()))
        original(p, grad, group)

    opt._step_param = spy
    norms = []
    for ids in batches(3):
        seen.clear()
        lm_loss(model, ids).backward()
        norms.append(opt.grad_norm())
        applied = math.sqrt(sum(seen))
        opt.step()
        assert all(p.grad is None for p in model.parameters())  # freed inside backward
        assert norms[-1] > 1e-2  # raw gradients (norm ~3.3) are far above the budget...
        # Norms are fp32 sums of squares (torch's cascade summation, ~log2(16576) u ~ 1e-6
        # relative) of the gradient scaled by a coefficient (one more rounding per element):
        # applied and expected agree to ~1e-6 (seen: 6.5e-8); rel 1e-4 leaves 100x, and a wrong
        # coefficient (no clipping, last step's share) is off by a factor, not 1e-4.
        if len(norms) == 1:
            assert applied <= 1e-3 * (1 + 1e-4)  # ...and what was applied is within it
        else:
            expected = norms[-1] * 1e-3 / (norms[-2] + 1e-6)
            assert applied == pytest.approx(expected, rel=1e-4)


def test_8bit_state_is_uint8_and_tracks_fp32(tmp_path, cls_data):
    fp32 = _run(tmp_path, cls_data, "fp32", layerwise=True)
    q8 = _run(tmp_path, cls_data, "q8", layerwise=True, state_bits=8)
    assert q8.summary["optimizer_state_bytes"] < 0.5 * fp32.summary["optimizer_state_bytes"]
    # A modelling bound, not a rounding one: quantised moments change the steps a little, and
    # the mean loss of the 4 steps (~3.6) moved by 2.2e-4 (the same with MKL's AVX2 path, ATen
    # default kernels, one thread); 0.05 leaves 200x. Rounding differences are ~1e-7 of that.
    assert abs(q8.summary["train_loss"] - fp32.summary["train_loss"]) < 0.05


def test_8bit_state_survives_load_state_dict():
    model = tiny_model()
    opt = GaLoreAdamW(galore_param_groups(model, rank=4), lr=1e-3, state_bits=8)
    lm_loss(model, batches(1)[0]).backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    again = GaLoreAdamW(galore_param_groups(model, rank=4), lr=1e-3, state_bits=8)
    again.load_state_dict(torch.load(buf, weights_only=True))
    dtypes = {k: v.dtype for s in again.state.values() for k, v in s.items()}
    assert dtypes["exp_avg_q"] == torch.uint8 and dtypes["exp_avg_absmax"] == torch.float32


def test_bf16_moments_stay_fp32_after_load():
    model = tiny_model().to(torch.bfloat16)
    opt = GaLoreAdamW(galore_param_groups(model, rank=4), lr=1e-3)
    lm_loss(model, batches(1)[0]).backward()
    opt.step()
    again = GaLoreAdamW(galore_param_groups(model, rank=4), lr=1e-3)
    again.load_state_dict(opt.state_dict())
    assert all(s["exp_avg"].dtype == torch.float32 for s in again.state.values())


# --- Natural GaLore ------------------------------------------------------------------------------


@pytest.mark.parametrize("s,k", [(1, 6), (3, 10), (8, 8), (20, 64)])
def test_woodbury_solve_equals_explicit_inverse(s, k):
    from slimtune.optim import woodbury_natural_gradient

    g = torch.Generator().manual_seed(s * 100 + k)
    history = torch.randn(s, k, generator=g, dtype=torch.float64)
    grad = torch.randn(k, generator=g, dtype=torch.float64)
    damping = 1e-1
    fisher = damping * torch.eye(k, dtype=torch.float64) + history.t() @ history
    explicit = torch.linalg.inv(fisher) @ grad
    # float64: both solves are backward stable, so they differ by ~cond(F) eps64 |x|, with
    # cond(F) <= (0.1 + (sqrt(20) + 8)^2) / 0.1 ~ 1.6e3 and |x| <= |g| / 0.1 ~ 80: <= ~1e-11
    # (seen: <= 1.2e-12 on every MKL path). A float32 solve would be off by ~1e-2.
    torch.testing.assert_close(
        woodbury_natural_gradient(history, grad, damping), explicit, atol=1e-9, rtol=1e-9
    )


def test_natural_galore_history_is_counted_and_reset_with_the_basis():
    from slimtune.optim import NaturalGaLoreAdamW

    model = tiny_model()
    opt = NaturalGaLoreAdamW(galore_param_groups(model, rank=2, update_gap=3), lr=1e-3, history=4)
    lens = []
    for ids in batches(4):
        opt.zero_grad()
        lm_loss(model, ids).backward()
        opt.step()
        first = opt.state[opt.param_groups[0]["params"][0]]
        lens.append(int(first["history_len"]))
    assert lens == [1, 2, 3, 1]  # the basis is recomputed before step 4
    hist = first["history"]
    assert hist.shape == (4, first["exp_avg"].numel())
    m2 = tiny_model()
    plain = GaLoreAdamW(galore_param_groups(m2, rank=2, update_gap=3), lr=1e-3)
    lm_loss(m2, batches(1)[0]).backward()
    plain.step()
    assert opt.state_bytes() > plain.state_bytes()  # the history is state, and counted


# --- GradNormLoRP --------------------------------------------------------------------------------


def test_gradnorm_lorp_gradients_equal_autograd():
    """dL/dg and dL/dV from the chain-rule formulas == autograd on W = g V / ||V||_row."""
    from slimtune.optim import weight_norm_grads

    gen = torch.Generator().manual_seed(0)
    m, n = 7, 5
    v = torch.randn(m, n, generator=gen, dtype=torch.float64, requires_grad=True)
    mag = torch.randn(m, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(11, n, generator=gen, dtype=torch.float64)
    target = torch.randn(11, m, generator=gen, dtype=torch.float64)
    w = mag[:, None] * v / v.norm(dim=1, keepdim=True)
    w.retain_grad()
    loss = ((x @ w.t() - target) ** 2).sum()
    loss.backward()
    vnorm = v.detach().norm(dim=1)
    unit = v.detach() / vnorm[:, None]
    grad_g, grad_v = weight_norm_grads(w.grad, unit, mag.detach(), vnorm)
    # float64, 7 x 5: the formula and autograd sum at most 7 products of O(10) terms in another
    # order, a few eps64 * 10 ~ 1e-14 (seen: 7e-15); float32 rounding would be ~1e-6.
    torch.testing.assert_close(grad_g, mag.grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grad_v, v.grad, atol=1e-10, rtol=1e-10)


def test_gradnorm_lorp_keeps_the_learned_magnitude():
    """The magnitude is state that Adam moves (the public code overwrites it with ||W||)."""
    from slimtune.optim import GradNormLoRPAdamW

    model = tiny_model()
    opt = GradNormLoRPAdamW(galore_param_groups(model, rank=2), lr=1e-2)
    for ids in batches(3):
        opt.zero_grad()
        lm_loss(model, ids).backward()
        opt.step()
    p = opt.param_groups[0]["params"][0]
    state = opt.state[p]
    # One run, not two: W = g V / ||V|| row by row, so ||W_i|| = |g_i| up to the rounding of a
    # 64-term fp32 norm and one division, ~1e-7 relative (seen: 3e-8 absolute); 1e-5 absolute
    # and relative.
    torch.testing.assert_close(
        p.detach().norm(dim=1), state["magnitude"].abs(), atol=1e-5, rtol=1e-5
    )
    assert set(state) >= {"magnitude", "vnorm", "magnitude_exp_avg", "exp_avg", "basis"}
    # no full-size copy of V in the state
    assert all(t.numel() < p.numel() for t in state.values())


def test_galore_layerwise_8bit_on_a_bf16_base(tmp_path, cls_data):
    before = {}

    def snap(step, model, row):
        if row is None:
            before.update({n: p.detach().clone() for n, p in model.named_parameters()})

    recipe = tiny_recipe(
        cls_data,
        tmp_path / "bf16",
        model={"name": "tiny-llama", "dtype": "bf16"},
        optimizer={"name": "galore", "lr": 1e-2, "rank": 4, "layerwise": True, "state_bits": 8},
    )
    result = train(config.from_dict(recipe), on_step=snap)
    assert math.isfinite(result.summary["train_loss"])
    for n, p in result.model.named_parameters():
        assert p.dtype == torch.bfloat16
        assert not torch.equal(p, before[n]), n


@pytest.mark.parametrize("bits", [32, 8])
def test_large_tensors_updated_in_slices_match_whole(monkeypatch, bits):
    """Tensors without a projection above SLICE elements (embeddings) are updated a slice at a
    time to bound temporaries; the result is bitwise the same (8-bit blocks align to slices).
    Bitwise on any CPU: the update is elementwise, so every element sees the same operations
    whichever slice holds it, in one process."""
    from slimtune.methods.optim import galore

    def run(slice_elems):
        monkeypatch.setattr(galore, "SLICE", slice_elems)
        model = tiny_model()
        opt = GaLoreAdamW(
            galore_param_groups(model, rank=4, weight_decay=0.1), lr=1e-2, state_bits=bits
        )
        for ids in batches(3):
            opt.zero_grad()
            lm_loss(model, ids).backward()
            opt.step()
        return model

    whole, sliced = run(1 << 30), run(2 * galore.BLOCK + 0)
    for (n, a), b in zip(whole.named_parameters(), sliced.parameters()):
        assert torch.equal(a, b), n


def test_usable_as_a_plain_optimizer_in_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from slimtune.optim import NaturalGaLoreAdamW

    model = tiny_model()
    rows = [{"input_ids": ids[0], "labels": ids[0]} for ids in batches(8, batch=1)]
    opt = NaturalGaLoreAdamW(galore_param_groups(model, rank=4, update_gap=2), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=2,
        max_steps=3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    Trainer(model=model, args=args, train_dataset=rows, optimizers=(opt, None)).train()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(int(s["step"]) == 3 for s in opt.state.values())


def spectrum_matrix(m: int, n: int, decay: float, seed: int) -> torch.Tensor:
    """m x n with singular values decay ** i (a gradient's typically decaying spectrum)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
    s = decay ** torch.arange(min(m, n), dtype=torch.float32)
    return (u * s) @ v.T


def subspace_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sine of the largest principal angle between two r-dim subspaces (rows or columns of
    orthonormal bases given on the same side)."""
    a, b = (a.T, b.T) if a.shape[0] < a.shape[1] else (a, b)  # columns span the subspace
    return float(torch.linalg.matrix_norm(a - b @ (b.T @ a), ord=2))


@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_randomized_basis_spans_the_leading_singular_subspace(shape):
    g = spectrum_matrix(*shape, decay=0.8, seed=0)
    exact = make_basis(g, 6)
    cold = make_basis(g, 6, "randomized", iters=2, seed=1)
    assert cold.shape == exact.shape
    # orthonormal to fp32 rounding
    eye = torch.eye(6)
    gram = cold @ cold.T if cold.shape[0] == 6 else cold.T @ cold
    torch.testing.assert_close(gram, eye, atol=1e-5, rtol=0)
    # Halko et al.: the error of q subspace iterations with p extra columns shrinks like
    # (s_{r+p} / s_r)^(2q+1) = 0.8^(8 * 5) ~ 1e-4 here; 1e-2 leaves room for the constant
    assert subspace_gap(cold, exact) < 1e-2
    # warm start: the previous basis of a gradient that moved a little, no iteration at all
    moved = g + 1e-3 * spectrum_matrix(*shape, decay=0.9, seed=2)
    warm = make_basis(moved, 6, "randomized", previous=exact, iters=0, seed=3)
    assert subspace_gap(warm, make_basis(moved, 6)) < 1e-2
    # without the warm start the same zero iterations miss the subspace
    assert subspace_gap(make_basis(moved, 6, "randomized", iters=0, seed=3), exact) > 0.1


def test_randomized_basis_trains_as_well_as_the_exact_svd(tmp_path, cls_data):
    """Held-out loss after GaLore with randomized bases within 2% of exact-SVD GaLore (the
    same run otherwise); the basis refreshes every 2 steps so several warm starts happen."""
    losses = {}
    for basis in ("svd", "randomized"):
        recipe = tiny_recipe(
            cls_data,
            tmp_path / basis,
            data={"eval_size": 6},
            optimizer={"name": "galore", "lr": 1e-2, "rank": 4, "update_gap": 2, "basis": basis},
            train={"steps": 8},
        )
        losses[basis] = train(config.from_dict(recipe)).summary["eval_after"]["loss"]
    assert losses["randomized"] == pytest.approx(losses["svd"], rel=0.02)


def test_randomized_bases_resume_exactly(tmp_path, cls_data):
    """The randomized draws are seeded by the step and the previous basis is optimizer state:
    a killed and resumed run ends bitwise equal to a straight one."""
    from .conftest import assert_resume_exact

    optim = {"name": "galore", "lr": 1e-2, "rank": 4, "update_gap": 2, "basis": "randomized"}
    sections = {"optimizer": optim, "train": {"steps": 6}}
    straight = train(config.from_dict(tiny_recipe(cls_data, tmp_path / "a", **sections)))
    assert_resume_exact(straight, cls_data, tmp_path / "b", 3, **sections)
