"""The optimizer step protocol (methods/base.py): an optimizer method owns its step, and the
loop has one step path. A method with a step style of its own, defined here in the test file
with no edit under src/, runs end to end through slimtune.train."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from slimtune import config, registry
from slimtune.errors import SlimtuneError
from slimtune.loop import train
from slimtune.methods.base import OptimizerMethod, StepContext, StepResult, backprop

from .conftest import tiny_recipe


class _SignInBackward(torch.optim.Optimizer):
    """w -= lr * sign(grad), applied by a post-accumulate-grad hook inside backward; the
    gradient is freed at once, so none is ever resident after backward."""

    def __init__(self, params: Any, lr: float):
        super().__init__(params, {"lr": lr})
        self.accumulating = False
        self.applied = 0
        for group in self.param_groups:
            for p in group["params"]:
                p.register_post_accumulate_grad_hook(self._hook(group))

    def _hook(self, group: dict[str, Any]):
        def apply(p: torch.Tensor) -> None:
            if self.accumulating or p.grad is None:
                return
            with torch.no_grad():
                p.add_(torch.sign(p.grad), alpha=-group["lr"])
            p.grad = None
            self.applied += 1

        return apply

    def step(self, closure: Any = None) -> None:  # the hooks did the work
        return None


class SignInBackward(OptimizerMethod):
    """Test-only: sign descent applied inside backward, no gradient norm, no clipping."""

    stateless = True

    @dataclass
    class Config(OptimizerMethod.Config):
        pass

    def build(self, groups: list[dict[str, Any]], model: nn.Module) -> torch.optim.Optimizer:
        return _SignInBackward([p for g in groups for p in g["params"]], self.cfg.lr)

    def check(self, train: Any, world: int) -> None:
        if train.max_grad_norm:
            raise SlimtuneError(
                "optimizer: test-sign: takes no clipping; set train.max_grad_norm=0"
            )

    def step(self, ctx: StepContext) -> StepResult:
        opt = ctx.raw
        loss = backprop(ctx, before=lambda i, last: setattr(opt, "accumulating", not last))
        ctx.guard(loss, None)
        return StepResult(loss, None, {"hooks_applied": opt.applied})


@pytest.fixture
def sign_method():
    registry.load_all()
    registry.register("optimizer", "test-sign")(SignInBackward)
    try:
        yield
    finally:
        registry._REGISTRY["optimizer"].pop("test-sign")


def test_an_optimizer_with_its_own_step_style_runs_through_train(tmp_path, cls_data, sign_method):
    recipe = tiny_recipe(
        cls_data,
        tmp_path / "run",
        optimizer={"name": "test-sign", "lr": 1e-3},
        train={"steps": 3, "batch_size": 2, "grad_accum": 2, "max_grad_norm": 0},
    )
    seen = {}

    def watch(step, model, row):
        if row is None:
            seen["start"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            return
        seen["rows"] = [*seen.get("rows", []), row]
        assert all(p.grad is None for p in model.parameters())  # freed inside backward

    result = train(config.from_dict(recipe), on_step=watch)
    n_params = sum(1 for p in result.model.parameters() if p.requires_grad)
    # one application per parameter per step, only on the last micro-batch of each step
    assert [r["hooks_applied"] for r in seen["rows"]] == [n_params, 2 * n_params, 3 * n_params]
    assert all(r["grad_norm"] is None for r in seen["rows"])
    for n, p in result.model.named_parameters():  # sign steps move every entry by lr a step
        moved = (p.detach() - seen["start"][n]).abs().max().item()
        assert moved == pytest.approx(3e-3, rel=1e-3), n  # 3 steps of 1e-3, float32 adds


def test_the_method_checks_the_loop_settings_before_anything_loads(tmp_path, cls_data, sign_method):
    recipe = tiny_recipe(
        cls_data, tmp_path / "run", optimizer={"name": "test-sign"}, train={"max_grad_norm": 1.0}
    )
    with pytest.raises(SlimtuneError, match="takes no clipping"):
        train(config.from_dict(recipe))
    assert not (tmp_path / "run").exists()
