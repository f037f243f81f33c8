"""The throughput model against published training-speed measurements (issue 12).

    .venv/bin/python benchmarks/throughput_points.py [--json]

Each point is a published tokens/s figure with the settings its authors ran, read at the
source (docs/time.md has the table and the links). For each it prints the published
figure, the model's prediction with the shipped efficiency factor, the error, and the
efficiency factor that point alone would imply; then the factor fitted on all points (the
geometric mean, i.e. the least-squares fit of log time), which is what
`throughput.DEFAULT_GPU_EFFICIENCY` holds. Pure arithmetic: no GPU is needed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "fixtures" / "configs"
sys.path.insert(0, str(ROOT))

from qlora_ray.config import ExperimentConfig, from_dict, set_dotted  # noqa: E402
from qlora_ray.memory import Recipe, architecture  # noqa: E402
from qlora_ray.profiles import get_profile  # noqa: E402
from qlora_ray.throughput import (  # noqa: E402
    DEFAULT_GPU_EFFICIENCY,
    hardware,
    optimizer_step,
    seconds,
    train_microbatch,
)

# Published figures must be matched within this (issue 12's acceptance).
TOLERANCE = 0.25


@dataclass(frozen=True)
class Point:
    label: str
    source: str
    model: str  # hub id, read from tests/fixtures/configs/<hub id>/config.json
    gpu: str
    settings: dict[str, Any]  # dotted config keys
    seq_len: float  # tokens per sequence the GPU computes (padded length)
    published: float  # tokens per second
    recipe: Recipe = field(default_factory=Recipe)
    why: str = ""


POINTS = [
    Point(
        "LLaMA-Factory, Llama-2-7B QLoRA 4-bit (HF)",
        "github.com/hiyouga/LLaMA-Factory/wiki/Performance-comparison (2023-12, edited 2024-04-15)",
        "meta-llama/Llama-2-7b-hf", "A100-40G",
        {"quant.bits": 4, "quant.compute_dtype": "bfloat16", "lora.r": 8, "lora.dropout": 0.0,
         "lora.target_modules": "all-linear", "train.batch_size": 4, "train.grad_accum": 2,
         "train.max_seq_len": 1024, "train.gradient_checkpointing": True,
         "train.optim": "adamw_torch", "model.attn_implementation": "sdpa"},
        seq_len=1024, published=2415,
        # LLaMA-Factory (v0.4, Dec 2023) does not call PEFT's prepare_model_for_kbit_training:
        # norms, embeddings and the residual stream stay in the compute dtype.
        recipe=Recipe(kbit_upcast=False),
        why="batch 4 x accumulation 2, rank 8 on all linear layers, cutoff 1024 (taken as full "
            "sequences), LLaMA-Factory defaults: checkpointing on, dropout 0, nf4 + double "
            "quantization, bf16, SDPA attention (transformers 4.36 default); the wiki's other "
            "tables name an A100 40GB",
    ),
    Point(
        "LLaMA-Factory, Llama-2-7B LoRA 16-bit (HF)",
        "github.com/hiyouga/LLaMA-Factory/wiki/Performance-comparison (same table)",
        "meta-llama/Llama-2-7b-hf", "A100-40G",
        {"quant.bits": 16, "quant.compute_dtype": "bfloat16", "lora.r": 8, "lora.dropout": 0.0,
         "lora.target_modules": "all-linear", "train.batch_size": 4, "train.grad_accum": 2,
         "train.max_seq_len": 1024, "train.gradient_checkpointing": True,
         "train.optim": "adamw_torch", "model.attn_implementation": "sdpa"},
        seq_len=1024, published=2392, why="as the 4-bit row, without quantization",
    ),
    Point(
        "LLaMA-Factory, Llama-2-7B LoRA 16-bit (HF + FlashAttention-2)",
        "github.com/hiyouga/LLaMA-Factory/wiki/Performance-comparison (same table)",
        "meta-llama/Llama-2-7b-hf", "A100-40G",
        {"quant.bits": 16, "quant.compute_dtype": "bfloat16", "lora.r": 8, "lora.dropout": 0.0,
         "lora.target_modules": "all-linear", "train.batch_size": 4, "train.grad_accum": 2,
         "train.max_seq_len": 1024, "train.gradient_checkpointing": True,
         "train.optim": "adamw_torch", "model.attn_implementation": "flash_attention_2"},
        seq_len=1024, published=2954, why="as the 16-bit row, with `--flash_attn`",
    ),
    Point(
        "fms-acceleration, Mistral-7B LoRA 16-bit",
        "github.com/foundation-model-stack/fms-acceleration scripts/benchmarks/refs/a100_80gb.csv "
        "(row standard-peft, framework none, 1 GPU, batch 4)",
        "mistralai/Mistral-7B-v0.1", "A100-80G",
        {"quant.bits": 16, "quant.compute_dtype": "bfloat16", "lora.r": 16, "lora.alpha": 16,
         "lora.dropout": 0.1, "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
         "train.batch_size": 4, "train.grad_accum": 1, "train.max_seq_len": 4096,
         "train.gradient_checkpointing": True, "train.optim": "adamw_torch",
         "model.attn_implementation": "flash_attention_2"},
        seq_len=4096, published=3324.155,
        why="alpaca packed to 4096 tokens, batch 4 on one GPU, gradient checkpointing, "
            "FlashAttention-2, model in bf16 without autocast, 100 steps (scenarios.yaml, "
            "defaults.yaml, benchmark.py defaults)",
    ),
    Point(
        "fms-acceleration, Mistral-7B QLoRA 4-bit (bitsandbytes)",
        "github.com/foundation-model-stack/fms-acceleration scripts/benchmarks/refs/a100_80gb.csv "
        "(row baseline-peft-bnb, 1 GPU, batch 4)",
        "mistralai/Mistral-7B-v0.1", "A100-80G",
        {"quant.bits": 4, "quant.compute_dtype": "bfloat16", "lora.r": 16, "lora.alpha": 16,
         "lora.dropout": 0.1, "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
         "train.batch_size": 4, "train.grad_accum": 1, "train.max_seq_len": 4096,
         "train.gradient_checkpointing": True, "train.optim": "adamw_torch",
         "model.attn_implementation": "flash_attention_2"},
        seq_len=4096, published=2903.78,
        why="as the 16-bit row, with nf4 + double quantization, bf16 autocast, and PEFT's "
            "k-bit preparation (TRL's SFTTrainer runs it), which upcasts norms and embeddings "
            "to fp32",
    ),
    Point(
        "PEFT method comparison, Llama-3.2-3B LoRA 16-bit",
        "github.com/huggingface/peft method_comparison/MetaMathQA/results/"
        "lora--llama-3.2-3B-rank32.json (run of 2026-07-15)",
        "meta-llama/Llama-3.2-3B", "L40S",
        {"quant.bits": 16, "quant.compute_dtype": "bfloat16", "lora.r": 32, "lora.alpha": 64,
         "lora.dropout": 0.0, "lora.target_modules": ["q_proj", "v_proj"],
         "train.batch_size": 4, "train.grad_accum": 1, "train.max_seq_len": 768,
         "train.gradient_checkpointing": False, "train.optim": "adamw_torch",
         "model.attn_implementation": "sdpa"},
        # 4,198,051 tokens over 20,000 samples; batches come from length-sorted buckets of 20
        # batches, so padding is small and the mean length stands for the padded one.
        seq_len=4198051 / 20000, published=7174.29,
        why="mean of the 20 logged 'tokens / sec' (non-padding tokens / train time), batch "
            "4, 5,000 steps, bf16 weights without autocast, fp32 adapters, no gradient "
            "checkpointing, SDPA, AdamW",
    ),
]


def cell(point: Point) -> ExperimentConfig:
    data: dict[str, Any] = {"model": {"name": point.model}, "gpu": point.gpu}
    for key, value in point.settings.items():
        set_dotted(data, key, value)
    return from_dict(ExperimentConfig, data)


def predict(point: Point, efficiency: float) -> float:
    """Predicted tokens/s of the point's run (counted as its authors count them)."""
    cfg = cell(point)
    arch = architecture(json.loads((CONFIGS / point.model / "config.json").read_text()))
    profile = get_profile(point.gpu)
    hw = hardware(profile, cfg.quant.compute_dtype)
    assert hw is not None
    bs, ga = int(cfg.train.batch_size), cfg.train.grad_accum
    work = train_microbatch(arch, cfg, profile, batch_size=bs, seq_len=point.seq_len,
                            recipe=point.recipe) * ga + optimizer_step(arch, cfg)
    return bs * ga * point.seq_len / seconds(work, hw, efficiency)


