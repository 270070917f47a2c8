"""``slimtune bench``: fresh process per method, same data order, report with PNG plots."""

from __future__ import annotations

import json

import matplotlib.image
import pytest
import yaml

from slimtune import bench
from slimtune.cli import main
from slimtune.errors import SlimtuneError

from .conftest import tiny_recipe


def test_method_specs_parse():
    full, lora, zo = bench.parse_methods(["full:optimizer.lr=1e-5", "lora:params.r=2", "mezo"])
    assert (full.params, full.optimizer) == ({"name": "full"}, {"name": "adamw", "lr": 1e-5})
    assert lora.params == {"name": "lora", "r": 2} and lora.optimizer == {"name": "adamw"}
    assert (zo.params, zo.optimizer) == ({"name": "full"}, {"name": "mezo"})
    with pytest.raises(SlimtuneError, match="SECTION.KEY=VALUE"):
        bench.parse_methods(["lora:r=2"])
    with pytest.raises(SlimtuneError, match="listed twice"):
        bench.parse_methods(["lora", "lora"])
    with pytest.raises(SlimtuneError, match="did you mean 'lora'"):
        bench.parse_methods(["lorra"])


def test_a_method_may_change_other_sections(tmp_path, cls_data):
    """``lora:data.packing=true`` and ``lora:objective=NAME;objective.KEY=V`` change that
    method's recipe only (packing against padding, an objective per row)."""
    plain, packed, pref = bench.parse_methods(
        [
            "lora",
            "lora:data.packing=true;train.batch_size=2",
            "lora:objective=dpo;objective.beta=0.2",
        ]
    )
    assert packed.other == {"data": {"packing": True}, "train": {"batch_size": 2}}
    assert pref.other == {"objective": {"name": "dpo", "beta": 0.2}}
    recipe = tiny_recipe(cls_data, tmp_path / "unused")
    _, cfgs, _ = bench._recipes(recipe, [plain, packed], tmp_path / "out")
    assert not cfgs[0].data.packing and cfgs[1].data.packing
    assert cfgs[0].train.batch_size == 4 and cfgs[1].train.batch_size == 2
    assert cfgs[1].data.path == cfgs[0].data.path  # the rest of the section is the recipe's


def test_bench_compares_bases(tmp_path, cls_data):
    """``lora:base=nf4`` runs the recipe's LoRA on another base (its compute dtype holding the
    rest, so the recipe's model.dtype gives way); base options need the base's name."""
    plain, q = bench.parse_methods(["lora", "lora:base=nf4;base.compute_dtype=fp32"])
    assert plain.base is None and q.base == {"name": "nf4", "compute_dtype": "fp32"}
    assert q.label == "lora (base=nf4, compute_dtype=fp32)"
    with pytest.raises(SlimtuneError, match="base options need base=NAME"):
        bench.parse_methods(["lora:base.double_quant=false"])
    recipe = tiny_recipe(
        cls_data, tmp_path / "unused", model={"name": "tiny-llama", "dtype": "fp32"}
    )
    recipe["train"]["steps"] = 2
    _, cfgs, _ = bench._recipes(recipe, [plain, q], tmp_path / "out")
    assert cfgs[0].base.name == "fp32" and cfgs[1].base.name == "nf4"
    assert cfgs[1].base.compute_dtype == "fp32" and cfgs[1].params.name == "lora"


def test_bench_runs_each_method_and_writes_the_report(tmp_path, cls_data):
    recipe = tiny_recipe(cls_data, tmp_path / "unused", eval={"batch_size": 4})
    recipe["train"]["steps"] = 3
    entries = bench.parse_methods(["full", "lora:optimizer.lr=0.01", "mezo"])
    out = tmp_path / "report"
    report = bench.run(recipe, entries, out, gemm_seconds=0.2)
    assert report["gemm_peak_flops"] > 1e8
    for name in ("report.md", "results.json", "loss.png", "memory.png", "speed.png"):
        assert (out / name).is_file(), name
    assert not (out / "runs").exists() or not any((out / "runs").iterdir())  # weights removed
    for name in ("loss.png", "memory.png", "speed.png"):
        img = matplotlib.image.imread(out / name)
        assert img.shape[0] > 300 and img.shape[1] > 500 and img.std() > 0.01  # drawn, not blank
    raw = json.loads((out / "results.json").read_text())
    full, lora, zo = raw["methods"]
    assert [s for s, _ in full["curve"]] == [1, 2, 3]
    # same seed and data order: the first loss (before any update) is the same model on the
    # same batch for full fine-tuning and LoRA (B = 0). LoRA adds exact zeros, but its frozen
    # head takes the fused cross-entropy and full fine-tuning's trainable head autograd's: the
    # same terms in another form, ~1e-7 of a loss of ~5.5 (seen: equal, or 7e-8 relative with
    # ATen's default kernels); rel 1e-5.
    assert full["curve"][0][1] == pytest.approx(lora["curve"][0][1], rel=1e-5)
    assert lora["trainable_params"] < full["trainable_params"]
    # the saved weights: the whole model for full fine-tuning, the fp32 adapter for LoRA
    assert full["artefact_bytes"] > 4 * lora["trainable_params"] > 0
    assert lora["artefact_bytes"] >= 4 * lora["trainable_params"]
    for m in raw["methods"]:
        assert m["peak_bytes"] > 2**20 and m["tokens_per_s"] > 0
        assert m["eval_after"]  # held-out metric after training
    text = (out / "report.md").read_text()
    assert "| full |" in text and "| mezo |" in text and "![loss](loss.png)" in text


