"""The sequence length a recipe's run really pads to, read from its data.

A batch is right-padded to its longest example (``data.collate``), not to ``data.max_seq_len``,
so activations (and attention's mask) scale with the widest batch the run draws, and the batch
holding the longest example sets the peak. The run's batches are a seeded permutation of the
training split (``data.index_stream``), so they can be replayed here exactly: the planner prices
the widest micro-batch among the ``steps x grad_accum`` the run draws (one process), which is the
longest training example whenever the run covers an epoch, and at most ``data.max_seq_len``
(longer examples are shortened to it; packed blocks are exactly that long).

Reading the data needs only the model's tokenizer (the bundled models' are on disk once the model
was converted; a hub id's only if cached: nothing is downloaded here). Where the data or the
tokenizer cannot be read, the planner prices ``data.max_seq_len`` and says why.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import islice
from typing import Any

from ..errors import SlimtuneError


@dataclass(frozen=True)
class SeqChoice:
    """The priced sequence length and the sentence ``slimtune plan`` prints for it."""

    seq: int
    why: str


def tokenizer_of(model: Any) -> Any:
    """The tokenizer of a recipe's ``model`` section, without its weights (as
    ``models.load_model`` sets it up: pad = eos where missing). A hub id loads only from the
    local cache."""
    from transformers import AutoTokenizer

    from .. import models

    if model.name == models.TINY:
        return models.tiny_tokenizer()
    where = models.resolve(model.name)
    source = str(where) if where is not None else model.name
    try:
        tok = AutoTokenizer.from_pretrained(
            source, trust_remote_code=model.trust_remote_code, local_files_only=where is None
        )
    except Exception as e:  # whatever the reading library raises: "cannot load"
        raise SlimtuneError(f"tokenizer of {model.name!r}: {models.first_line(e)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def widest_batch(lengths: list[int], batch: int, seed: int, micro_batches: int) -> int:
    """The widest of the first ``micro_batches`` batches of ``batch`` examples that
    ``data.Batches`` (one process) draws from examples of these ``lengths``."""
    from ..data import index_stream

    drawn = islice(index_stream(len(lengths), seed), micro_batches * batch)
    return max(lengths[i] for i in drawn)


def run_seq(cfg: Any, batch: int | None = None) -> SeqChoice:
    """What a recipe's run pads to (see the module's doc), or ``data.max_seq_len`` with the
    reason when its data cannot be read; ``batch``: instead of ``train.batch_size``."""
    from ..data import load_splits, resolve_path, total_steps

    cap = cfg.data.max_seq_len
    try:
        if not resolve_path(cfg.data.path).exists():
            raise SlimtuneError(f"no such file or directory {cfg.data.path!r}")
        train = load_splits(cfg.data, tokenizer_of(cfg.model)).train
    except (SlimtuneError, OSError, ValueError) as e:
        return SeqChoice(cap, f"data.max_seq_len (data not read: {e})")
    lengths = [len(ex.input_ids) for ex in train]
    longest = max(lengths)
    tc = cfg.train
    if batch is not None and batch != tc.batch_size:
        cfg = replace(cfg, train=replace(tc, batch_size=batch))
    batch = cfg.train.batch_size
    steps = total_steps(cfg, len(lengths), 1)
    draws = steps * tc.grad_accum
    if draws * batch >= len(lengths):  # every example is drawn
        return SeqChoice(longest, f"the longest training example (max_seq_len {cap})")
    seq = widest_batch(lengths, batch, tc.seed, draws)
    return SeqChoice(
        seq,
        f"the widest batch of the run's {steps} steps (longest example {longest}, "
        f"max_seq_len {cap})",
    )
