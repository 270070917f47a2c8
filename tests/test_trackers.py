"""train.report_to: accelerate's trackers. A missing one is refused in one line before anything
is written (tests/test_bad_input.py); an installed one receives the run's metrics."""

from __future__ import annotations

from slimtune import config
from slimtune.loop import train

from .conftest import tiny_recipe


def test_tensorboard_writes_event_files_with_the_run_metrics(tmp_path, cls_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_recipe(
        cls_data, tmp_path / "run", train={"steps": 3, "report_to": ["tensorboard"]}
    )
    train(config.from_dict(recipe))
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in (tmp_path / "run").rglob("*"))
    assert events[0].relative_to(tmp_path / "run").parts[0] == "slimtune"  # as the README says
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3]
    tags = acc.Tags()["scalars"]
    assert "lr" in tags and "eval/accuracy" in tags  # held-out metrics apart from training's