def fitted_efficiency() -> float:
    """The geometric mean of the points' own factors (least squares on log time)."""
    logs = [math.log(p.published / predict(p, 1.0)) for p in POINTS]
    return math.exp(sum(logs) / len(logs))


def table(efficiency: float = DEFAULT_GPU_EFFICIENCY) -> list[dict[str, Any]]:
    rows = []
    for p in POINTS:
        predicted = predict(p, efficiency)
        rows.append({"point": p.label, "gpu": p.gpu, "published": round(p.published),
                     "predicted": round(predicted),
                     "error_pct": round((predicted - p.published) / p.published * 100, 1),
                     "own_efficiency": round(p.published / predict(p, 1.0), 3)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args()
    rows = table()
    fit = fitted_efficiency()
    worst = max(abs(r["error_pct"]) for r in rows)
    if args.json:
        print(json.dumps({"efficiency": DEFAULT_GPU_EFFICIENCY, "fitted": round(fit, 3),
                          "points": rows, "worst_error_pct": worst}, indent=1))
    else:
        print(f"efficiency factor: shipped {DEFAULT_GPU_EFFICIENCY}, fitted on these points {fit:.3f}\n")
        print(f"{'point':<62} {'gpu':<9} {'published':>9} {'predicted':>9} {'error':>7} {'own eff.':>8}")
        for r in rows:
            print(f"{r['point']:<62} {r['gpu']:<9} {r['published']:>9,} {r['predicted']:>9,} "
                  f"{r['error_pct']:>+6.1f}% {r['own_efficiency']:>8.3f}")
        print(f"\nworst error {worst:.1f}% (tolerance {TOLERANCE:.0%})")
    return 0 if worst <= TOLERANCE * 100 else 1


if __name__ == "__main__":
    sys.exit(main())
