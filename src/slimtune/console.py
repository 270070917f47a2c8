"""Console output shared by the CLI and its worker processes (``slimtune bench``'s children, the
benchmark scripts): the libraries' own logging and progress bars quieted, slimtune's warnings
kept."""

from __future__ import annotations

import logging
import os


def quiet_libraries() -> None:
    """transformers, huggingface_hub and datasets log errors only and draw no progress bars;
    slimtune's own warnings print as ``slimtune: ...``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import huggingface_hub
    import transformers

    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.disable_progress_bar()
    logging.basicConfig(format="slimtune: %(message)s", level=logging.WARNING)
