"""S2FT: the co-permutation leaves the model's output unchanged (grouped-query attention
included), only the slice deltas train, and the merge restores the original unit order."""

from __future__ import annotations

import copy

import torch

from slimtune.methods.base import PrepareContext
from slimtune.methods.params.s2ft import S2FT
from slimtune.models import tiny_llama, tiny_tokenizer

IDS = torch.tensor([[1, 40, 50, 60, 70, 80, 90, 100, 7, 9]])


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def setup(**cfg):
    torch.manual_seed(0)
    # grouped-query attention like SmolLM2 (3 query heads per KV head)
    model = tiny_llama(
        hidden_size=96, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=3
    )
    ref = copy.deepcopy(model)
    method = S2FT(S2FT.Config(**cfg))
    model = method.prepare(model, PrepareContext(tiny_tokenizer(), work_dir=None, seed=5))
    return ref, model, method


def test_permutation_leaves_logits_unchanged_with_gqa():
    ref, model, method = setup(o_ratio=0.5, down_ratio=0.1)
    # A co-permutation only reorders the sums over the permuted units (<= 128 terms) in
    # o_proj and down_proj: summation-order rounding of O(1) logits, ~1e-7 (seen: <= 3.6e-7
    # on every MKL/ATen path). 1e-5 absolute; a wrong permutation changes logits by O(1).
    torch.testing.assert_close(logits(model), logits(ref), atol=1e-5, rtol=0)
    assert any(not torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".delta") for n in trainable)


def test_training_then_merge_equals_trained_model_in_original_order():
    ref, model, method = setup(o_ratio=0.3, down_ratio=0.1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for s in range(3):
        ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(s))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    want = logits(model)
    assert not torch.allclose(want, logits(ref), atol=1e-4)  # it trained (seen: 0.64 apart)
    merged = method.merge(copy.deepcopy(model))
    # One trained model evaluated twice, not two trainings: merging adds each delta into its
    # slice (one rounding per weight) and undoes the permutation (reordered sums), a few ulps
    # of O(1) logits (seen: <= 4e-7); 1e-5 absolute, as above.
    torch.testing.assert_close(logits(merged), want, atol=1e-5, rtol=0)
    # back in the original order: only o_proj / down_proj differ from the untrained model
    for (n, a), b in zip(merged.named_parameters(), ref.parameters()):
        if "o_proj" in n or "down_proj" in n:
            continue
        assert torch.equal(a, b), n


def test_slice_backward_matches_autograd():
    from slimtune.methods.params.s2ft import SliceDeltaLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(8, 5)
    base.requires_grad_(False)
    layer = SliceDeltaLinear(base, 3)
    with torch.no_grad():
        layer.delta.normal_()
    x = torch.randn(2, 4, 8, requires_grad=True)
    layer(x).square().sum().backward()
    gx, gd = x.grad.clone(), layer.delta.grad.clone()
    x.grad = None
    delta = layer.delta.detach().clone().requires_grad_(True)
    w = base.weight.clone()
    w2 = torch.cat([w[:, :3] + delta, w[:, 3:]], dim=1)
    torch.nn.functional.linear(x, w2, base.bias).square().sum().backward()
    # The custom backward and autograd form the same sums of <= 8 products in another order;
    # gradients here are O(10), so rounding is ~1e-6 (seen: 1.9e-6). Tolerances: torch's fp32
    # defaults, 1e-5 absolute + 1.3e-6 relative (seen: <= 0.12 of them).
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1.3e-6)
    torch.testing.assert_close(gd, delta.grad, atol=1e-5, rtol=1.3e-6)
