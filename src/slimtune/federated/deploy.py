"""Submitting a recipe to a running SuperLink (Flower deployment mode).

``slimtune fed RECIPE --superlink HOST:PORT`` writes a two-file Flower App (a pyproject and a
module that re-exports :mod:`slimtune.federated.app`'s apps, which every SuperNode must have
installed), points the ``flwr`` CLI at the SuperLink through a private ``FLWR_HOME``, submits the
run with the recipe as its run config, and waits until the run finishes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import SlimtuneError

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "slimtune-fed"
version = "1.0.0"
description = "slimtune federated run (ServerApp and ClientApp from the installed slimtune)"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "slimtune"

[tool.flwr.app.components]
serverapp = "slimtune_fed_app:server_app"
clientapp = "slimtune_fed_app:client_app"

[tool.flwr.app.config]
recipe = ""
"""

SHIM = """\
from slimtune.federated import app as _app

server_app = _app.server_app
client_app = _app.client_app
"""


def _flwr() -> str:
    here = Path(sys.executable).parent / "flwr"
    found = str(here) if here.exists() else shutil.which("flwr")
    if not found:
        raise SlimtuneError("federated: the flwr command is not installed (pip install flwr)")
    return found


def flower_env(home: Path) -> dict[str, str]:
    """Environment for Flower processes: a private FLWR_HOME, no update check, no runtime
    dependency installation (it would ignore the torch pin), the venv's bin on PATH."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def _write_app(work: Path, superlink: str, insecure: bool, root_certificates: str | None) -> Path:
    """Write the Flower App (``work/app``) and the private FLWR_HOME (``work/home``) that names
    the SuperLink; returns the home."""
    app_dir, home = work / "app", work / "home"
    app_dir.mkdir()
    home.mkdir()
    (app_dir / "pyproject.toml").write_text(PYPROJECT)
    (app_dir / "slimtune_fed_app.py").write_text(SHIM)
    conn = [f'address = "{superlink}"']
    if insecure:
        conn.append("insecure = true")
    else:
        conn.append(f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}")
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "slimtune"\n\n[superlink.slimtune]\n' + "\n".join(conn) + "\n"
    )
    return home


def _start(flwr: str, work: Path, env: dict[str, str], recipe_text: str, superlink: str) -> str:
    """``flwr run`` the app in ``work`` with the recipe as its run config; returns the run id."""
    # A TOML basic string: JSON's escapes are valid TOML escapes.
    run_config = work / "run_config.toml"
    run_config.write_text(f"recipe = {json.dumps(recipe_text)}\n")
    res = subprocess.run(
        [flwr, "run", str(work / "app"), "slimtune", "--run-config", str(run_config)]
        + ["--format", "json"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        reply = json.loads(res.stdout)
    except json.JSONDecodeError:
        reply = {}
    if res.returncode != 0 or not reply.get("success"):
        detail = (reply.get("error-message") or res.stderr or res.stdout).strip()
        raise SlimtuneError(
            f"federated: submitting to {superlink} failed: {detail.splitlines()[-1] if detail else res.returncode}"
        )
    return str(reply["run-id"])


def _wait(
    flwr: str, work: Path, env: dict[str, str], run_id: str, timeout: float, poll: float
) -> str:
    """Poll ``flwr ls`` until the run finishes; returns its final status."""
    end = time.monotonic() + timeout if timeout else None
    status = ""
    while end is None or time.monotonic() < end:
        ls = subprocess.run(
            [flwr, "ls", "slimtune", "--run-id", run_id, "--format", "json"],
            env=env,
            cwd=work,
            capture_output=True,
            text=True,
            timeout=120,
        )
        try:
            status = json.loads(ls.stdout)["runs"][0]["status"]
        except (json.JSONDecodeError, KeyError, IndexError):
            status = ""
        if status.startswith("finished:"):
            return status
        time.sleep(poll)
    raise SlimtuneError(f"federated: run {run_id} did not finish within {timeout:.0f} s")


def submit(
    recipe_text: str,
    superlink: str,
    *,
    insecure: bool = False,
    root_certificates: str | None = None,
    timeout: float = 0.0,
    poll: float = 1.0,
) -> str:
    """Submit a run and wait for it; returns Flower's final status (``finished:completed`` on
    success). ``superlink`` is the SuperLink's HOST:PORT (its Control API)."""
    if not insecure and not root_certificates:
        raise SlimtuneError(
            "federated: --superlink needs --root-certificates CA.pem (TLS) or --insecure"
        )
    flwr = _flwr()
    with tempfile.TemporaryDirectory(prefix="slimtune-fed-") as tmp:
        work = Path(tmp)
        env = flower_env(_write_app(work, superlink, insecure, root_certificates))
        run_id = _start(flwr, work, env, recipe_text, superlink)
        print(f"slimtune fed: run {run_id} submitted to {superlink}; waiting for it to finish")
        return _wait(flwr, work, env, run_id, timeout, poll)
