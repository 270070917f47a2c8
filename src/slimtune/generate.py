"""Use what you trained: batch generation (``slimtune generate``) and an interactive chat
(``slimtune chat``) on a run directory (its adapter loaded on a fresh base, or merged) or on a
recipe's model as loaded.

Prompts go through the same tokenisation as training: the tokenizer's chat template (or the
run's ``data.chat_template``, and its ``data.system``) when the run trained on chat prompts or
the prompt is a conversation, plain text otherwise. Greedy decoding is the default; sampling
(``temperature``, ``top_p``) is seeded per prompt, so a prompt's output does not depend on the
batch it ran in. peft's prompt-learning models decode with their own forward (their
``generate`` drops the prefix under transformers 5: see ``evaluate._greedy``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .data import DataConfig, Tokenise
from .errors import SlimtuneError


@dataclass
class Sampling:
    """How tokens are chosen: greedy unless ``sample``."""

    max_new_tokens: int = 128
    sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SlimtuneError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise SlimtuneError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SlimtuneError(f"--top-p must be in (0, 1], got {self.top_p}")


Prompt = str | list[dict[str, str]]


def read_prompts(path: Path) -> list[Prompt]:
    """A ``.txt`` file: one prompt per non-empty line. ``.jsonl``: per line an object with
    ``prompt`` (text, or a list of {role, content} messages) or ``messages``. A bad line is
    named in one line."""
    if not path.is_file():
        raise SlimtuneError(f"--prompts: {str(path)!r}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        prompts: list[Prompt] = [line for line in text.splitlines() if line.strip()]
    else:
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SlimtuneError(f"--prompts: {path}:{n}: not JSON ({e.msg})") from None
            value = row.get("prompt", row.get("messages")) if isinstance(row, dict) else None
            if not _is_prompt(value):
                raise SlimtuneError(
                    f"--prompts: {path}:{n}: expected 'prompt' (text or a list of "
                    "{role, content} messages) or 'messages'"
                )
            prompts.append(value)
    if not prompts:
        raise SlimtuneError(f"--prompts: {str(path)!r}: no prompt in the file")
    return prompts


def _is_prompt(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )


class Generator:
    """A loaded model, its tokenizer and the run's tokenisation settings."""

    def __init__(
        self, model: nn.Module, tok: PreTrainedTokenizerBase, data: DataConfig, chat: bool | None
    ):
        self.model, self.tok = model.eval(), tok
        self.chat = data.chat if chat is None else chat
        self.tokenise = Tokenise(tok, _with_chat(data, self.chat))
        self.device = next(model.parameters()).device
        from .evaluate import _is_prompt_learning, _stop_ids

        self.own_loop = _is_prompt_learning(model)
        self.stop = _stop_ids(model, tok)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.stop), 0)

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, list):
            return self.tokenise.chat(prompt, generation_prompt=True)
        if self.chat:
            return self.tokenise.chat([{"role": "user", "content": prompt}], True)
        return self.tokenise.ids(prompt, special=True)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def complete(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        first: int = 0,
        streamer: Any = None,
        stop_strings: list[str] | None = None,
    ) -> list[list[int]]:
        """New token ids for each prompt (ids); ``first`` numbers them for the seeds.
        ``stop_strings``: generation may end once one appears (the caller cuts the text)."""
        stops = {"stop_strings": stop_strings, "tokenizer": self.tok} if stop_strings else {}
        if sampling.sample or self.own_loop or streamer is not None:
            # one at a time: a seed per prompt, the prompt-learning loop, or a token stream
            return [
                self._one(ids, sampling, first + i, streamer, stops)
                for i, ids in enumerate(prompts)
            ]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=sampling.max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad,
            **stops,
        )
        return [self._trim(row[width:].tolist()) for row in out]

    def _one(
        self,
        ids: list[int],
        sampling: Sampling,
        index: int,
        streamer: Any,
        stops: dict[str, Any] | None = None,
    ) -> list[int]:
        torch.manual_seed(sampling.seed * 1_000_003 + index)
        x = torch.tensor([ids], device=self.device)
        if self.own_loop:  # peft prompt learning: whole forwards (evaluate._greedy says why)
            from .evaluate import forward_decode

            def choose(logits: torch.Tensor) -> int:
                return pick(logits, sampling)

            new = forward_decode(
                self.model, x, sampling.max_new_tokens, self.stop, choose, streamer
            )
            return self._trim(new)
        options: dict[str, Any] = {"do_sample": sampling.sample}
        if sampling.sample:
            options |= {"temperature": sampling.temperature, "top_p": sampling.top_p}
        out = self.model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=self.pad,
            streamer=streamer,
            **options,
            **(stops or {}),
        )
        return self._trim(out[0, len(ids) :].tolist())

    def _trim(self, new: list[int]) -> list[int]:
        """Up to the first stop token (kept out) and without trailing padding."""
        for i, t in enumerate(new):
            if t in self.stop:
                return new[:i]
        return new


