"""What the run sends to accelerate's trackers (train.report_to: tensorboard, wandb, mlflow, ...)."""

from __future__ import annotations

from typing import Any

from .config import RunConfig


def tracker_config(cfg: RunConfig) -> dict[str, Any]:
    """The recipe as flat ``section.field`` scalars, the form every tracker takes (tensorboard's
    hyperparameters refuse nested mappings, lists and None): lists and None become text."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    walk("", cfg.to_dict())
    return flat


def tracker_row(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl row's numbers for the trackers; a held-out evaluation's under ``eval/``
    (its loss is not the training loss of the same step)."""
    numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
    if "eval" in row:
        return {f"eval/{k}": v for k, v in numbers.items()}
    return numbers
