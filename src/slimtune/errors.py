"""Errors a user can cause and fix: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class SlimtuneError(Exception):
    """Bad input (config, data, model path). The message is the whole story: no traceback."""


class Interrupted(KeyboardInterrupt):
    """A signal stopped training after a step, with a checkpoint: the message says how to go
    on. The CLI prints it as one line and exits with code 130."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf. Raised before the optimizer step, so no weight is spoiled."""
