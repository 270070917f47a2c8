"""Records on disk -> tokenised examples -> padded batches.

Formats turn one record into a prompt and a response; the loss covers response tokens only
(``labels`` is -100 on the prompt). Classification records also carry the tokenised answer
choices, so evaluation can score each choice by log-likelihood.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import random
import statistics
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .config import DataConfig
from .errors import SlimtuneError

IGNORE = -100
log = logging.getLogger("slimtune.data")


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
    # the prompt is template.format(**fields), as a user turn where the prompt is a list
    template: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int] = field(default_factory=list)
    choice_ids: list[list[int]] | None = None
    answer: int | None = None
    rejected_ids: list[int] | None = None  # preference data: the rejected answer's tokens
    reference: tuple[float, float] | None = None  # reference log-probs (chosen, rejected)
    # packed rows: each token's position within its own example (restarting at 0)
    positions: list[int] | None = None


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


def _utf8(path: Path) -> str:
    """A file's text; not UTF-8 -> one line naming the file, line and byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SlimtuneError(
            f"data file {str(path)!r} line {line}: not UTF-8 text (byte {e.start})"
        ) from None


def _read_txt(path: Path) -> list[Record]:
    """One document per block of lines; blocks are separated by blank (whitespace-only) lines."""
    out: list[Record] = []
    block: list[str] = []
    start = 0
    lines = _utf8(path).replace("\r\n", "\n").split("\n")
    for n, line in enumerate([*lines, ""], 1):
        if line.strip():
            start = start if block else n
            block.append(line)
        elif block:
            out.append(Record({"text": "\n".join(block)}, f"data file {str(path)!r} line {start}"))
            block = []
    return out


SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


def _read_dir(p: Path, path: str, split: str | None, fmt: str | None) -> list[Record]:
    """A datasets.save_to_disk directory, or .txt files: one document per file, by file name."""
    if any((p / name).exists() for name in SAVED_DATASET_FILES):
        return _read_saved(p, split)
    files = sorted(
        (f for f in p.iterdir() if f.suffix.lower() == ".txt" and not f.name.startswith(".")),
        key=lambda f: f.name,
    )
    if not files:
        what = (
            "empty directory" if not any(p.iterdir()) else "no .txt files and not a saved dataset"
        )
        raise SlimtuneError(
            f"data: {path!r}: {what} (expected .txt files for format text, "
            "or a datasets.save_to_disk directory)"
        )
    if fmt not in (None, "text"):
        raise SlimtuneError(
            f"data: {path!r}: a directory of .txt files is read with data.format=text, "
            f"not format {fmt}"
        )
    docs = ((f, _utf8(f).replace("\r\n", "\n").rstrip("\n")) for f in files if f.is_file())
    return [Record({"text": text}, f"data file {str(f)!r}") for f, text in docs if text.strip()]


