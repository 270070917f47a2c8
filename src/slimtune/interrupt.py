"""Ctrl-C and SIGTERM during training: the first asks the loop to stop after the step it is in,
with a resumable checkpoint; a second one exits at once (KeyboardInterrupt where it lands)."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """While entered (in the main thread only: Python delivers signals there), SIGINT and
    SIGTERM set a flag instead of stopping the process; :meth:`requested` reads it, agreed on
    by every process of a distributed run so that all of them stop after the same step."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.flag = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if self.enabled:
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        print(
            f"\nslimtune: {signal.Signals(signum).name}: stopping after this step with a "
            "checkpoint (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def requested(self, accelerator: Any) -> bool:
        """Whether any process was asked to stop (one small all-reduce per step when several
        processes run; a signal reaches them at slightly different points of a step)."""
        if accelerator.num_processes == 1:
            return self.flag
        mine = torch.tensor([float(self.flag)], device=accelerator.device)
        return bool(accelerator.reduce(mine, "sum").item() > 0)
