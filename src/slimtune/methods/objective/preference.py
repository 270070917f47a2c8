"""Preference objectives: DPO (and its IPO loss), ORPO and SimPO, over preference pairs.

A batch of ``data.format: preference`` holds the chosen sequences (``input_ids``, ...) and the
rejected ones (``rejected_input_ids``, ...), each a prompt and an answer whose tokens are the
targets. One forward runs both halves stacked; ``loss.sequence_logps`` gives each sequence's
summed log-probability of its answer through the chunked head (no full-vocabulary logits for the
batch). The loss is summed over pairs and the loop divides by the pairs of the step.

Definitions follow the papers and TRL 1.16 (the parity tests in tests/test_preference.py):

- DPO (Rafailov et al. 2023, arXiv:2305.18290): ``-log sigmoid(beta * d)``, d = (chosen
  log-ratio) - (rejected log-ratio) against a frozen reference policy; ``label_smoothing`` e
  gives conservative DPO, ``-(1-e) log sigmoid(beta d) - e log sigmoid(-beta d)``.
- IPO (Azar et al. 2023, arXiv:2310.12036): ``(d' - 1/(2 beta))^2`` with d' formed from the
  log-ratios averaged over each answer's tokens (as TRL, after the IPO authors).
- ORPO (Hong et al. 2024, arXiv:2403.07691): no reference; the chosen sequence's negative
  log-likelihood (mean over its tokens) minus ``beta * log sigmoid(log odds ratio)`` of the
  token-averaged log-probabilities.
- SimPO (Meng et al. 2024, arXiv:2405.14734): no reference; ``-log sigmoid(beta * (mean
  log-prob chosen - mean log-prob rejected) - gamma)``.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...data import IGNORE, collate
from ...errors import SlimtuneError
from ...loss import find_head, sequence_logps, token_logps
from ...registry import register
from ..base import Objective, ObjectiveContext

log = logging.getLogger(__name__)

REFERENCES = ("auto", "adapters", "precomputed", "copy")


def stacked(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The chosen rows, then the rejected rows, right-padded to one width (padding is masked
    out of attention and loss, so the pad token's id does not matter)."""
    width = max(batch["input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    fill = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE}
    out = {}
    for key, value in fill.items():
        halves = [batch[key], batch[f"rejected_{key}"]]
        halves = [F.pad(h, (0, width - h.shape[1]), value=value) for h in halves]
        out[key] = torch.cat(halves)
    return out


def pair_logps(per_token: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per pair, from the target tokens' log-probs of a ``stacked`` batch (``keep``: where the
    targets are, chosen rows then rejected rows): the summed answer log-probabilities
    (``chosen``, ``rejected``), the answer lengths (``n_chosen``, ``n_rejected``), and the
    tokens with the row each belongs to (``per_token``, ``owner``)."""
    n = keep.shape[0] // 2
    owner = torch.arange(2 * n, device=keep.device)[:, None].expand_as(keep)[keep]
    logps = per_token.new_zeros(2 * n).index_add(0, owner, per_token)
    counts = keep.sum(dim=1).to(logps.dtype)
    return {"chosen": logps[:n], "rejected": logps[n:], "n_chosen": counts[:n],
            "n_rejected": counts[n:], "per_token": per_token, "owner": owner}  # fmt: skip


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2."""
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


def rewards(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a reward-based objective logs per pair, from its implicit rewards."""
    return {
        "reward_chosen": chosen,
        "reward_rejected": rejected,
        "reward_margin": chosen - rejected,
        "reward_accuracy": (chosen > rejected).float(),
    }


class Preference(Objective):
    """Shared by the preference objectives: pairs as the normaliser, the stacked forward, the
    per-step means of what they log, and held-out preference metrics."""

    pairs: ClassVar[bool] = True
    sequences_per_example: ClassVar[int] = 2

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self._sums: dict[str, float] = {}
        self._n = 0

    def targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])

    def policy(
        self, model: nn.Module, head: Any, batch: dict[str, torch.Tensor], chunk: int
    ) -> dict[str, torch.Tensor]:
        """Summed answer log-probabilities and answer lengths of both halves, one forward."""
        return pair_logps(*token_logps(model, head, stacked(batch), chunk))

    def loss_sum(
        self, model: nn.Module, head: Any, batch: dict[str, torch.Tensor], chunk: int
    ) -> torch.Tensor:
        p = self.policy(model, head, batch, chunk)
        losses, logged = self.pair_losses(model, head, batch, chunk, p)
        self.record(p, logged)
        return losses.sum()

    def pair_losses(
        self,
        model: nn.Module,
        head: Any,
        batch: dict[str, torch.Tensor],
        chunk: int,
        p: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each pair's loss, and per-pair quantities to log (``record`` detaches them)."""
        raise NotImplementedError(f"objective {self.name!r} has no pair loss")

    def record(self, p: dict[str, torch.Tensor], logged: dict[str, torch.Tensor]) -> None:
        """Add one batch's per-pair quantities to the means ``metrics()`` returns."""
        per_pair = {
            "logp_chosen": p["chosen"],
            "logp_rejected": p["rejected"],
            "pref_accuracy": (p["chosen"] > p["rejected"]).float(),
            **logged,
        }
        for k, v in per_pair.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v.detach().float().sum())
        self._n += len(p["chosen"])

    def attach_reference(
        self, model: nn.Module, method: Any, load_base: Callable[[], nn.Module]
    ) -> None:
        """For evaluation outside a run (``slimtune eval``): the reference policy beside a
        loaded ``model`` (trained by ``method``; None: the model as loaded, untrained). Only
        objectives with a reference need one."""

    def metrics(self) -> dict[str, float]:
        out = {k: v / self._n for k, v in self._sums.items()} if self._n else {}
        self._sums, self._n = {}, 0
        return out

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, head: Any, batches: list[dict[str, torch.Tensor]], chunk: int
    ) -> dict[str, float]:
        """Held-out: the loss and the logged quantities, averaged over pairs. pref_accuracy: the
        policy gives the chosen answer a higher log-probability than the rejected one."""
        self.metrics()  # drop what training left
        total, pairs = 0.0, 0
        for batch in batches:
            total += float(self.loss_sum(model, head, batch, chunk))
            pairs += self.targets(batch)
        out = {
            f"pref_{k}" if not k.startswith("pref_") else k: v for k, v in self.metrics().items()
        }
        out["pref_loss"] = total / max(pairs, 1)
        return out


@dataclass
class _DPOConfig(Objective.Config):
    beta: float = 0.1
    """Strength of the KL anchor to the reference (DPO's beta; IPO's tau)."""
    label_smoothing: float = 0.0
    """Conservative DPO: the assumed probability that a pair's labels are flipped (sigmoid loss)."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO; ipo: IPO's squared loss on length-averaged log-ratios."""
    reference: Literal["auto", "adapters", "precomputed", "copy"] = "auto"
    """The frozen reference policy. adapters: the model with its adapters disabled (no second
    model); precomputed: log-probs of every pair from one pass before training; copy: a frozen
    copy of the model (a second set of weights in memory); auto: adapters where the params method
    allows (LoRA at its default init, prompt tuning), else precomputed."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type == "ipo":
            raise ValueError("label_smoothing applies to loss_type sigmoid, not ipo")


@register("objective", "dpo")
class DPO(Preference):
    """Direct preference optimisation against a frozen reference policy (arXiv:2305.18290); loss_type ipo gives IPO (arXiv:2310.12036)."""

    Config = _DPOConfig

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.mode: str | None = None  # the resolved reference
        self.frozen: nn.Module | None = None  # reference: copy
        self.frozen_head: Any = None

    def setup(self, ctx: ObjectiveContext) -> None:
        asked = self.cfg.reference
        if getattr(ctx.optimizer, "forward_only", False):
            # zeroth order: the reference must not run inside the perturbed forwards
            if asked in ("adapters", "copy"):
                raise SlimtuneError(
                    f"objective.reference: {asked}: optimizer {ctx.optimizer.name} perturbs the "
                    "weights inside its forwards; use reference precomputed (or auto)"
                )
            asked = "precomputed"
        self.mode = resolve_reference(asked, ctx.model, ctx.method)
        log.info("objective %s: reference policy %s", self.name, self.mode)
        if self.mode == "copy":
            self.frozen = copy.deepcopy(ctx.model).eval().requires_grad_(False)
        elif self.mode == "precomputed":
            examples = ctx.splits.train + ctx.splits.eval
            with torch.no_grad(), _eval_mode(ctx.model):
                precompute(ctx, [ex for ex in examples if ex.rejected_ids is not None])

    def attach_reference(
        self, model: nn.Module, method: Any, load_base: Callable[[], nn.Module]
    ) -> None:
        if method is None:  # untrained: the model is its own reference
            self.mode, self.frozen = "copy", model
            return
        asked = "auto" if self.cfg.reference == "precomputed" else self.cfg.reference
        mode = resolve_reference(asked, model, method)
        if mode == "adapters":
            self.mode = mode
        else:  # the checkpoint the run started from, loaded again
            base = load_base().to(next(model.parameters()).device)
            self.mode, self.frozen = "copy", base.eval().requires_grad_(False)

    def loss_sum(
        self, model: nn.Module, head: Any, batch: dict[str, torch.Tensor], chunk: int
    ) -> torch.Tensor:
        # The reference's forward first, while no graph is alive: its transients then do not
        # add to the policy's kept activations at the step's peak.
        if "ref_chosen_logps" not in batch:
            ref_c, ref_r = self.reference_logps(model, head, batch, chunk)
            batch = {**batch, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
        return super().loss_sum(model, head, batch, chunk)

    def reference_logps(
        self, model: nn.Module, head: Any, batch: dict[str, torch.Tensor], chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference policy's summed answer log-probabilities (chosen, rejected)."""
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if self.mode == "copy" and self.frozen is not None:
            if self.frozen_head is None:  # its own head: the policy's may have trained
                self.frozen_head = find_head(self.frozen)
            ref, head, ctx = self.frozen, self.frozen_head, nullcontext()
        elif self.mode in ("adapters", None):
            ref, ctx = model, adapters_disabled(model)
        else:
            raise SlimtuneError(f"objective {self.name}: no reference log-probs in this batch")
        with torch.no_grad(), ctx:
            p = Preference.policy(self, ref, head, batch, chunk)
        return p["chosen"], p["rejected"]

    def pair_losses(self, model, head, batch, chunk, p):  # type: ignore[override]
        c = self.cfg
        ref_c, ref_r = self.reference_logps(model, head, batch, chunk)
        chosen_ratio = p["chosen"] - ref_c.to(p["chosen"])
        rejected_ratio = p["rejected"] - ref_r.to(p["rejected"])
        if c.loss_type == "ipo":
            d = chosen_ratio / p["n_chosen"].clamp(min=1) - rejected_ratio / p["n_rejected"].clamp(
                min=1
            )
            losses = (d - 1 / (2 * c.beta)) ** 2
        else:
            z = c.beta * (chosen_ratio - rejected_ratio)
            losses = -(1 - c.label_smoothing) * F.logsigmoid(z)
            if c.label_smoothing:
                losses = losses - c.label_smoothing * F.logsigmoid(-z)
        return losses, rewards(c.beta * chosen_ratio, c.beta * rejected_ratio)


@register("objective", "ipo")
class IPO(DPO):
    """IPO (arXiv:2310.12036): DPO's setup with a squared loss on length-averaged log-ratios (objective dpo with loss_type ipo)."""

    @dataclass
    class Config(_DPOConfig):
        loss_type: Literal["sigmoid", "ipo"] = "ipo"


@register("objective", "orpo")
class ORPO(Preference):
    """Odds-ratio preference optimisation (arXiv:2403.07691): SFT on the chosen answer plus an odds-ratio penalty; no reference model."""

    @dataclass
    class Config(Objective.Config):
        beta: float = 0.1
        """Weight of the odds-ratio term (the paper's lambda)."""
        nll_tokens: Literal["sequence", "answer"] = "sequence"
        """Tokens of the chosen sequence the NLL term averages: sequence (prompt and answer, as
        the reference implementation and TRL) or answer."""

        def __post_init__(self) -> None:
            if self.beta < 0:
                raise ValueError(f"beta must be >= 0, got {self.beta}")

    def policy(self, model, head, batch, chunk):  # type: ignore[override]
        if self.cfg.nll_tokens == "answer":
            return super().policy(model, head, batch, chunk)
        # Every attended token of the chosen rows is a target (for the NLL); the answer's
        # tokens are picked out of them for the odds ratio.
        answer = batch["labels"][:, 1:] != IGNORE
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
        labels[:, 0] = IGNORE
        p = super().policy(model, head, {**batch, "labels": labels}, chunk)
        n = len(p["chosen"])
        every = labels[:, 1:] != IGNORE
        in_answer = answer[every]  # of the chosen rows' targets, in order
        chosen_part = p["owner"] < n
        per_token, owner = p["per_token"], p["owner"]
        sums = per_token.new_zeros(n)
        sums = sums.index_add(0, owner[chosen_part][in_answer], per_token[chosen_part][in_answer])
        p["nll"] = -p["chosen"] / p["n_chosen"].clamp(min=1)
        p["chosen"], p["n_chosen"] = sums, answer.sum(dim=1).to(sums.dtype)
        return p

    def pair_losses(self, model, head, batch, chunk, p):  # type: ignore[override]
        mean_c = p["chosen"] / p["n_chosen"].clamp(min=1)
        mean_r = p["rejected"] / p["n_rejected"].clamp(min=1)
        nll = p.get("nll", -mean_c)
        log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))
        ratio = F.logsigmoid(log_odds)
        losses = nll - self.cfg.beta * ratio
        return losses, {"nll": nll, "log_odds": log_odds, "log_odds_ratio": ratio}


