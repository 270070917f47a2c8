"""Start and stop a loopback Flower deployment (SuperLink + SuperNodes) for tests and
benchmarks: free ports, a private FLWR_HOME, every process ended by its own PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} not listening after {timeout} s")


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Deployment:
    """``with Deployment(work, nodes=[{"partition-id": 0}, ...]) as d: d.superlink``"""

    def __init__(self, work: Path, nodes: list[dict], env: dict[str, str]):
        self.work, self.nodes, self.env = work, nodes, env
        self.procs: list[subprocess.Popen] = []
        self.logs: list = []
        self.port = free_port()
        self.superlink = f"127.0.0.1:{self.port}"
        self.children: list[int] = []

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "w")  # noqa: SIM115
        self.logs.append(log)
        p = subprocess.Popen(cmd, env=self.env, cwd=self.work, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def __enter__(self) -> Deployment:
        try:
            link = self._spawn(
                "superlink",
                [str(BIN / "flower-superlink"), "--insecure"]
                + ["--disable-runtime-dependency-installation", "--database", ":flwr-in-memory:"]
                + ["--host", "127.0.0.1", "--port", str(self.port)],
            )
            wait_port(self.port, link)
            for i, node in enumerate(self.nodes):
                port = free_port()
                conf = " ".join(
                    f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in node.items()
                )
                p = self._spawn(
                    f"supernode{i}",
                    [str(BIN / "flower-supernode"), "--insecure", "--superlink", self.superlink]
                    + ["--host", "127.0.0.1", "--port", str(port), "--node-config", conf],
                )
                wait_port(port, p)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM by PID (SuperNodes first), reap, then end any child left behind."""
        self.children = [c for p in self.procs for c in descendants(p.pid)]
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=grace)  # reap: superexec polls its parent's PID
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        end = time.monotonic() + grace
        while time.monotonic() < end and any(alive(c) for c in self.children):
            time.sleep(0.2)
        for c in self.children:
            if alive(c):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c, signal.SIGKILL)
        for log in self.logs:
            log.close()

    def leftovers(self) -> list[int]:
        return [p.pid for p in self.procs if alive(p.pid)] + [c for c in self.children if alive(c)]
