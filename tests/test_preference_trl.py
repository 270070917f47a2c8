"""Parity with TRL 1.16: slimtune's DPO, IPO, ORPO and SimPO losses and gradients equal those of
TRL's trainers (DPOTrainer, experimental ORPOTrainer and CPOTrainer with loss_type simpo) on one
batch of a tiny Llama, including DPO's reference as the model with its LoRA adapters disabled.

Both sides get the same token ids: TRL tokenises the text pairs and collates them; the batch
slimtune sees is built from TRL's tensors, so only the objectives differ.

Tolerance. Both sides run the same fp32 model on the same tokens; the log-probabilities are
sums over <= 8 answer tokens of log-softmax values of a 259-word vocabulary, formed by TRL from
full logits and by slimtune from the chunked head (the same matmul, reduced in another order
and in another shape: another GEMM blocking). Each log-softmax differs by a few fp32 ulps of
its logsumexp (|x| < 10: ~1e-6), a sum of 8 by <= 1e-5; the losses are 1-Lipschitz in
beta x that (beta <= 2), so rtol 1e-4 / atol 1e-5 on losses and, for gradients, 1e-4 of each
tensor's largest element (they are products of the same per-token factors with the model's
Jacobian, summed over <= 64 terms) are several times the worst case and orders of magnitude
below what a real difference does (a dropped token moves a log-probability by ~5, a wrong
beta or sign changes the loss by > 10%).
"""

from __future__ import annotations

import datasets  # a dependency of slimtune (trl, the peer, is a dev dependency: pyproject)
import pytest
import torch

from slimtune.data import IGNORE
from slimtune.loss import find_head
from slimtune.models import load_model

PAIRS = [
    {
        "prompt": "Review: a joy to watch\nSentiment:",
        "chosen": " positive",
        "rejected": " negative",
    },
    {"prompt": "Review: painfully slow\nSentiment:", "chosen": " negative", "rejected": " good"},
    {"prompt": "Is it good?", "chosen": " yes it is", "rejected": " no"},
    {"prompt": "Two plus two", "chosen": " four", "rejected": " five or six"},
]


def _model_and_tok():
    return load_model("tiny-llama")