@register("objective", "simpo")
class SimPO(Preference):
    """Simple preference optimisation (arXiv:2405.14734): length-normalised log-probability margin with a target margin gamma; no reference model."""

    @dataclass
    class Config(Objective.Config):
        beta: float = 2.0
        """Scale of the length-normalised reward."""
        gamma: float = 1.0
        """Target reward margin (TRL's simpo_gamma; the paper's gamma, = beta x gamma/beta)."""

        def __post_init__(self) -> None:
            if self.beta <= 0:
                raise ValueError(f"beta must be > 0, got {self.beta}")

    def pair_losses(self, model, head, batch, chunk, p):  # type: ignore[override]
        c = self.cfg
        reward_c = c.beta * p["chosen"] / p["n_chosen"].clamp(min=1)
        reward_r = c.beta * p["rejected"] / p["n_rejected"].clamp(min=1)
        losses = -F.logsigmoid(reward_c - reward_r - c.gamma)
        return losses, rewards(reward_c, reward_r)


@dataclass
class _SPINConfig(Objective.Config):
    beta: float = 0.1
    """DPO's beta for each iteration's update."""
    iterations: int = 2
    """Self-play iterations: the run's steps are split evenly between them; each starts by
    generating the rejected answers with the model as it is then (the previous iteration's)."""
    max_new_tokens: int = 64
    """Tokens generated per rejected answer (at most)."""
    sample: bool = False
    """false: greedy; true: sampled at ``temperature`` (seeded by train.seed and the iteration)."""
    temperature: float = 1.0
    """Sampling temperature (with ``sample: true``)."""
    label_smoothing: float = 0.0
    """As DPO's: conservative DPO on the self-play pairs."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """As DPO's: sigmoid (DPO) or ipo."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@register("objective", "spin")