def pick(logits: torch.Tensor, sampling: Sampling) -> int:
    """Greedy, or a draw from the top-p part of the tempered distribution."""
    if not sampling.sample:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    order = probs.argsort(descending=True)
    kept = probs[order].cumsum(0) - probs[order] < sampling.top_p  # always keeps the first
    choice = torch.multinomial(probs[order][kept], 1)
    return int(order[kept][choice])


def _with_chat(data: DataConfig, chat: bool) -> DataConfig:
    import dataclasses

    return dataclasses.replace(data, chat=chat)


def generate_file(
    gen: Generator,
    prompts: list[Prompt],
    sampling: Sampling,
    out: Path | None,
    batch_size: int,
    progress: bool = True,
) -> dict[str, float]:
    """Complete every prompt; JSONL lines {prompt, completion, new_tokens} to ``out`` (written
    whole or not at all) or to stdout. Returns counts and the rate."""
    from tqdm.auto import tqdm

    encoded = [gen.encode(p) for p in prompts]
    rows: list[dict[str, Any]] = []
    t = time.perf_counter()
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)
    new_tokens = 0
    for i in range(0, len(prompts), batch_size):
        done = gen.complete(encoded[i : i + batch_size], sampling, first=i)
        for prompt, ids in zip(prompts[i : i + batch_size], done):
            rows.append({"prompt": prompt, "completion": gen.decode(ids), "new_tokens": len(ids)})
            new_tokens += len(ids)
        bar.update(len(done))
        bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t):.1f}")
    bar.close()
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if out is None:
        sys.stdout.write(text)
    else:
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    seconds = time.perf_counter() - t
    return {"prompts": len(rows), "new_tokens": new_tokens, "seconds": seconds}


def chat_loop(
    gen: Generator,
    lines: Iterable[str],
    sampling: Sampling,
    write: Callable[[str], None],
    info: Callable[[str], None],
    system: str | None = None,
) -> list[list[dict[str, str]]]:
    """Read user turns from ``lines``; stream each reply through ``write``. ``/reset`` starts
    a new conversation, ``/exit`` (or the end of the input) ends. Returns every conversation."""
    from transformers import TextStreamer

    if not (gen.tokenise.template or gen.tok.chat_template):
        raise SlimtuneError(
            "chat: the tokenizer has no chat template; set data.chat_template (a Jinja "
            "template, or a file holding one) as an override"
        )

    class Out(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            write(text + ("\n" if stream_end else ""))

    start = [{"role": "system", "content": system}] if system else []
    history: list[dict[str, str]] = list(start)
    talks = [history]
    turn = 0
    for line in lines:
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            history = list(start)
            talks.append(history)
            info("(new conversation)")
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        ids = gen.encode(history)
        streamer = Out(gen.tok, skip_prompt=True, skip_special_tokens=True)
        (new,) = gen.complete([ids], sampling, first=turn, streamer=streamer)
        history.append({"role": "assistant", "content": gen.decode(new)})
        turn += 1
    return [t for t in talks if len(t) > len(start)]