READERS: dict[str, Callable[[Path], list[Record]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
    ".txt": _read_txt,
}


def read_records(path: str, split: str | None = None, fmt: str | None = None) -> list[Record]:
    """A data path's records. ``fmt`` (data.format), when given, refuses .txt data but for text."""
    p = resolve_path(path)
    if p.is_dir():
        return _read_dir(p, path, split, fmt)
    if not p.is_file():
        raise SlimtuneError(f"data: {path!r}: no such file or directory")
    suffix = p.suffix.lower()
    reader = READERS.get(suffix)
    if reader is None or (suffix == ".txt" and fmt not in (None, "text")):
        known = ", ".join(s for s in READERS if s != ".txt")
        which = f" for format {fmt}" if reader is not None else ""
        raise SlimtuneError(
            f"data file {path!r}: unknown extension {p.suffix!r}{which}; use {known}, "
            ".txt (format text) or a datasets.save_to_disk directory"
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
    fields = {"instruction": instruction, "input": extra}
    return Pair(_fill(template, fields, rec), output, template=template, fields=fields)


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
    except (ValueError, IndexError, AttributeError) as e:
        raise SlimtuneError(f"config: data.template: {template!r}: {e}") from None


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
    template = cfg.template or "{text}\nAnswer:"
    prompt = _fill(template, row, rec)
    if cfg.chat:
        user = [{"role": "user", "content": prompt}]
        return Pair(user, choices[answer], choices, answer, template=template, fields=row)
    # Without a chat template the answer follows the prompt after a space.
    spaced = [" " + c for c in choices]
    return Pair(prompt, spaced[answer], spaced, answer, template=template, fields=row)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value
    )


def _answer(rec: Record, cfg: DataConfig, role: str, value: Any) -> tuple[list, str]:
    """A chosen / rejected value as (the messages before its answer, the answer's text): a
    string is the answer alone; a list of messages ends with the assistant's answer."""
    name = cfg.columns.get(role, role)
    if isinstance(value, str):
        return [], value
    if not _is_messages(value) or not value or value[-1]["role"] != "assistant":
        raise SlimtuneError(
            f"{rec.where}: column {name!r} must be text or a list of {{role, content}} "
            "messages ending with the assistant's answer"
        )
    return list(value[:-1]), str(value[-1]["content"])


def _preference(rec: Record, cfg: DataConfig) -> Pair:
    """A prompt, a chosen and a rejected answer. The common layouts: three strings; a prompt
    (string or messages) with chosen / rejected as one assistant message each; or no prompt
    column, chosen and rejected as whole conversations that share every turn but the last."""
    prompt = _col(rec, cfg, "prompt", required=False)
    chosen_before, chosen = _answer(rec, cfg, "chosen", _col(rec, cfg, "chosen"))
    rejected_before, rejected = _answer(rec, cfg, "rejected", _col(rec, cfg, "rejected"))
    if chosen_before != rejected_before:
        raise SlimtuneError(
            f"{rec.where}: chosen and rejected conversations differ before their last turn "
            "(a preference pair answers one prompt)"
        )
    if prompt is None:
        if not chosen_before:
            _col(rec, cfg, "prompt")  # raises: names the missing column
        prompt = chosen_before
    elif isinstance(prompt, str):
        prompt = [*chosen_before, {"role": "user", "content": prompt}] if chosen_before else prompt
    elif _is_messages(prompt):
        prompt = [*prompt, *chosen_before]
    else:
        name = cfg.columns.get("prompt", "prompt")
        raise SlimtuneError(f"{rec.where}: column {name!r} must be text or a list of messages")
    if not (prompt.strip() if isinstance(prompt, str) else prompt):
        raise SlimtuneError(f"{rec.where}: empty prompt")
    for role, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise SlimtuneError(f"{rec.where}: empty {role} answer")
    if chosen == rejected:
        raise SlimtuneError(f"{rec.where}: chosen and rejected answers are the same text")
    if cfg.chat and isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
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


def _chat_template(value: str, tok: PreTrainedTokenizerBase) -> str:
    """data.chat_template: the template's text, or the text of the file it names; checked."""
    where = ""
    if "{{" not in value and "{%" not in value:  # not a template: a file holding one
        path = resolve_path(value)
        if not path.is_file():
            raise SlimtuneError(
                f"config: data.chat_template: {value!r}: no such file "
                "(give a Jinja chat template, or a file holding one)"
            )
        value, where = _utf8(path), f" ({str(path)!r})"
    import jinja2

    try:  # transformers' own Jinja environment, so its extensions are known
        trial = [{"role": "user", "content": "hi"}]
        tok.apply_chat_template(trial, chat_template=value, tokenize=False)
    except jinja2.TemplateSyntaxError as e:
        first = (str(e.message or "").splitlines() or ["syntax error"])[0]
        raise SlimtuneError(
            f"config: data.chat_template{where}: not a valid Jinja template "
            f"(line {e.lineno}: {first})"
        ) from None
    except Exception:  # a template may refuse a lone user turn; real data decides
        pass
    return value


class Tokenise:
    """Pair -> Example for one tokenizer and DataConfig."""

    def __init__(self, tok: PreTrainedTokenizerBase, cfg: DataConfig):
        self.tok, self.cfg = tok, cfg
        # data.chat_template is passed to apply_chat_template; the tokenizer is left unchanged
        self.template = _chat_template(cfg.chat_template, tok) if cfg.chat_template else None
        if (cfg.chat or cfg.format == "messages") and not (self.template or tok.chat_template):
            raise SlimtuneError(
                f"config: data.{'chat' if cfg.chat else 'format'}: the tokenizer has no chat "
                "template; set data.chat_template to a Jinja chat template (or a file holding one)"
            )

    def ids(self, text: str, special: bool) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def text(self, ids: list[int]) -> str:
        """Decoded ids; a character cut in half at the end is dropped."""
        out = self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return out.rstrip("\ufffd")

    def chat(self, msgs: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        if self.cfg.system and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": self.cfg.system}, *msgs]
        own = {"chat_template": self.template} if self.template else {}
        text = self.tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=generation_prompt, **own
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


# ---------------------------------------------------------------------------------------------
# Fitting examples into max_seq_len, and the report of what was cut
# ---------------------------------------------------------------------------------------------

# How an example was made to fit, in the order the report lists them.
KINDS = ("field", "turns", "template", "prompt_start", "end")


def _median(values: list[int]) -> str:
    m = statistics.median(values)
    return str(int(m)) if m == int(m) else f"{m:.1f}"


@dataclass
class Cuts:
    """The examples of one split that were longer than data.max_seq_len, and what they lost.

    ``tokens_cut[kind]`` holds one count per shortened example (its length before minus after):
    field: a template's {column} values were shortened; turns: a conversation lost its oldest
    exchanges (its system message stays); template: the template alone was too
    long, so the prompt start was cut; prompt_start: the prompt start was cut (data.truncate
    prompt_start, or a prompt without a template); end: tokens after the prompt were cut too
    (a response or conversation longer than max_seq_len). ``fields`` counts, per column, the
    examples in which it was shortened.
    """

    examples: int = 0
    tokens_cut: dict[str, list[int]] = field(default_factory=dict)
    fields: dict[str, int] = field(default_factory=dict)

    @property
    def cut(self) -> int:
        return sum(len(v) for v in self.tokens_cut.values())

    def add(self, kind: str, tokens: int, names: tuple[str, ...] = ()) -> None:
        self.tokens_cut.setdefault(kind, []).append(tokens)
        for name in names:
            self.fields[name] = self.fields.get(name, 0) + 1

    def describe(self) -> str:
        """E.g. ``field {text} shortened (median 41, max 390 tokens cut)``."""
        names = ", ".join(f"{{{n}}}" for n in self.fields)
        words = {
            "field": f"field{'s' if len(self.fields) > 1 else ''} {names} shortened",
            "turns": "oldest turns dropped",
            "template": "template longer than max_seq_len: prompt start cut",
            "prompt_start": "prompt start cut",
            "end": "end cut",
        }
        parts = []
        for kind in (k for k in KINDS if k in self.tokens_cut):
            c = self.tokens_cut[kind]
            many = f" in {len(c)}" if len(self.tokens_cut) > 1 else ""
            parts.append(f"{words[kind]}{many} (median {_median(c)}, max {max(c)} tokens cut)")
        return ", ".join(parts)


@dataclass
class Truncation:
    """What load_splits cut to fit data.max_seq_len, per split; ``line()`` says it in one line."""

    max_seq_len: int = 0
    train: Cuts = field(default_factory=Cuts)
    eval: Cuts = field(default_factory=Cuts)
    blocks: bool = False  # format text or packing: sequences were split into blocks, not cut

    @property
    def cut(self) -> int:
        return self.train.cut + self.eval.cut

    def line(self) -> str:
        n, tr, ev = self.max_seq_len, self.train, self.eval
        if self.blocks:
            return (
                f"data: sequences split into blocks of max_seq_len={n} tokens, not cut "
                f"({tr.examples} training, {ev.examples} held-out blocks)"
            )
        if not self.cut:
            return (
                f"data: no example longer than max_seq_len={n} "
                f"({tr.examples} training, {ev.examples} held-out)"
            )
        out = f"data: {tr.cut} of {tr.examples} training examples longer than max_seq_len={n}"
        if tr.cut:
            out += f": {tr.describe()}"
        if ev.cut:
            out += f"; held-out: {ev.cut} of {ev.examples}: {ev.describe()}"
        return out


def _length(ex: Example) -> int:
    """Tokens of the longest sequence an example makes: prompt + chosen, or prompt + rejected."""
    rejected = len(ex.prompt_ids) + len(ex.rejected_ids) if ex.rejected_ids is not None else 0
    return max(len(ex.input_ids), rejected)


def _truncate(ex: Example, max_len: int) -> Example:
    """Drop the start of the prompt first, so the response (what is learnt) survives; then the
    end of the response (of a preference pair: of both answers, each to what fits)."""
    extra = _length(ex) - max_len
    if extra <= 0:
        return ex
    n_prompt = len(ex.prompt_ids)
    cut = min(extra, n_prompt)
    ids, labels = ex.input_ids[cut:], ex.labels[cut:]
    ex.input_ids, ex.labels = ids[:max_len], labels[:max_len]
    ex.prompt_ids = ex.prompt_ids[cut:]
    if ex.rejected_ids is not None:
        ex.rejected_ids = ex.rejected_ids[: max_len - len(ex.prompt_ids)]
    return ex


def _water_fill(keep: dict[str, int], excess: int) -> dict[str, int] | None:
    """New token counts for the fields, ``excess`` fewer in all, taken from the longest first
    (the longest is cut down to the next longest, then both together, ...); None if the fields
    hold fewer than ``excess`` tokens."""
    if sum(keep.values()) < excess:
        return None

    def cut(cap: int) -> int:
        return sum(max(0, k - cap) for k in keep.values())

    lo, hi = 0, max(keep.values())  # cut(lo) >= excess > cut(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cut(mid) >= excess else (lo, mid)
    new = {n: min(k, hi) for n, k in keep.items()}
    short = excess - cut(hi)  # fields at the cap ``hi`` give one token more, in order
    for n in new:
        if short > 0 and keep[n] >= hi:
            new[n], short = hi - 1, short - 1
    return new


def _shorten_fields(
    ex: Example, pair: Pair, tokenise: Tokenise, max_len: int
) -> tuple[Example, tuple[str, ...]] | None:
    """Cut the longest {column} values of the pair's template (whole tokens, from their end) and
    re-tokenise, until the example fits; the names of the columns cut, or None if it cannot."""
    assert pair.template is not None
    names = []
    for _, name, _, _ in string.Formatter().parse(pair.template):
        value = pair.fields.get(name) if name else None
        if isinstance(value, str) and value and name not in names:
            names.append(name)
    ids = {n: tokenise.ids(pair.fields[n], special=False) for n in names}
    keep = {n: len(v) for n, v in ids.items()}
    # Each pass removes at least the remaining excess from the fields (re-tokenising a shortened
    # value may not give exactly the tokens kept), so the loop ends.
    while (excess := len(ex.input_ids) - max_len) > 0:
        if not keep or (new := _water_fill(keep, excess)) is None:
            return None
        keep = new
        short = {n: tokenise.text(ids[n][:k]) for n, k in keep.items() if k < len(ids[n])}
        prompt = pair.template.format(**{**pair.fields, **short})
        if isinstance(pair.prompt, list):
            prompt = [{"role": "user", "content": prompt}]
        ex = tokenise(replace(pair, prompt=prompt))
    return ex, tuple(n for n in names if keep[n] < len(ids[n]))


def _drop_turns(msgs: list[dict[str, str]], tokenise: Tokenise, max_len: int) -> Example | None:
    """The conversation without its oldest exchanges (each drop removes the messages before the
    next user turn; a leading system message stays), as soon as it fits; None if even the last
    exchange with an assistant turn does not fit."""
    head = msgs[:1] if msgs and msgs[0]["role"] == "system" else []
    rest = msgs[len(head) :]
    for start in (i for i, m in enumerate(rest) if i and m["role"] == "user"):
        if not any(m["role"] == "assistant" for m in rest[start:]):
            return None
        ex = tokenise(Pair(None, head + rest[start:]))
        if len(ex.input_ids) <= max_len:
            return ex
    return None


def _fit(
    ex: Example, pair: Pair, tokenise: Tokenise, cfg: DataConfig
) -> tuple[Example, str, tuple[str, ...]]:
    """An example longer than max_seq_len, shortened; the kind of cut (KINDS) and columns cut."""
    kind = "prompt_start"
    if cfg.truncate == "field" and pair.prompt is None and isinstance(pair.response, list):
        fitted = _drop_turns(pair.response, tokenise, cfg.max_seq_len)
        if fitted is not None:
            return fitted, "turns", ()
    if cfg.truncate == "field" and pair.template is not None:
        fitted = _shorten_fields(ex, pair, tokenise, cfg.max_seq_len)
        if fitted is not None:
            return fitted[0], "field", fitted[1]
        kind = "template"
    after_prompt = _length(ex) - len(ex.prompt_ids)
    ex = _truncate(ex, cfg.max_seq_len)
    if _length(ex) - len(ex.prompt_ids) < after_prompt:
        kind = "end"
    return ex, kind, ()


def _blocks(examples: list[Example], size: int) -> list[Example]:
    """Split sequences into blocks of at most ``size`` (blocks with nothing to predict go)."""
    out = []
    for ex in examples:
        for i in range(0, len(ex.input_ids), size):
            labels = ex.labels[i : i + size]
            if any(t != IGNORE for t in labels[1:]):
                out.append(Example(ex.input_ids[i : i + size], labels))
    return out


def _pack(examples: list[Example], size: int) -> list[Example]:
    """Place whole examples, in order, into rows of at most ``size`` tokens (a new row when the
    next one does not fit). Each token keeps its position within its own example, and each
    example's first label is masked: attention never crosses examples (the loss forward
    attends block-diagonally by the positions) and no token is predicted from another example,
    so a packed row's loss is the sum of its examples' own losses."""
    rows: list[Example] = []
    for ex in examples:
        n = len(ex.input_ids)
        if not rows or len(rows[-1].input_ids) + n > size:
            rows.append(Example([], [], positions=[]))
        row = rows[-1]
        row.input_ids += ex.input_ids
        row.labels += [IGNORE, *ex.labels[1:]]
        row.positions += range(n)
    return rows


# ---------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------


@dataclass
class Splits:
    train: list[Example]
    eval: list[Example]
    truncation: Truncation = field(default_factory=Truncation)  # what was cut to fit


def _pairs(records: list[Record], cfg: DataConfig) -> list[Pair]:
    """Format every record in file order, so an error names the first bad line of the file."""
    fmt = FORMATS[cfg.format]
    return [fmt(r, cfg) for r in records]


def _examples(
    pairs: list[Pair], tok: PreTrainedTokenizerBase, cfg: DataConfig, pack: bool = False
) -> tuple[list[Example], Cuts]:
    tokenise = Tokenise(tok, cfg)
    if cfg.format == "text":
        out = _blocks([tokenise(p) for p in pairs], cfg.max_seq_len)
        cuts = Cuts(len(out))
    else:
        out, cuts = [], Cuts(len(pairs))
        for pair in pairs:
            ex = tokenise(pair)
            if (n := _length(ex)) > cfg.max_seq_len:
                ex, kind, names = _fit(ex, pair, tokenise, cfg)
                cuts.add(kind, n - _length(ex), names)
            out.append(ex)
    return (_pack(out, cfg.max_seq_len) if pack else out), cuts


def _read_pairs(path: str, cfg: DataConfig) -> list[Pair]:
    records = read_records(path, cfg.split, cfg.format)
    if not records:
        raise SlimtuneError(f"data: {path!r}: no records (empty dataset)")
    return _pairs(records, cfg)


def load_splits(cfg: DataConfig, tok: PreTrainedTokenizerBase) -> Splits:
    """Read, format, shuffle (seeded), split and tokenise. Raises SlimtuneError on bad input.

    Examples longer than data.max_seq_len are shortened (data.truncate); ``truncation`` of the
    result reports it, and its line is logged (logger slimtune.data; WARNING if anything was cut).
    """
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
    train, train_cuts = _examples(pairs, tok, cfg, pack=cfg.packing)
    if not train:
        raise SlimtuneError(f"data: {cfg.path!r}: no example has a token to learn from")
    held_out, held_cuts = _examples(held, tok, cfg) if held else ([], Cuts())
    blocks = cfg.format == "text"
    report = Truncation(cfg.max_seq_len, train_cuts, held_cuts, blocks)
    log.log(logging.WARNING if report.cut else logging.INFO, "%s", report.line())
    return Splits(train, held_out, report)


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
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(ex.positions is not None for ex in examples):
        # packed rows: positions restart at each example; the padding after a row counts as
        # an example of its own (it attends only to itself and has no target)
        pos = torch.zeros((len(examples), width), dtype=torch.long)
        for i, ex in enumerate(examples):
            n = len(ex.input_ids)
            pos[i, :n] = torch.tensor(ex.positions if ex.positions is not None else range(n))
            pos[i, n:] = torch.arange(width - n)
        batch["position_ids"] = pos
    if examples and all(ex.rejected_ids is not None for ex in examples):
        # preference pairs: the rejected sequences (prompt + rejected answer) beside the chosen
        rejected = [
            Example(
                ex.prompt_ids + ex.rejected_ids, [IGNORE] * len(ex.prompt_ids) + ex.rejected_ids
            )
            for ex in examples
        ]
        other = collate(rejected, pad_id)
        batch |= {f"rejected_{k}": v for k, v in other.items()}
    if examples and all(ex.reference is not None for ex in examples):
        # reference log-probabilities computed before training (objective: dpo, precomputed)
        ref = torch.tensor([ex.reference for ex in examples], dtype=torch.float32)
        batch |= {"ref_chosen_logps": ref[:, 0], "ref_rejected_logps": ref[:, 1]}
    return batch


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