class SPIN(DPO):
    """Self-play fine-tuning (arXiv:2401.01335): each iteration the model answers the SFT prompts itself; its answers are the rejected side against the data's, with DPO's loss against the model that generated them."""

    Config = _SPINConfig
    pairs: ClassVar[bool] = False  # reads SFT data (prompt and answer); makes the rejected side

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.ctx: ObjectiveContext | None = None
        self.iteration = -1  # the iteration whose pairs the examples hold

    def setup(self, ctx: ObjectiveContext) -> None:
        if getattr(ctx.optimizer, "forward_only", False):
            raise SlimtuneError(
                f"objective: spin: optimizer {ctx.optimizer.name} has no graph to train on the "
                "generated pairs in; use a first-order optimizer"
            )
        missing = [i for i, ex in enumerate(ctx.splits.train) if not ex.prompt_ids]
        if missing:
            raise SlimtuneError(
                f"objective: spin needs prompts and answers (data.format alpaca, "
                f"classification or preference); {len(missing)} training examples have no prompt"
            )
        self.ctx, self.mode = ctx, "precomputed"

    def start_of(self, k: int, total: int) -> int:
        """The first step of iteration ``k``."""
        return k * total // self.cfg.iterations

    def on_step_start(self, step: int, total: int, model: nn.Module, run_dir: Path) -> None:
        k = max(i for i in range(self.cfg.iterations) if self.start_of(i, total) <= step)
        if k == self.iteration:
            return
        path = run_dir / "spin" / f"iteration-{k}.jsonl"
        if step > self.start_of(k, total) and path.is_file():  # a resume inside iteration k
            self._load(path)
        else:
            with torch.no_grad(), _eval_mode(model):
                self._generate(model, k)
                precompute(replace(self.ctx, model=model), self.ctx.splits.train)
            if self.ctx.main:
                self._save(path)
        self.iteration = k

    def _generate(self, model: nn.Module, k: int) -> None:
        """Each training example's rejected answer: the model's own continuation of its prompt."""
        ctx, c = self.ctx, self.cfg
        examples = ctx.splits.train
        tok = ctx.tokenizer
        device = next(model.parameters()).device
        stop = [t for t in {tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)}
                if isinstance(t, int)]  # fmt: skip
        limit = max(len(ex.input_ids) for ex in examples)  # what the data fits in
        bar = tqdm(total=len(examples), desc=f"spin: generating (iteration {k})", unit="answer",
                   disable=not ctx.progress, leave=False)  # fmt: skip
        gen = torch.Generator(device=device).manual_seed(1_000_003 * (k + 1))
        for i in range(0, len(examples), ctx.batch_size):
            group = examples[i : i + ctx.batch_size]
            width = max(len(ex.prompt_ids) for ex in group)
            ids = torch.full((len(group), width), ctx.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, ex in enumerate(group):  # left padding: every prompt ends where answers start
                ids[j, width - len(ex.prompt_ids) :] = torch.tensor(ex.prompt_ids)
                mask[j, width - len(ex.prompt_ids) :] = 1
            new = _decode(model, ids.to(device), mask.to(device), c, stop, gen)
            for ex, row in zip(group, new):
                answer = []
                for t in row:
                    answer.append(t)
                    if t in stop:
                        break
                ex.rejected_ids = answer[: max(limit - len(ex.prompt_ids), 1)]
            bar.update(len(group))
        bar.close()

    def _save(self, path: Path) -> None:
        tok = self.ctx.tokenizer
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, ex in enumerate(self.ctx.splits.train):
            answer = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
            rows.append({
                "example": i,
                "prompt": tok.decode(ex.prompt_ids),
                "chosen": tok.decode(answer),
                "rejected": tok.decode(ex.rejected_ids),
                "rejected_ids": ex.rejected_ids,
                "reference": list(ex.reference),
            })  # fmt: skip
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)

    def _load(self, path: Path) -> None:
        examples = self.ctx.splits.train
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        if len(rows) != len(examples):
            raise SlimtuneError(f"{path}: {len(rows)} pairs for {len(examples)} examples")
        for ex, row in zip(examples, rows):
            ex.rejected_ids, ex.reference = row["rejected_ids"], tuple(row["reference"])


