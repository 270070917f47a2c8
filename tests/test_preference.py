"""Preference objectives (dpo, ipo, orpo, simpo) through slimtune.train: data layouts and bad
rows, the reference policy, per-step and held-out metrics, refused combinations. The parity of
the losses with TRL is in test_preference_trl.py."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from slimtune import config, registry
from slimtune.cli import main as cli
from slimtune.data import DataConfig, collate, load_splits
from slimtune.errors import SlimtuneError
from slimtune.loop import train
from slimtune.loss import find_head
from slimtune.models import load_model

from .conftest import REVIEWS, tiny_recipe, write_jsonl

TOK = load_model("tiny-llama")[1]

# One model's summed answer log-probability, computed in two batches of other widths (other
# padding: other GEMM shapes and blocking, so other summation orders): each token's log-prob
# differs by a few fp32 ulps of its logsumexp (the tiny model: 259 words, |logits| < 10, an
# ulp ~1e-6), and an answer here has <= 12 tokens, so sums differ by <= ~5e-5 in the worst
# case. A wrong model (a trained head, another iteration's snapshot) moves them by > 0.1.
LOGP_ATOL = 1e-4
BETA = 0.1  # DPO's default: rewards are BETA x log-prob differences
PREFERENCE = [n for n in registry.names("objective") if registry.get("objective", n).pairs]


@pytest.fixture
def pref_data(tmp_path):
    words = [" negative", " positive"]
    rows = [
        {"prompt": f"Review: {t}\nSentiment:", "chosen": words[y], "rejected": words[1 - y]}
        for t, y in REVIEWS
    ]
    return write_jsonl(tmp_path / "pref.jsonl", rows)


def pref_recipe(data, out, **sections):
    recipe = tiny_recipe(data, out, **sections)
    recipe["data"] = {"path": str(data), "format": "preference", "eval_size": 4}
    return recipe


def capture_parts(monkeypatch) -> list:
    """The Parts of every run slimtune.train assembles from here on (newest last)."""
    import slimtune.loop as loop_mod

    real, seen = loop_mod.assemble, []

    def capture(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]

    monkeypatch.setattr(loop_mod, "assemble", capture)
    return seen


def rows_of(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_every_preference_objective_is_registered():
    assert {"dpo", "ipo", "orpo", "simpo"} <= set(PREFERENCE)


@pytest.mark.parametrize("objective", PREFERENCE)
@pytest.mark.parametrize("params", ["lora", "full"])
def test_objective_trains_and_reports_preference_metrics(tmp_path, pref_data, objective, params):
    out = tmp_path / "run"
    recipe = pref_recipe(
        pref_data, out, objective=objective, params=params,
        train={"steps": 3, "eval_before": True},
    )  # fmt: skip
    result = train(config.from_dict(recipe))
    rows = rows_of(out)
    steps = [r for r in rows if "lr" in r]
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert all({"logp_chosen", "logp_rejected", "pref_accuracy"} <= r.keys() for r in steps)
    for tag in ("before", "after"):
        held = result.summary[f"eval_{tag}"]
        assert {"pref_loss", "pref_accuracy", "pref_logp_chosen"} <= held.keys(), held
    if objective in ("dpo", "ipo"):
        # the policy starts as the reference: every reward is 0 before the first update
        assert steps[0]["reward_margin"] == 0.0
        margin = result.summary["eval_before"]["pref_reward_margin"]
        assert margin == pytest.approx(0, abs=BETA * LOGP_ATOL)  # ref precomputed elsewhere
    saved = (out / "config.yaml").read_text()
    assert f"objective:\n  name: {objective}" in saved


@pytest.mark.parametrize(
    "reference,params", [("adapters", "lora"), ("precomputed", "full"), ("copy", "full"),
                         ("copy", "lora"), ("adapters", "ia3"), ("adapters", "vera"),
                         ("adapters", "llama-adapter"), ("precomputed", "nola")],
)  # fmt: skip
def test_reference_log_probs_never_change(tmp_path, pref_data, reference, params, monkeypatch):
    """The reference policy's log-probs of a fixed batch are the same before and after DPO
    steps that move the policy (for every way to hold the reference)."""
    out = tmp_path / "run"
    recipe = pref_recipe(
        pref_data, out, objective={"name": "dpo", "reference": reference}, params=params,
        optimizer={"name": "adamw", "lr": 5e-2}, train={"steps": 3},
    )  # fmt: skip
    seen = {}
    parts = capture_parts(monkeypatch)

    def on_step(step, model, row):
        if step == 0:
            on_step.batch = collate(parts[0].splits.train[:4], parts[0].tok.pad_token_id)
        objective, head = parts[0].objective, find_head(model)
        with torch.no_grad():
            ref = objective.reference_logps(model, head, on_step.batch, 8)
            pol = objective.policy(model, head, on_step.batch, 8)
        seen[step] = (torch.cat(ref).clone(), torch.cat([pol["chosen"], pol["rejected"]]))

    train(config.from_dict(recipe), on_step=on_step)
    assert sorted(seen) == [0, 1, 2, 3]
    for step in (1, 2, 3):
        assert torch.equal(seen[step][0], seen[0][0]), step  # the reference: fixed
    assert not torch.allclose(seen[3][1], seen[0][1])  # the policy: moved
    # before the first update the policy is the reference (a precomputed one: other batches)
    torch.testing.assert_close(seen[0][1], seen[0][0], rtol=0, atol=LOGP_ATOL)


def test_auto_reference_disables_adapters_or_precomputes(tmp_path, pref_data, monkeypatch):
    parts = capture_parts(monkeypatch)
    modes = {}
    for params in ("lora", "prompt-tuning", "full", {"name": "lora", "init": "pissa"}):
        recipe = pref_recipe(pref_data, tmp_path / "run", objective="dpo", params=params,
                             train={"steps": 1}, overwrite=True)  # fmt: skip
        train(config.from_dict(recipe))
        modes[params if isinstance(params, str) else "lora-pissa"] = parts[-1].objective.mode
    assert modes == {"lora": "adapters", "prompt-tuning": "adapters",
                     "full": "precomputed", "lora-pissa": "precomputed"}  # fmt: skip


def test_adapters_reference_refused_where_it_is_not_the_base(tmp_path, pref_data):
    for params, why in (("full", "has no adapters to disable"),
                        ({"name": "lora", "init": "pissa"}, "does not leave the loaded")):  # fmt: skip
        recipe = pref_recipe(pref_data, tmp_path / "run", params=params,
                             objective={"name": "dpo", "reference": "adapters"})  # fmt: skip
        with pytest.raises(SlimtuneError, match=why):
            train(config.from_dict(recipe))
        assert not (tmp_path / "run").exists()


def test_preference_objective_needs_preference_data(tmp_path, cls_data, capsys):
    recipe = tiny_recipe(cls_data, tmp_path / "run", objective="dpo")
    path = tmp_path / "r.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    assert cli(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "objective: dpo learns from preference pairs" in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "p", "chosen": "a"}, "missing column 'rejected'"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "are the same text"),
        ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "empty prompt"),
        ({"prompt": "p", "chosen": "a", "rejected": ""}, "empty rejected answer"),
        ({"chosen": "a", "rejected": "b"}, "missing column 'prompt'"),
        (
            {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "other"},
                          {"role": "assistant", "content": "b"}]},
            "differ before their last turn",
        ),
        ({"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
         "ending with the assistant's answer"),
    ],
)  # fmt: skip
def test_malformed_rows_get_one_line_naming_the_row(tmp_path, row, message):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "p.jsonl", [good, good, row])
    with pytest.raises(SlimtuneError, match=message) as e:
        load_splits(DataConfig(path=str(path), format="preference"), TOK)
    assert "p.jsonl' line 3:" in str(e.value) and "\n" not in str(e.value)


def test_chat_layouts_give_the_same_pair(tmp_path):
    """prompt/chosen/rejected as strings, as a prompt plus one assistant message each, and as
    whole conversations (implicit prompt) make one example under a chat template."""
    user = [{"role": "user", "content": "Is it good?"}]
    rows = [
        {"prompt": "Is it good?", "chosen": "yes", "rejected": "no"},
        {"prompt": user, "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "assistant", "content": "no"}]},
        {"chosen": [*user, {"role": "assistant", "content": "yes"}],
         "rejected": [*user, {"role": "assistant", "content": "no"}]},
    ]  # fmt: skip
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    template += "{% if add_generation_prompt %}<assistant>{% endif %}"
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = DataConfig(path=str(path), format="preference", chat=True, chat_template=template)
    examples = load_splits(cfg, TOK).train
    assert len(examples) == 3
    first = examples[0]
    for ex in examples[1:]:
        assert (ex.input_ids, ex.labels, ex.rejected_ids) == (
            first.input_ids, first.labels, first.rejected_ids,
        )  # fmt: skip


def test_long_pairs_are_cut_so_both_answers_fit(tmp_path):
    rows = [{"prompt": "x" * 40, "chosen": "a", "rejected": "b" * 10}] * 2  # 1 byte: 1 token
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    splits = load_splits(DataConfig(path=str(path), format="preference", max_seq_len=24), TOK)
    for ex in splits.train:
        assert len(ex.input_ids) <= 24 and len(ex.prompt_ids) + len(ex.rejected_ids) == 24
        assert len(ex.rejected_ids) == 11 and ex.prompt_ids  # the answers whole, the prompt cut
    batch = collate(splits.train, TOK.pad_token_id)
    assert batch["rejected_input_ids"].shape[1] <= 24
    assert "prompt start cut" in splits.truncation.line()


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
@pytest.mark.parametrize("params", ["lora", "full"])
def test_zeroth_order_minimises_a_preference_objective(tmp_path, pref_data, objective, params):
    """MeZO evaluates the pair losses in its two perturbed forwards (chosen and rejected
    stacked with the +eps and -eps copies); no gradient is ever formed; DPO's reference is
    precomputed (the perturbed forwards must not compute it)."""
    out = tmp_path / "run"
    recipe = pref_recipe(pref_data, out, objective=objective, params=params,
                         optimizer={"name": "mezo", "lr": 1e-3}, train={"steps": 3})  # fmt: skip
    result = train(config.from_dict(recipe))
    steps = [r for r in rows_of(out) if "lr" in r]
    assert len(steps) == 3 and all("pref_accuracy" in r for r in steps)
    assert all(p.grad is None for p in result.model.parameters())
    if objective == "dpo":
        # The logged margin is the mean over the +eps and -eps copies around the reference:
        # first-order terms cancel, leaving beta eps^2 z'Hz / 2 (seeded z: 2e-6 with LoRA,
        # 2e-5 over every weight here) plus rounding (BETA x LOGP_ATOL); a reference that is
        # not the initial model gives margins of BETA x (log-prob differences) > 1e-2.
        assert steps[0]["reward_margin"] == pytest.approx(0, abs=1e-4)
    # the two-point estimate moved the weights: the loss is not the same at every step
    assert len({r["loss"] for r in steps}) > 1


def test_zeroth_order_refusals_are_one_line(tmp_path, pref_data):
    recipe = pref_recipe(pref_data, tmp_path / "run", objective="dpo", optimizer="forward-grad")
    with pytest.raises(SlimtuneError, match="forward-grad cannot minimise objective 'dpo'"):
        train(config.from_dict(recipe))
    recipe = pref_recipe(pref_data, tmp_path / "run", params="lora", optimizer="mezo",
                         objective={"name": "dpo", "reference": "adapters"})  # fmt: skip
    with pytest.raises(SlimtuneError, match="perturbs the weights inside its forwards"):
        train(config.from_dict(recipe))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("params", ["lora", "full"])
def test_slimtune_eval_reports_a_preference_run(tmp_path, pref_data, params, capsys):
    """`slimtune eval RUN_DIR` gives the run's held-out preference metrics: the reference is the
    adapters-disabled model (LoRA) or the loaded checkpoint (full; the run precomputed the same
    model's log-probs, in other batches: equal to float rounding)."""
    out = tmp_path / "run"
    recipe = pref_recipe(pref_data, out, objective="dpo", params=params, train={"steps": 2})
    result = train(config.from_dict(recipe))
    capsys.readouterr()
    assert cli(["eval", str(out)]) == 0
    got = json.loads(capsys.readouterr().out)
    want = result.summary["eval_after"]
    # The policy's log-probs come from the same batches both times; the reference's from other
    # batches (the run precomputed them, LOGP_ATOL). The loss and the margin are means of
    # 1-Lipschitz functions of BETA x those; pref_accuracy compares the policy's own.
    for key in ("pref_loss", "pref_accuracy", "pref_reward_margin", "pref_logp_chosen"):
        assert got[key] == pytest.approx(want[key], abs=LOGP_ATOL), key


def test_planner_prices_pairs_and_the_reference(tmp_path, pref_data):
    """A preference run forwards chosen and rejected together (twice the sequences of its
    batch), recomputes the head's logits per chunk, and a copied reference is a second set of
    weights; the adapters and precomputed references cost no weights."""
    from slimtune.plan.planner import plan, workload_of
    from slimtune.plan.shapes import load_shape

    def priced(objective):
        cfg = config.from_dict(pref_recipe(pref_data, tmp_path / "r", objective=objective))
        work = workload_of(cfg)
        p, o = registry.build("params", cfg.params), registry.build("optimizer", cfg.optimizer)
        return work, {t.name: t.bytes for t in plan(load_shape("smollm2-135m"), p, o, work).terms}

    sft_work, sft = priced("causal-lm")
    for reference in ("auto", "adapters", "precomputed"):
        work, terms = priced({"name": "dpo", "reference": reference})
        assert work.batch == 2 * sft_work.batch and work.pairs
        assert "reference copy" not in terms
        assert terms["activations"] == pytest.approx(2 * sft["activations"], rel=0.01)
    work, terms = priced({"name": "dpo", "reference": "copy"})
    assert terms["reference copy"] == terms["weights"]


def spin_recipe(cls_data, out, **objective):
    recipe = tiny_recipe(cls_data, out, params="full",
                         objective={"name": "spin", "iterations": 2, "max_new_tokens": 4,
                                    **objective},
                         optimizer={"name": "adamw", "lr": 5e-2}, train={"steps": 4})  # fmt: skip
    recipe["data"]["limit"] = 8
    return recipe


def test_spin_answers_come_from_the_previous_iterations_model(tmp_path, cls_data, monkeypatch):
    """Iteration k's rejected answers (saved in spin/iteration-k.jsonl) are what the model as it
    stood at iteration k's first step generates, and their reference log-probs are that
    model's: iteration 1's come from the model after iteration 0's updates, not the initial."""
    import copy

    from slimtune.methods.objective.preference import _decode, precompute

    parts = capture_parts(monkeypatch)
    snapshots = {}

    def on_step(step, model, row):
        snapshots[step] = copy.deepcopy(model)

    out = tmp_path / "run"
    train(config.from_dict(spin_recipe(cls_data, out)), on_step=on_step)
    objective = parts[0].objective
    examples = copy.deepcopy(parts[0].splits.train)

    def generated(model):
        ctx = objective.ctx
        stop = [ctx.tokenizer.eos_token_id]
        rows = []
        for i in range(0, len(examples), ctx.batch_size):
            group = examples[i : i + ctx.batch_size]
            width = max(len(ex.prompt_ids) for ex in group)
            ids = torch.full((len(group), width), ctx.pad_id)
            mask = torch.zeros_like(ids)
            for j, ex in enumerate(group):
                ids[j, width - len(ex.prompt_ids) :] = torch.tensor(ex.prompt_ids)
                mask[j, width - len(ex.prompt_ids) :] = 1
            with torch.no_grad():
                rows += _decode(model.eval(), ids, mask, objective.cfg, stop, None)
        return [r[: r.index(stop[0]) + 1] if stop[0] in r else r for r in rows]

    saved = {k: [json.loads(x) for x in (out / "spin" / f"iteration-{k}.jsonl").read_text()
                 .splitlines()] for k in (0, 1)}  # fmt: skip
    for k, step in ((0, 0), (1, 2)):  # iteration 1 starts at step 2 of 4
        assert [r["rejected_ids"] for r in saved[k]] == generated(snapshots[step]), k
        for ex, r in zip(examples, saved[k]):
            ex.rejected_ids = r["rejected_ids"]
        snap = snapshots[step].eval()
        ctx = replace(objective.ctx, model=snap, head=find_head(snap))
        with torch.no_grad():
            precompute(ctx, examples)
        got = [list(ex.reference) for ex in examples]
        want = [r["reference"] for r in saved[k]]
        # the same snapshot's log-probs, in the same batches: equal but for reduction order
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=LOGP_ATOL)
    # the check can tell the models apart: iteration 1 is not the initial model's answers
    assert [r["rejected_ids"] for r in saved[1]] != generated(snapshots[0])
    assert saved[0][0].keys() >= {"prompt", "chosen", "rejected", "rejected_ids", "reference"}


