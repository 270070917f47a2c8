"""slimtune: memory-efficient fine-tuning of open LLMs. One API, one CLI, one training loop.

>>> import slimtune
>>> cfg = slimtune.load_config("recipe.yaml", ["train.steps=10"])
>>> result = slimtune.train(cfg)
"""

from __future__ import annotations

import logging

# bitsandbytes warns on import, on CPUs with avx512_bf16, that an optional kernel package (which
# would fetch code from a hub at run time) is absent; its fallback works. Keep that line out of
# every run's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .config import RunConfig
from .config import load as load_config
from .errors import SlimtuneError, TrainingDiverged

__all__ = [
    "RunConfig",
    "SlimtuneError",
    "TrainingDiverged",
    "evaluate",
    "list_methods",
    "load_config",
    "load_model",
    "train",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # torch and transformers take seconds to import: ``import slimtune`` (and so ``slimtune
    # --help``) stays light, and the model loader is imported on first use.
    if name == "load_model":
        from .models import load_model

        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def train(cfg: RunConfig, **kwargs):
    """Run a recipe; see :func:`slimtune.loop.train`."""
    from .loop import train as _train

    return _train(cfg, **kwargs)


def evaluate(model, tokenizer, examples, cfg=None):
    """Held-out metrics of ``model`` on tokenised examples; see :mod:`slimtune.evaluate`."""
    from .config import EvalConfig
    from .evaluate import evaluate as _evaluate
    from .loss import find_head

    return _evaluate(model, tokenizer, find_head(model), examples, cfg or EvalConfig())


def list_methods() -> dict[str, list[str]]:
    """Registered method names per recipe axis."""
    from . import registry

    return {axis: registry.names(axis) for axis in registry.AXES}
