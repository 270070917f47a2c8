"""Run one benchmark configuration in a fresh Python process and measure its own peak RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def run_worker(script: str, name: str, recipe: dict[str, Any], work: Path) -> dict[str, Any]:
    """Start ``script --worker SPEC`` (SPEC holds ``recipe`` and where to write the result),
    wait for it, and return the JSON it wrote plus ``peak_rss`` (bytes, the child's own
    ``ru_maxrss`` from ``os.wait4``) and ``wall_s``. Output goes to ``work/log.txt``."""
    spec = {"recipe": recipe, "result": str(work / "result.json")}
    (work / "spec.json").write_text(json.dumps(spec))
    t = time.perf_counter()
    with (work / "log.txt").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, script, "--worker", str(work / "spec.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{name}: worker failed:\n{(work / 'log.txt').read_text()[-3000:]}")
    res = json.loads((work / "result.json").read_text())
    res["peak_rss"] = usage.ru_maxrss * 1024
    res["wall_s"] = time.perf_counter() - t
    return res