def test_spin_resumes_inside_an_iteration_from_its_saved_pairs(tmp_path, cls_data):
    from .conftest import assert_resume_exact

    recipe = spin_recipe(cls_data, tmp_path / "straight")
    straight = train(config.from_dict(recipe))
    sections = {k: recipe[k] for k in ("params", "objective", "optimizer")}
    sections["train"], sections["data"] = recipe["train"], recipe["data"]
    assert straight.summary["steps"] == 4
    assert_resume_exact(straight, cls_data, tmp_path / "resumed", kill_at=3, **sections)


def test_spin_needs_prompts_and_a_gradient(tmp_path, text_data, cls_data):
    recipe = tiny_recipe(text_data, tmp_path / "run", objective="spin")
    recipe["data"] = {"path": str(text_data), "format": "text", "eval_size": 2}
    with pytest.raises(SlimtuneError, match="spin needs prompts and answers"):
        train(config.from_dict(recipe))
    recipe = spin_recipe(cls_data, tmp_path / "run")
    recipe["optimizer"] = "mezo"
    with pytest.raises(SlimtuneError, match="spin"):
        train(config.from_dict(recipe))
    assert not (tmp_path / "run").exists()


def test_step_tokens_count_the_rejected_rows_only_for_pair_objectives(pref_data):
    from slimtune.loop import step_tokens

    splits = load_splits(DataConfig(path=str(pref_data), format="preference"), TOK)
    batch = collate(splits.train[:4], TOK.pad_token_id)
    chosen, rejected = (int(batch[k].sum()) for k in ("attention_mask", "rejected_attention_mask"))
    assert step_tokens(batch, pairs=True) == chosen + rejected
    assert step_tokens(batch, pairs=False) == chosen  # causal-lm on preference data: SFT
