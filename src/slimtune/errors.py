"""Errors a user can cause and fix: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class SlimtuneError(Exception):
    """Bad input (config, data, model path). The message is the whole story: no traceback."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf. Raised before the optimizer step, so no weight is spoiled."""