def test_bench_cli_errors_are_one_line(tmp_path, cls_data, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(cls_data, tmp_path / "out")))
    assert main(["bench", str(path), "--methods", "lorra", "--out", str(tmp_path / "r")]) == 2
    assert "did you mean 'lora'" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    assert main(["bench", str(path), "--methods", "full", "--out", str(busy)]) == 2
    assert "is not empty" in capsys.readouterr().err
    out = tmp_path / "new"
    assert main(["bench", str(path), "params.r=1", "--methods", "full", "--out", str(out)]) == 2
    assert "give options with the method" in capsys.readouterr().err
    assert main(["bench", str(path), "train.stepz=1", "--methods", "full", "--out", str(out)]) == 2
    assert "unknown key 'stepz'" in capsys.readouterr().err
    assert not out.exists()


def test_fresh_process_runner_returns_the_result_and_its_own_peak(tmp_path):
    """``run_worker``: the spec in, the worker's JSON and the child's own peak RSS out; a failed
    worker is one error with its log's tail."""
    import sys

    script = tmp_path / "worker.py"
    script.write_text(
        "import json, sys\n"
        "spec = json.load(open(sys.argv[-1]))\n"
        "if spec['recipe'].get('fail'):\n"
        "    sys.exit('worker gave up')\n"
        "block = bytearray(64 * 2**20)  # 64 MB, touched: the child's peak RSS is above it\n"
        "json.dump({'echo': spec['recipe']['x']}, open(spec['result'], 'w'))\n"
    )
    cmd = [sys.executable, str(script)]
    res = bench.run_worker(cmd, "toy", {"x": 3}, tmp_path / "ok")
    assert res["echo"] == 3 and res["peak_rss"] > 64 * 2**20 and res["wall_s"] > 0
    with pytest.raises(SlimtuneError, match=r"(?s)toy failed \(log .*log.txt\):\nworker gave up"):
        bench.run_worker(cmd, "toy", {"fail": True}, tmp_path / "bad")


QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_a_method_that_is_the_recipes_own_keeps_the_recipes_options():
    recipe = {
        "params": {"name": "lora", "r": 2, "target_modules": QKVO},
        "optimizer": {"name": "adamw", "lr": 3e-4},
    }
    specs = ["lora", "full", "lora+mezo", "galore", "lora:params.r=4", "adamw", "lisa"]
    got = {e.label: bench.sections(recipe, e) for e in bench.parse_methods(specs)}
    assert got["lora"] == recipe  # the recipe as written, its AdamW included
    assert got["full"] == {"params": {"name": "full"}, "optimizer": {"name": "adamw"}}
    assert got["lisa"]["optimizer"] == {"name": "adamw"}  # no lr chosen for LoRA
    assert got["lora+mezo"] == {"params": recipe["params"], "optimizer": {"name": "mezo"}}
    assert got["galore"] == {"params": {"name": "full"}, "optimizer": {"name": "galore"}}
    assert got["lora (r=4)"]["params"] == {"name": "lora", "r": 4, "target_modules": QKVO}
    assert got["adamw"] == {"params": {"name": "full"}, "optimizer": recipe["optimizer"]}
    # a recipe without the sections: the defaults (full + adamw) are its own
    (e,) = bench.parse_methods(["full"])
    assert bench.sections({}, e) == {"params": {"name": "full"}, "optimizer": {"name": "adamw"}}


def test_progress_rate_counts_the_loops_step_time_only():
    rows = [
        {"step": 1, "step_s": 2.0, "tokens_per_s": 100.0},
        {"step": 2, "step_s": 1.0, "tokens_per_s": 400.0},
    ]
    assert bench.rate(rows, 5) == "1.50 s/step, 200 tokens/s, ETA 4 s"
    assert bench.rate(rows, 2) == "1.50 s/step, 200 tokens/s"


@pytest.mark.parametrize("flag", ["--methods", "--method"])
def test_bench_runs_the_recipes_own_lora_with_either_spelling(tmp_path, cls_data, capsys, flag):
    """``bench recipe.yaml --methods lora`` trains the recipe's LoRA (r 2 on q/k/v/o), not
    LoRA's defaults (r 8 on q/v), and records it; s/step and tokens/s are the loop's."""
    from slimtune.models import tiny_llama

    params = {"name": "lora", "r": 2, "target_modules": QKVO}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(cls_data, tmp_path / "out", params=params)))
    out = tmp_path / "report"
    assert main(["bench", str(path), flag, "lora", "--steps", "1", "--out", str(out)]) == 0
    (m,) = json.loads((out / "results.json").read_text())["methods"]
    model = tiny_llama()
    expected = sum(
        2 * (mod.in_features + mod.out_features)
        for name, mod in model.named_modules()
        if name.rsplit(".", 1)[-1] in QKVO
    )
    assert m["trainable_params"] == expected
    assert m["params"] == params and m["from_recipe"] == ["params", "optimizer"]  # lr 1e-2
    assert m["s_per_step"] == pytest.approx(m["train_seconds"])  # one step
    assert "| s/step |" in (out / "report.md").read_text()


def test_gpu_benchmark_runs_end_to_end_as_a_cpu_dry_run(tmp_path):
    """benchmarks/gpu.py (issue 21's GPU table) on a tiny random model on the CPU: every
    row runs in its own process and lands in the table (the GPU run itself needs a GPU)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu.md"
    args = ["--arch", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch", "1", "--seq", "32"]
    args += ["--steps", "2", "--warmup", "0", "--rows", "lora,peft-trainer,forward"]
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks/gpu.py"), *args, "--work", str(tmp_path)]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = out.read_text()
    for row in ("lora", "peft-trainer", "forward"):
        line = next(x for x in table.splitlines() if x.startswith(f"| {row} |"))
        assert "failed" not in line and "timeout" not in line, line
