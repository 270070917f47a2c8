from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimtune.data import IGNORE
from slimtune.loss import Head, causal_lm_loss, find_head
from slimtune.models import tiny_llama


def assert_grads_close(model, want_grads):
    """The chunked path forms every gradient from the same products as full logits, summed in
    another order (chunk by chunk, or through the hidden-state gradient computed in forward):
    each element is a sum over the <= 24 target tokens and, below the head, over inner
    dimensions <= 128, so the two differ by summation-order rounding, a few fp32 ulps of the
    tensor's largest terms. Seen: <= 6.2e-7 of the tensor's largest element, ~10 u (u = 6e-8,
    fp32's unit roundoff), with MKL's AVX-512, AVX2 and COMPATIBLE paths and ATen's default
    and AVX2 kernels. Tolerance: 1e-5 of each tensor's largest element (~170 u; absolute, so
    near-zero elements formed by cancellation are covered too). A real error (a token dropped,
    counted twice or shifted, a wrong mask) moves a gradient by about 1/24 of its size."""
    params = dict(model.named_parameters())
    for name, want in want_grads.items():
        atol = 1e-5 * float(want.abs().max())
        torch.testing.assert_close(params[name].grad, want, atol=atol, rtol=0, msg=name)


def reference(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


@pytest.mark.parametrize("chunk", [1, 7, 512])
def test_chunked_loss_and_grads_equal_full_logits(chunk):
    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.randint(3, 250, (3, 11))
    labels = ids.clone()
    labels[0, :4] = IGNORE
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    labels[2, 8:] = IGNORE
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    want = reference(model, batch)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    head = find_head(model)
    assert head.module is model.lm_head
    got, n = causal_lm_loss(model, head, batch, chunk)
    got.backward()
    assert n == int((labels[:, 1:] != IGNORE).sum())
    # The loss (~133) is a sum of 24 per-token cross-entropies of ~5.5, each a logsumexp over
    # 259 logits: reordering it rounds by <= 24 u * 133 ~ 2e-4 at worst (seen: 0); rtol 1e-5
    # (1.3e-3 here) is far below one token's share (~5.5).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_grads_close(model, want_grads)


def test_fallback_head_gives_same_loss():
    model = tiny_llama()
    ids = torch.randint(3, 250, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    a, _ = causal_lm_loss(model, find_head(model), batch, 4)
    b, _ = causal_lm_loss(model, Head(None), batch, 4)
    # The same logits (head(hidden) vs the model's own), one fp32 sum of 16 cross-entropies of
    # ~5.5 each: summation-order rounding is ~1e-6 of the ~90 total, rtol 1e-5 covers it.
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_softcap_mismatch_is_detected_and_falls_back():
    model = tiny_llama()
    model.config.final_logit_softcapping = (
        0.5  # config says capped, the model's forward does not cap
    )
    assert find_head(model).module is None


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_frozen_head_path_equals_full_logits(softcap):
    """LoRA-style: head frozen, gradients flow to the body only (input-gradient-in-forward path)."""
    torch.manual_seed(0)
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(False)  # tied: the embedding is frozen too
    ids = torch.randint(3, 250, (2, 13))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    logits = model(input_ids=ids).logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    want = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
    )
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    head = Head(model.lm_head, softcap)
    got, _ = causal_lm_loss(model, head, batch, chunk=5)
    got.backward()
    # Loss: as in test_chunked_loss_and_grads_equal_full_logits (24 tokens, rtol 1e-5).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_grads_close(model, want_grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_forward_makes_no_copies_of_the_head(dtype):
    """``logits_to_keep=1`` made torch's matmul (autograd on, strided [B, 1, H] input) expand
    the head weight B times and copy it at 16 bits: 1.34 GB per step on Gemma-3-270M at batch 4.
    No allocation of the loss's forward may reach B head weights (the largest legitimate one is
    chunk of fp32 logits, 64 x 4096 here: half of that at bf16, a quarter at fp32)."""
    from torch.profiler import ProfilerActivity, profile

    model = tiny_llama(vocab_size=4096).to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)  # a graph below the head
    ids = torch.randint(3, 4096, (4, 17))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        causal_lm_loss(model, find_head(model), batch, chunk=64)
    copies = 4 * model.lm_head.weight.nbytes
    biggest = max(e.cpu_memory_usage for e in prof.events() if e.name.startswith("aten::empty"))
    assert biggest < copies, (biggest, copies)