def _move_adapters(model) -> None:
    """A trained-looking adapter (B != 0), so that the policy is not the reference."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _assert_grads_equal(ours, theirs):
    assert ours.keys() == theirs.keys() and ours
    for name, want in theirs.items():
        atol = 1e-4 * float(want.abs().max()) + 1e-12
        torch.testing.assert_close(ours[name], want, atol=atol, rtol=0, msg=name)


def _ours(name: str, model, batch, **cfg):
    from slimtune import registry

    cls = registry.get("objective", name)
    objective = registry.build("objective", cls.Config(**cfg))
    head = find_head(model)
    loss = objective.loss_sum(model, head, batch, 3) / objective.targets(batch)  # 3: chunks
    loss.backward()
    return loss.detach(), _grads(model)


def _from_trl_dpo(inputs):
    """slimtune's batch from DPOTrainer's collated one (chosen rows first, then rejected)."""
    n = inputs["input_ids"].shape[0] // 2
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE)
    out = {}
    for prefix, rows in (("", slice(0, n)), ("rejected_", slice(n, 2 * n))):
        out[f"{prefix}input_ids"] = inputs["input_ids"][rows]
        out[f"{prefix}attention_mask"] = inputs["attention_mask"][rows]
        out[f"{prefix}labels"] = labels[rows]
    return out


def _dataset():
    return datasets.Dataset.from_list(PAIRS)


@pytest.mark.parametrize(
    "loss_type,beta,lora",
    [("sigmoid", 0.1, False), ("sigmoid", 0.5, True), ("ipo", 0.1, False), ("ipo", 0.3, True)],
)
def test_dpo_and_ipo_equal_trl(tmp_path, loss_type, beta, lora):
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    model, tok = _model_and_tok()
    ref = None
    if not lora:  # the reference: the initial model; the policy is moved a little first
        import copy

        ref = copy.deepcopy(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(
                    torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02
                )
    # With LoRA, TRL wraps the model itself (a model passed already wrapped gets a copy of its
    # adapter as the reference); its reference is then the model with adapters disabled.
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if lora else None
    args = DPOConfig(
        output_dir=str(tmp_path), beta=beta, loss_type=[loss_type], report_to=[],
        use_cpu=True, per_device_train_batch_size=4, max_length=None, dataset_num_proc=None,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, ref_model=ref, args=args, train_dataset=_dataset(), processing_class=tok,
        peft_config=peft_config,
    )  # fmt: skip
    model = trainer.model
    if lora:
        _move_adapters(model)
    inputs = next(iter(trainer.get_train_dataloader()))
    model.train()
    theirs = trainer.compute_loss(model, inputs)
    theirs.backward()
    want = _grads(model)

    batch = _from_trl_dpo(inputs)
    if lora:  # the reference: adapters disabled (slimtune's 'adapters' reference)
        got, grads = _ours(
            "dpo", model, batch, beta=beta, loss_type=loss_type, reference="adapters"
        )
    else:  # the reference's log-probs, as a precomputed reference would pass them
        from slimtune.loss import sequence_logps
        from slimtune.methods.objective.preference import stacked

        with torch.no_grad():
            logps, _ = sequence_logps(ref, find_head(ref), stacked(batch), 3)
        n = batch["input_ids"].shape[0]
        batch |= {"ref_chosen_logps": logps[:n], "ref_rejected_logps": logps[n:]}
        got, grads = _ours("dpo", model, batch, beta=beta, loss_type=loss_type)
    torch.testing.assert_close(got, theirs.detach(), rtol=1e-4, atol=1e-5)
    _assert_grads_equal(grads, want)


def _from_trl_pairs(batch):
    """slimtune's batch from ORPO/CPO's collated one (chosen_* and rejected_* columns)."""
    out = {}
    for side, prefix in (("chosen", ""), ("rejected", "rejected_")):
        out[f"{prefix}input_ids"] = batch[f"{side}_input_ids"]
        out[f"{prefix}attention_mask"] = batch[f"{side}_attention_mask"]
        out[f"{prefix}labels"] = batch[f"{side}_labels"]
    return out


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_equals_trl(tmp_path, beta):
    """TRL's NLL term is the token mean over the whole chosen batch; slimtune's is per pair (the
    mean over each sequence's tokens, then over pairs), which does not depend on how a step is
    split into micro-batches. They agree when the chosen sequences have one length: this batch
    pads every chosen sequence to the same number of tokens by the prompt."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model, tok = _model_and_tok()
    args = ORPOConfig(
        output_dir=str(tmp_path), beta=beta, report_to=[], use_cpu=True,
        per_device_train_batch_size=4, max_length=None,
    )  # fmt: skip
    pairs = [dict(p) for p in PAIRS]
    for _ in range(8):  # lengthen the shorter prompts until TRL's chosen rows have one length
        trainer = ORPOTrainer(
            model=model, args=args, train_dataset=datasets.Dataset.from_list(pairs),
            processing_class=tok,
        )  # fmt: skip
        rows = [trainer.train_dataset[i] for i in range(len(pairs))]  # in order, unshuffled
        batch = trainer.data_collator(rows)
        lengths = batch["chosen_attention_mask"].sum(dim=1).tolist()
        if len(set(lengths)) == 1:
            break
        for p, n in zip(pairs, lengths):
            p["prompt"] = "x" * (max(lengths) - n) + p["prompt"]  # one byte: one token
    assert len(set(lengths)) == 1, lengths
    model.train()
    theirs, _ = trainer.get_batch_loss_metrics(model, batch)
    theirs.backward()
    want = _grads(model)
    got, grads = _ours("orpo", model, _from_trl_pairs(batch), beta=beta)
    torch.testing.assert_close(got, theirs.detach(), rtol=1e-4, atol=1e-5)
    _assert_grads_equal(grads, want)


@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (2.5, 0.5)])
def test_simpo_equals_trl(tmp_path, beta, gamma):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    model, tok = _model_and_tok()
    args = CPOConfig(
        output_dir=str(tmp_path), loss_type="simpo", beta=beta, simpo_gamma=gamma, cpo_alpha=0.0,
        report_to=[], use_cpu=True, per_device_train_batch_size=4, max_length=None,

    )  # fmt: skip
    trainer = CPOTrainer(model=model, args=args, train_dataset=_dataset(), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    theirs, _ = trainer.get_batch_loss_metrics(model, batch)
    theirs.backward()
    want = _grads(model)
    got, grads = _ours("simpo", model, _from_trl_pairs(batch), beta=beta, gamma=gamma)
    torch.testing.assert_close(got, theirs.detach(), rtol=1e-4, atol=1e-5)
    _assert_grads_equal(grads, want)
