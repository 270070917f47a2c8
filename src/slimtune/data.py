"""Records on disk -> tokenised examples -> padded batches.

Formats turn one record into a prompt and a response; the loss covers response tokens only
(``labels`` is -100 on the prompt). Classification records also carry the tokenised answer
choices, so evaluation can score each choice by log-likelihood.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .config import DataConfig
from .errors import SlimtuneError

IGNORE = -100


@dataclass
class Record:
    """One raw row and where it came from (for messages that name file and line)."""

    row: dict[str, Any]
    where: str


@dataclass
class Pair:
    """What a format makes of a record, before tokenisation."""

    prompt: str | list[dict[str, str]] | None  # text, chat messages, or None (plain text)
    response: str | list[dict[str, str]]
    choices: list[str] | None = None  # candidate responses scored at evaluation
    answer: int | None = None  # index of the right choice
    rejected: str | None = None  # preference data


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int] = field(default_factory=list)
    choice_ids: list[list[int]] | None = None
    answer: int | None = None
    rejected_ids: list[int] | None = None


# ---------------------------------------------------------------------------------------------
# Reading records
# ---------------------------------------------------------------------------------------------


def resolve_path(path: str) -> Path:
    """``pkg:package/sub/path`` -> a path inside an installed package; other paths unchanged."""
    if path.startswith("pkg:"):
        package, _, sub = path[4:].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            raise SlimtuneError(f"data: {path!r}: package {package!r} is not installed")
        return Path(next(iter(spec.submodule_search_locations))) / sub
    return Path(path).expanduser()


def _read_jsonl(path: Path) -> list[Record]:
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SlimtuneError(
                    f"data file {str(path)!r} line {n}: invalid JSON ({e.msg})"
                ) from None
            if not isinstance(row, dict):
                raise SlimtuneError(f"data file {str(path)!r} line {n}: expected a JSON object")
            out.append(Record(row, f"data file {str(path)!r} line {n}"))
    return out


def _read_json(path: Path) -> list[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SlimtuneError(
            f"data file {str(path)!r} line {e.lineno}: invalid JSON ({e.msg})"
        ) from None
    if not isinstance(data, list):
        raise SlimtuneError(f"data file {str(path)!r}: expected a JSON list of objects")
    out = []
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise SlimtuneError(f"data file {str(path)!r} item {i}: expected a JSON object")
        out.append(Record(row, f"data file {str(path)!r} item {i}"))
    return out


def _read_csv(path: Path) -> list[Record]:
    out = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return []
        for row in reader:
            n = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise SlimtuneError(
                    f"data file {str(path)!r} line {n}: {len(row)} fields, header has {len(header)}"
                )
            out.append(Record(dict(zip(header, row)), f"data file {str(path)!r} line {n}"))
    return out


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise SlimtuneError(f"data file {str(path)!r}: not a readable Parquet file ({e})") from None
    return [Record(r, f"data file {str(path)!r} row {i}") for i, r in enumerate(rows)]


def _read_saved(path: Path, split: str | None) -> list[Record]:
    import datasets

    def damaged(e: Exception) -> SlimtuneError:
        text = str(e).strip()
        first = (text.splitlines()[0] if text else type(e).__name__)[:300]
        return SlimtuneError(f"data: {str(path)!r}: not a readable saved dataset ({first})")

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise SlimtuneError(f"data: {str(path)!r}: not a saved dataset ({e})") from None
    except Exception as e:  # a truncated or corrupted Arrow file, whatever pyarrow raises
        raise damaged(e) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SlimtuneError(
                f"config: data.split: {split!r} is not a split of {str(path)!r}; "
                f"choose one of: {', '.join(ds)}"
            )
        ds = ds[split]
    try:
        return [Record(r, f"dataset {str(path)!r} row {i}") for i, r in enumerate(ds)]
    except Exception as e:  # Arrow data is read lazily: damage may show only here
        raise damaged(e) from None


READERS: dict[str, Callable[[Path], list[Record]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def read_records(path: str, split: str | None = None) -> list[Record]:
    p = resolve_path(path)
    if p.is_dir():
        return _read_saved(p, split)
    if not p.is_file():
        raise SlimtuneError(f"data: {path!r}: no such file or directory")
    reader = READERS.get(p.suffix.lower())
    if reader is None:
        raise SlimtuneError(
            f"data file {path!r}: unknown extension {p.suffix!r}; use {', '.join(READERS)} "
            "or a datasets.save_to_disk directory"
        )
    try:
        return reader(p)
    except UnicodeDecodeError:
        raise SlimtuneError(f"data file {path!r}: not UTF-8 text") from None


# ---------------------------------------------------------------------------------------------
# Formats: record -> Pair
# ---------------------------------------------------------------------------------------------


def _col(rec: Record, cfg: DataConfig, role: str, required: bool = True) -> Any:
    name = cfg.columns.get(role, role)
    if name not in rec.row:
        if not required:
            return None
        have = ", ".join(map(str, rec.row)) or "none"
        raise SlimtuneError(
            f"{rec.where}: missing column {name!r} (format {cfg.format}; columns present: {have}; "
            f"map yours with data.columns.{role}=NAME)"
        )
    return rec.row[name]


def _text(rec: Record, cfg: DataConfig) -> Pair:
    text = _col(rec, cfg, "text")
    if not isinstance(text, str):
        raise SlimtuneError(f"{rec.where}: column {cfg.columns.get('text', 'text')!r} is not text")
    return Pair(None, text)


ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_INPUT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def _alpaca(rec: Record, cfg: DataConfig) -> Pair:
    instruction = str(_col(rec, cfg, "instruction"))
    extra = _col(rec, cfg, "input", required=False) or ""
    output = str(_col(rec, cfg, "output"))
    if cfg.chat:
        user = instruction + (f"\n\n{extra}" if extra else "")
        return Pair([{"role": "user", "content": user}], output)
    template = cfg.template or (ALPACA_INPUT_TEMPLATE if extra else ALPACA_TEMPLATE)
    return Pair(_fill(template, {"instruction": instruction, "input": extra}, rec), output)


def _messages(rec: Record, cfg: DataConfig) -> Pair:
    msgs = _col(rec, cfg, "messages")
    ok = isinstance(msgs, list) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in msgs
    )
    if not ok or not msgs:
        raise SlimtuneError(f"{rec.where}: messages must be a list of {{role, content}} objects")
    if not any(m["role"] == "assistant" for m in msgs):
        raise SlimtuneError(f"{rec.where}: messages have no assistant turn to learn from")
    return Pair(None, msgs)


def _fill(template: str, row: dict[str, Any], rec: Record) -> str:
    try:
        return template.format(**row)
    except KeyError as e:
        raise SlimtuneError(
            f"{rec.where}: data.template names column {e.args[0]!r}, which the record lacks"
        ) from None


def _classification(rec: Record, cfg: DataConfig) -> Pair:
    label = _col(rec, cfg, "label")
    choices = _col(rec, cfg, "choices", required=False)
    if choices is None:
        choices = cfg.label_words
    if not choices:
        raise SlimtuneError(
            "config: data.label_words: required for classification without a choices column"
        )
    choices = [str(c) for c in choices]
    if isinstance(label, str) and label in choices:
        answer = choices.index(label)
    else:
        try:
            answer = int(label)
        except (TypeError, ValueError):
            answer = -1
        if not 0 <= answer < len(choices):
            raise SlimtuneError(
                f"{rec.where}: label {label!r} is neither an index below {len(choices)} "
                f"nor one of {choices}"
            )
    row = dict(rec.row)
    row.setdefault("text", _col(rec, cfg, "text", required=cfg.template is None))
    prompt = _fill(cfg.template or "{text}\nAnswer:", row, rec)
    if cfg.chat:
        return Pair([{"role": "user", "content": prompt}], choices[answer], choices, answer)
    # Without a chat template the answer follows the prompt after a space.
    spaced = [" " + c for c in choices]
    return Pair(prompt, spaced[answer], spaced, answer)


def _preference(rec: Record, cfg: DataConfig) -> Pair:
    prompt = str(_col(rec, cfg, "prompt"))
    chosen = str(_col(rec, cfg, "chosen"))
    rejected = str(_col(rec, cfg, "rejected"))
    if cfg.chat:
        return Pair([{"role": "user", "content": prompt}], chosen, rejected=rejected)
    return Pair(prompt, chosen, rejected=rejected)


FORMATS: dict[str, Callable[[Record, DataConfig], Pair]] = {
    "text": _text,
    "alpaca": _alpaca,
    "messages": _messages,
    "classification": _classification,
    "preference": _preference,
}


# ---------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------


class Tokenise:
    """Pair -> Example for one tokenizer and DataConfig."""

    def __init__(self, tok: PreTrainedTokenizerBase, cfg: DataConfig):
        self.tok, self.cfg = tok, cfg
        if (cfg.chat or cfg.format == "messages") and not tok.chat_template:
            raise SlimtuneError(
                f"config: data.{'chat' if cfg.chat else 'format'}: the tokenizer has no chat template"
            )

    def ids(self, text: str, special: bool) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def chat(self, msgs: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        if self.cfg.system and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": self.cfg.system}, *msgs]
        text = self.tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=generation_prompt
        )
        return self.ids(text, special=False)

    def prompt(self, prompt: str | list[dict[str, str]]) -> list[int]:
        if isinstance(prompt, list):
            return self.chat(prompt, generation_prompt=True)
        return self.ids(prompt, special=True)

    def __call__(self, pair: Pair) -> Example:
        eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        if pair.prompt is None and isinstance(pair.response, list):
            return self._conversation(pair.response)
        if pair.prompt is None:  # plain text: every token is a target
            ids = self.ids(pair.response, special=True) + eos
            return Example(ids, list(ids))
        prompt = self.prompt(pair.prompt)
        response = self.ids(pair.response, special=False) + eos
        ex = Example(prompt + response, [IGNORE] * len(prompt) + response, prompt_ids=prompt)
        if pair.choices is not None:
            ex.choice_ids = [self.ids(c, special=False) for c in pair.choices]
            ex.answer = pair.answer
        if pair.rejected is not None:
            ex.rejected_ids = self.ids(pair.rejected, special=False) + eos
        return ex

    def _conversation(self, msgs: list[dict[str, str]]) -> Example:
        """Loss on assistant turns only: their token spans are found by rendering prefixes."""
        ids = self.chat(msgs, generation_prompt=False)
        labels = [IGNORE] * len(ids)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start = len(self.chat(msgs[:i], generation_prompt=True)) if i else 0
            end = len(self.chat(msgs[: i + 1], generation_prompt=False))
            labels[start:end] = ids[start:end]
        return Example(ids, labels)


def _truncate(ex: Example, max_len: int) -> Example:
    """Drop the start of the prompt first, so the response (what is learnt) survives."""
    extra = len(ex.input_ids) - max_len
    if extra <= 0:
        return ex
    n_prompt = len(ex.prompt_ids)
    cut = min(extra, n_prompt)
    ids, labels = ex.input_ids[cut:], ex.labels[cut:]
    ex.input_ids, ex.labels = ids[:max_len], labels[:max_len]
    ex.prompt_ids = ex.prompt_ids[cut:]
    return ex


def _blocks(examples: list[Example], size: int, pack: bool) -> list[Example]:
    """Split (and with ``pack`` first concatenate) sequences into blocks of at most ``size``."""
    if pack:
        ids = [t for ex in examples for t in ex.input_ids]
        labels = [t for ex in examples for t in ex.labels]
        examples = [Example(ids, labels)]
    out = []
    for ex in examples:
        for i in range(0, len(ex.input_ids), size):
            labels = ex.labels[i : i + size]
            if any(t != IGNORE for t in labels[1:]):
                out.append(Example(ex.input_ids[i : i + size], labels))
    return out


# ---------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------


@dataclass
class Splits:
    train: list[Example]
    eval: list[Example]


def _pairs(records: list[Record], cfg: DataConfig) -> list[Pair]:
    """Format every record in file order, so an error names the first bad line of the file."""
    fmt = FORMATS[cfg.format]
    return [fmt(r, cfg) for r in records]


def _examples(pairs: list[Pair], tok: PreTrainedTokenizerBase, cfg: DataConfig) -> list[Example]:
    tokenise = Tokenise(tok, cfg)
    examples = [tokenise(p) for p in pairs]
    if cfg.format == "text" or cfg.packing:
        return _blocks(examples, cfg.max_seq_len, cfg.packing)
    return [_truncate(ex, cfg.max_seq_len) for ex in examples]


def _read_pairs(path: str, cfg: DataConfig) -> list[Pair]:
    records = read_records(path, cfg.split)
    if not records:
        raise SlimtuneError(f"data: {path!r}: no records (empty dataset)")
    return _pairs(records, cfg)


def load_splits(cfg: DataConfig, tok: PreTrainedTokenizerBase) -> Splits:
    """Read, format, shuffle (seeded), split and tokenise. Raises SlimtuneError on bad input."""
    pairs = _read_pairs(cfg.path, cfg)
    random.Random(cfg.seed).shuffle(pairs)
    if cfg.eval_path:
        held = _read_pairs(cfg.eval_path, cfg)
    else:
        n = int(cfg.eval_size * len(pairs)) if cfg.eval_size < 1 else int(cfg.eval_size)
        held, pairs = pairs[:n], pairs[n:]
    if cfg.limit is not None:
        pairs = pairs[: cfg.limit]
    if not pairs:
        raise SlimtuneError(
            f"data: {cfg.path!r}: the training split is empty after holding out "
            f"data.eval_size={cfg.eval_size}"
        )
    train = _examples(pairs, tok, cfg)
    if not train:
        raise SlimtuneError(f"data: {cfg.path!r}: no example has a token to learn from")
    return Splits(train, _examples(held, tok, cfg) if held else [])


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[i, :n] = torch.tensor(ex.input_ids)
        labels[i, :n] = torch.tensor(ex.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def index_stream(n: int, seed: int, start: int = 0) -> Iterator[int]:
    """Endless epochs of seeded permutations of range(n), from position ``start``.

    A position is just a count of examples consumed, so resuming is exact: the same permutation
    is regenerated from the seed and the epoch number, then the consumed prefix is skipped.
    """
    epoch, offset = divmod(start, n)
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        yield from order[offset:]
        epoch, offset = epoch + 1, 0


def total_steps(cfg: Any, n_train: int, world: int) -> int:
    """Optimizer steps of a run: ``train.steps``, or ``train.epochs`` passes over the data."""
    if cfg.train.steps:
        return cfg.train.steps
    per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    return max(1, math.ceil(cfg.train.epochs * n_train / per_step))


class Batches:
    """Deterministic global micro-batches; each process takes its own slice of each one.

    ``position`` counts examples consumed by all processes together, so it alone (with the data
    seed) determines what comes next: that is what a checkpoint stores for an exact resume.
    """

    def __init__(self, examples: list[Example], batch: int, seed: int, rank: int, world: int):
        self.examples, self.batch, self.rank, self.world = examples, batch, rank, world
        self.seed, self.position = seed, 0
        self._stream = index_stream(len(examples), seed)

    def seek(self, position: int) -> None:
        self.position = position
        self._stream = index_stream(len(self.examples), self.seed, position)

    def next(self, pad_id: int) -> dict[str, torch.Tensor]:
        idx = [next(self._stream) for _ in range(self.batch * self.world)]
        self.position += len(idx)
        mine = idx[self.rank * self.batch : (self.rank + 1) * self.batch]
        return collate([self.examples[i] for i in mine], pad_id)
