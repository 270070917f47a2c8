"""FedAvg (McMahan et al., 2017, https://arxiv.org/abs/1602.05629): every client starts from
the global trainable state and sends its own back; the server takes the average weighted by
examples. LoRA pairs of heterogeneous ranks merge exactly (``aggregate.aggregate_lora``); with
``compress: compeft`` a client sends its update's top entries as sign bits (ComPEFT)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ...registry import register
from .. import aggregate as agg
from . import Local, Strategy, numpy_nbytes, to_numpy, to_torch


@register("strategy", "fedavg")
class FedAvg(Strategy):
    heterogeneous_ranks = True
    compression = True

    def load(self, model, opt, method, local: Local) -> None:
        state = {n: to_torch(local.arrays[n]) for n in local.arrays}
        info = lora_info(self.cfg)
        if info is not None and local.budget is not None:
            r, theta0 = local.params.r, local.theta0
            pairs = agg.lora_pairs(list(state))
            ref = agg.lora_scale(info[0], int(local.conf["ref_rank"]), info[1])
            mine = agg.lora_scale(info[0], r, info[1])
            view = agg.client_view(state, pairs, r, mine, ref)
            for a_name, b_name in pairs:  # slots the global state lacks: own fresh init
                have = view[a_name].shape[0]
                if have < r:
                    view[a_name] = torch.cat([view[a_name], theta0[a_name][have:]])
                    view[b_name] = torch.cat([view[b_name], theta0[b_name][:, have:]], 1)
            state = view
        method.load_trainable_state(model, state)

    def upload(self, start, end, local):
        if self.f.compress == "compeft":
            deltas = {n: t.float() - start[n].float() for n, t in end.items()}
            # What the dense update would weigh as compress=none sends it (bf16 as fp32).
            raw = sum(numpy_nbytes(t) for t in end.values())
            return agg.compeft_pack(deltas, self.f.compeft_density), {"raw_bytes": raw}
        return {n: to_numpy(t) for n, t in end.items()}, {}

    # --- server ----------------------------------------------------------------------------
    def start(self, server) -> None:
        server.state = {n: t.clone() for n, t in server.theta0.items()}

    def payload(self, server, rnd, node, conf):
        return {n: to_numpy(t) for n, t in server.state.items()}, conf

    def _expected(self, server, metrics: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """Shapes of a reply: the global ones, with LoRA pairs at the client's rank."""
        shapes = {n: tuple(t.shape) for n, t in server.theta0.items()}
        if server.info is not None:
            r = int(metrics.get("rank", server.ref_rank))
            for a_name, b_name in agg.lora_pairs(list(shapes)):
                shapes[a_name] = (r, shapes[a_name][1])
                shapes[b_name] = (shapes[b_name][0], r)
        return shapes

    def decode(self, server, arrays, metrics):
        shapes = self._expected(server, metrics)
        if self.f.compress == "compeft":
            try:
                deltas = agg.compeft_unpack(arrays, shapes)
            except ValueError as e:
                return None, f"undecodable ComPEFT update: {e}"
            state = {n: server.state[n].float() + d for n, d in deltas.items()}
        else:
            state = {n: to_torch(a) for n, a in arrays.items()}
        return state, agg.check_update(state, server.theta0, shapes)

    def aggregate(self, server, rnd, updates, weights) -> None:
        states = [d for d, _ in updates]
        if server.info is not None:
            alpha, rs = server.info
            scales = [agg.lora_scale(alpha, int(m["rank"]), rs) for _, m in updates]
            ref = agg.lora_scale(alpha, server.ref_rank, rs)
            server.state, pairs = agg.aggregate_lora(
                states, weights, scales, ref, self.f.lora_aggregation
            )
            server.rank = server.state[pairs[0][0]].shape[0] if pairs else server.rank
        else:
            server.state = agg.fedavg(states, weights)

    def sync(self, server) -> None:
        state = server.state
        if server.info is not None:
            pairs = agg.lora_pairs(list(state))
            if pairs and server.rank != getattr(server.method.cfg, "r", server.rank):
                params = dataclasses.replace(self.cfg.params, r=server.rank)
                server.build(dataclasses.replace(self.cfg, params=params))
            alpha, rs = server.info
            scale = agg.lora_scale(alpha, server.rank, rs)
            ref = agg.lora_scale(alpha, server.ref_rank, rs)
            state = agg.client_view(state, pairs, server.rank, scale, ref)
        server.method.load_trainable_state(server.model, state)


def lora_info(cfg) -> tuple[float, bool] | None:
    """(alpha, rslora) when the params method is LoRA-like (has a rank), else None."""
    p = cfg.params
    if hasattr(p, "r") and hasattr(p, "alpha"):
        return float(p.alpha), bool(getattr(p, "rslora", False))
    return None
