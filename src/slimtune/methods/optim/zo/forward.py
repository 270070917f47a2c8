"""The forward that returns one loss per stacked copy of the batch.

The output head goes through ``loss.py``'s chunked cross-entropy (at most ``chunk`` x vocab
logits at once); a perturbed output head (tied or trainable) is processed a block of vocabulary
rows at a time with an online log-sum-exp, so no perturbed copy of the whole head exists.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from ....data import IGNORE
from ....loss import Head, _chunk_logps, _innermost, chunked_ce, model_inputs, no_logits
from .noise import PerturbedTensor
from .perturbation import Pass, Perturber, Unstackable

HEAD_BLOCK = 4096  # vocabulary rows per block of the output head
LOGITS = Head(None)  # cross-entropy of logit rows (the model's own logits)


class SegmentForward:
    """``forward(batch, spec)``: summed next-token cross-entropy of each stacked copy of the
    batch (one per entry of ``spec.scales``), under the current perturbation; for a dual pass,
    [loss, directional derivative]."""

    def __init__(self, model: nn.Module, head: Head, perturber: Perturber, chunk: int):
        self.model, self.head, self.perturber, self.chunk = model, head, perturber, chunk
        self.stack = True  # False once the model turned out not to allow stacked copies
        inner = _innermost(model)
        self.decoder = getattr(inner, inner.base_model_prefix, None)
        m = head.module
        self.blocked = (
            type(m) is nn.Linear
            and m.bias is None
            and id(m.weight) in perturber.by_id
            and self.decoder is not None
        )

    objective: Any = None  # a preference objective: pair losses instead of cross-entropy

    def __call__(self, batch: dict[str, torch.Tensor], spec: Pass) -> torch.Tensor:
        k = 1 if spec.dual else len(spec.scales)
        if self.objective is not None:
            return self._pairs(batch, spec, k)
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        targets = labels[keep]
        if self.head.module is None or self.decoder is None:  # the model's own logits
            outs = self._outputs(batch, spec, k, logits=True)
            rows = [o[:, -labels.shape[1] - 1 : -1][keep] for o in outs]
            # One chunk, as before the logits were chunked: the same sum, bit for bit.
            out = torch.stack([chunked_ce(LOGITS, r, targets, None) for r in rows])
            return self._finish(out, spec)
        outs = self._outputs(batch, spec, k, logits=False)
        # [:, -T:]: prompt tuning prepends its virtual tokens
        rows = [o[:, -labels.shape[1] - 1 : -1][keep] for o in outs]
        t = self.perturber.by_id.get(id(self.head.module.weight)) if self.blocked else None
        if t is not None and id(t.param) in spec.active:
            out = self._blocked(rows, targets, t, spec)
        else:
            out = torch.stack([self._chunked(r, targets, spec, j) for j, r in enumerate(rows)])
        return self._finish(out, spec)

    def _pairs(self, batch: dict[str, torch.Tensor], spec: Pass, k: int) -> torch.Tensor:
        """A preference objective's summed pair losses for each stacked copy: chosen and
        rejected sequences in one forward, each sequence's log-probability of its answer from
        the chunked head (under copy j's perturbation where the head is perturbed)."""
        from ...objective.preference import pair_logps, stacked

        both = stacked(batch)
        labels = both["labels"][:, 1:]
        keep = labels != IGNORE
        targets = labels[keep]
        own = self.head.module is None or self.decoder is None
        head = LOGITS if own else self.head
        out = []
        for j, o in enumerate(self._outputs(both, spec, k, logits=own)):
            rows = o[:, -labels.shape[1] - 1 : -1][keep]
            prev, spec.segment = spec.segment, j  # a perturbed head module uses copy j's scale
            try:
                step = self.chunk or max(len(targets), 1)
                per_token = torch.cat(
                    [rows.new_zeros(0, dtype=torch.float32)]
                    + [_chunk_logps(head, rows[i : i + step], targets[i : i + step])
                       for i in range(0, len(targets), step)]
                )  # fmt: skip
            finally:
                spec.segment = prev
            p = pair_logps(per_token, keep)
            losses, logged = self.objective.pair_losses(self.model, head, batch, self.chunk, p)
            self.objective.record(p, logged)
            out.append(losses.sum())
        return torch.stack(out)

    def _outputs(self, batch, spec: Pass, k: int, logits: bool) -> list[torch.Tensor]:
        """Final hidden states (or logits) of each copy: one forward of the batch stacked k
        times, or, for a model that computes something once for the whole batch (peft prompt
        tuning embeds its virtual tokens once), one forward per copy."""
        inputs = model_inputs(batch)
        if self.stack and k > 1:
            try:
                out = self._run({n: t.repeat(k, 1) for n, t in inputs.items()}, logits)
                return list(out.chunk(k))
            except Unstackable:
                self.stack = False
        outs = []
        for j in range(k):
            prev, spec.segment = spec.segment, j
            try:
                outs.append(self._run(inputs, logits))
            finally:
                spec.segment = prev
        return outs

    def _run(self, inputs: dict[str, torch.Tensor], logits: bool) -> torch.Tensor:
        if logits:
            return self.model(**inputs, use_cache=False).logits
        captured: list[torch.Tensor] = []
        hook = self.decoder.register_forward_hook(lambda m, a, o: captured.append(o[0]))
        try:
            self.model(
                **inputs,
                logits_to_keep=no_logits(inputs["input_ids"].device),
                use_cache=False,
            )
        finally:
            hook.remove()
        return captured[-1]

    @staticmethod
    def _finish(out: torch.Tensor, spec: Pass) -> torch.Tensor:
        if spec.dual:
            primal, tangent = fwAD.unpack_dual(out[0])
            return torch.stack(
                [primal, tangent if tangent is not None else torch.zeros_like(primal)]
            )
        return out

    def _chunked(
        self, rows: torch.Tensor, targets: torch.Tensor, spec: Pass, j: int
    ) -> torch.Tensor:
        prev, spec.segment = spec.segment, j  # a perturbed head module uses copy j's scale
        try:
            return chunked_ce(self.head, rows, targets, self.chunk)
        finally:
            spec.segment = prev

    def _blocked(
        self, rows: list[torch.Tensor], targets: torch.Tensor, t: PerturbedTensor, spec: Pass
    ) -> torch.Tensor:
        """Cross-entropy through a perturbed output head, a block of vocabulary rows at a time
        (online log-sum-exp), so that no perturbed copy of the whole head exists."""
        w = t.param.detach()
        vocab, width = w.shape
        cap = self.head.softcap
        k = len(rows)
        top: list[Any] = [None] * k
        total: list[Any] = [None] * k
        picked: list[Any] = [rows[0].new_zeros(len(targets), dtype=torch.float32) for _ in rows]
        for v0 in range(0, vocab, HEAD_BLOCK):
            v1 = min(vocab, v0 + HEAD_BLOCK)
            wb = w[v0:v1]
            z = self.perturber.z(t, spec.key, v0 * width, (v1 - v0) * width, wb)
            inside = (targets >= v0) & (targets < v1)
            local = (targets - v0).clamp(0, v1 - v0 - 1)[:, None]
            for j in range(k):
                if spec.dual:
                    # a copy: the tangent of a view is allocated the size of the view's whole
                    # storage (the full head) by forward AD, once per vocabulary block
                    wj = fwAD.make_dual(wb.clone(), z.to(wb.dtype))
                elif spec.scales[j] != 0:
                    wj = torch.add(wb.float(), z, alpha=spec.scales[j]).to(wb.dtype)
                else:
                    wj = wb
                logits = (rows[j] @ wj.t()).float()
                if cap:
                    logits = torch.tanh(logits / cap) * cap
                picked[j] = picked[j] + torch.where(inside, logits.gather(1, local).squeeze(1), 0.0)
                m = logits.amax(dim=-1)
                if top[j] is None:
                    top[j], total[j] = m, (logits - m[:, None]).exp().sum(dim=-1)
                else:
                    new = torch.maximum(top[j], m)
                    total[j] = total[j] * (top[j] - new).exp() + (logits - new[:, None]).exp().sum(
                        -1
                    )
                    top[j] = new
        return torch.stack([(top[j] + total[j].log() - picked[j]).sum() for j in range(k)])