def _decode(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    cfg: Any,
    stop: list[int],
    gen: torch.Generator,
) -> list[list[int]]:
    """New tokens per row of a left-padded batch, by whole forwards with a growing sequence
    (any model, peft prompt learning included; no cache, so no cache-format pitfalls)."""
    out: list[list[int]] = [[] for _ in range(len(ids))]
    done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    for _ in range(cfg.max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                       use_cache=False).logits[:, -1].float()  # fmt: skip
        if cfg.sample:
            probs = torch.softmax(logits / cfg.temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
        else:
            nxt = logits.argmax(dim=-1)
        for j, t in enumerate(nxt.tolist()):
            if not done[j]:
                out[j].append(t)
        done |= torch.isin(nxt, torch.tensor(stop, device=ids.device))
        if bool(done.all()):
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
        pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
    return out


# ----------------------------------------------------------------------------------------------
# The reference policy
# ----------------------------------------------------------------------------------------------


def _peft(model: nn.Module) -> nn.Module | None:
    """The peft model below DDP-style wrappers, or None."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model if hasattr(model, "disable_adapter") and hasattr(model, "peft_config") else None


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    peft = _peft(model)
    if peft is None:
        raise SlimtuneError("objective: reference 'adapters' needs a peft adapter model")
    with peft.disable_adapter():
        yield


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def resolve_reference(asked: str, model: nn.Module, method: Any) -> str:
    """The reference the run uses; one line where the asked one cannot serve this method."""
    can_disable = _peft(model) is not None and method.adapters_off_is_base()
    if asked == "auto":
        return "adapters" if can_disable else "precomputed"
    if asked == "adapters" and not can_disable:
        raise SlimtuneError(
            f"objective.reference: adapters: params {method.name!r} "
            + (
                "has no adapters to disable"
                if _peft(model) is None
                else "does not leave the loaded weights as they were (its init changes them)"
            )
            + "; use reference precomputed or copy"
        )
    return asked


def precompute(ctx: ObjectiveContext, examples: list[Any]) -> None:
    """Reference log-probs of every pair, from the model as prepared (before any update), kept
    on the examples (``Example.reference``): collate passes them on with each batch."""
    bar = tqdm(total=len(examples), desc="reference log-probs", unit="pair",
               disable=not ctx.progress, leave=False)  # fmt: skip
    device = next(ctx.model.parameters()).device
    for i in range(0, len(examples), ctx.batch_size):
        group = examples[i : i + ctx.batch_size]
        for ex in group:
            ex.reference = None  # collate must not pass stale ones
        batch = {k: v.to(device) for k, v in collate(group, ctx.pad_id).items()}
        logps, _ = sequence_logps(ctx.model, ctx.head, stacked(batch), ctx.chunk)
        n = len(group)
        for j, ex in enumerate(group):
            ex.reference = (float(logps[j]), float(logps[n + j]))
        bar.update(n)
    bar.close()
