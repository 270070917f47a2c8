"""The planner prices the length a recipe's batches really pad to (plan/lengths.py)."""

from __future__ import annotations

import json

import yaml

from slimtune import config
from slimtune.data import Batches, load_splits
from slimtune.models import tiny_tokenizer
from slimtune.plan import workload_for
from slimtune.plan.lengths import run_seq

from .conftest import tiny_recipe


def _cfg(cls_data, tmp_path, **sections):
    return config.from_dict(tiny_recipe(cls_data, tmp_path / "run", **sections))


def _lengths(cfg):
    return [len(ex.input_ids) for ex in load_splits(cfg.data, tiny_tokenizer()).train]


def test_a_run_over_an_epoch_is_priced_at_its_longest_tokenised_example(cls_data, tmp_path):
    cfg = _cfg(cls_data, tmp_path)  # 12 training examples, 4 steps of 4: every one is drawn
    longest = max(_lengths(cfg))
    assert longest < cfg.data.max_seq_len
    work = workload_for(cfg)
    assert work.seq == longest
    assert work.seq_source == f"the longest training example (max_seq_len {cfg.data.max_seq_len})"
    # longer examples are shortened to max_seq_len, so that caps it
    capped = _cfg(cls_data, tmp_path, data={"max_seq_len": longest - 3})
    assert workload_for(capped).seq == longest - 3


def test_a_short_run_is_priced_at_the_widest_batch_it_draws(cls_data, tmp_path):
    cfg = _cfg(cls_data, tmp_path, train={"steps": 2, "batch_size": 2})
    splits = load_splits(cfg.data, tiny_tokenizer())
    batches = Batches(splits.train, 2, cfg.train.seed, 0, 1)  # what the loop draws
    widths = [batches.next(0)["input_ids"].shape[1] for _ in range(2)]
    choice = run_seq(cfg)
    assert choice.seq == max(widths) and "widest batch of the run's 2 steps" in choice.why
    assert f"longest example {max(_lengths(cfg))}" in choice.why
    # grad_accum draws more micro-batches per step; --batch replays with its own batch size
    accum = _cfg(cls_data, tmp_path, train={"steps": 2, "batch_size": 2, "grad_accum": 3})
    more = Batches(splits.train, 2, cfg.train.seed, 0, 1)
    assert run_seq(accum).seq == max(more.next(0)["input_ids"].shape[1] for _ in range(6))
    assert run_seq(cfg, batch=6).seq == max(_lengths(cfg))  # 2 x 6 = all 12 examples


def test_without_readable_data_or_with_seq_given_the_old_pricing_stays(cls_data, tmp_path):
    missing = config.load(None, ["data.path=nowhere.jsonl", "data.max_seq_len=64"])
    work = workload_for(missing)
    assert work.seq == 64 and work.seq_source.startswith("data.max_seq_len (data not read:")
    cfg = _cfg(cls_data, tmp_path)
    assert workload_for(cfg, seq=100).seq == 100  # --seq wins, and no data is read
    assert workload_for(cfg, read_data=False).seq == cfg.data.max_seq_len


def test_plan_cli_names_the_length_it_priced(cls_data, tmp_path, capsys):
    from slimtune.cli import main

    cfg = _cfg(cls_data, tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(cls_data, tmp_path / "run")))
    longest = max(_lengths(cfg))
    # the recipe's data and tokenizer (tiny-llama), priced on a real architecture
    assert main(["plan", str(recipe), "--model", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert f"batch 4 x seq {longest}," in out
    assert f"\nseq {longest}: the longest training example (max_seq_len 512)\n" in out
    assert main(["plan", str(recipe), "--model", "smollm2-135m", "--json"]) == 0
    (b,) = json.loads(capsys.readouterr().out)
    assert b["workload"]["seq"] == longest
    assert main(["plan", str(recipe), "--model", "smollm2-135m", "--seq", "77"]) == 0
    out = capsys.readouterr().out
    assert "batch 4 x seq 77," in out and "\nseq 77:" not in out  # given: priced as given


def test_bench_prices_each_method_as_slimtune_plan_does(cls_data, tmp_path, monkeypatch):
    from slimtune import bench, plan

    known = plan.shape_for("smollm2-135m")  # the tiny model has no bundled shape to price
    monkeypatch.setattr(plan, "shape_for", lambda name: known)
    cfg = _cfg(cls_data, tmp_path, params={"name": "lora", "r": 2})
    predicted = bench._predict(cfg)
    assert predicted.work.seq == workload_for(cfg).seq == max(_lengths(cfg))
