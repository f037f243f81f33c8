"""Result rows as a real run writes them, for the report and loader tests.

Rows go through `qlora_ray.results_io.write_run`, so the files have the real schema and the
real atomic layout. Values are realistic for a 1B-parameter model on the named cards.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

from qlora_ray.results_io import write_run

GIB = 1024**3
SPEC = "rank-vs-gpu"
START = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.timezone.utc)


def row(name: str, **values: Any) -> dict[str, Any]:
    """An `ok` row for a 4-bit nf4 cell; `values` override any column."""
    eid = hashlib.sha256(name.encode()).hexdigest()[:12]
    seconds = values.get("train_seconds", 1800.0)
    base: dict[str, Any] = {
        "experiment_id": eid, "name": name, "spec_name": SPEC, "status": "ok", "error": None,
        "attempt": 1, "gpu": "T4", "model": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "dataset": "experiments/data/fin_sentiment.jsonl", "quant_bits": 4, "quant_type": "nf4",
        "double_quant": True, "compute_dtype": "float16", "compute_dtype_requested": "float16",
        "lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.05,
        "lora_target_modules": "q_proj,k_proj,v_proj,o_proj", "use_rslora": False, "use_dora": False,
        "batch_size": 4, "batch_size_requested": "4", "grad_accum": 1, "epochs": 3.0,
        "learning_rate": 2e-4, "lr_scheduler": "linear", "max_seq_len": 256,
        "optim": "paged_adamw_8bit", "gradient_checkpointing": True, "seed": 0,
        "embedder": "self", "device": "cuda:0", "device_name": "Tesla T4",
        "device_total_memory_bytes": 15360 * 1024**2, "cpu_fallback": False,
        "train_seconds": seconds, "train_steps": 300, "train_tokens": 2_400_000,
        "tokens_per_second": 2_400_000 / seconds if seconds else None, "train_loss": 0.91,
        "peak_memory_bytes": int(4.5 * GIB), "memory_source": "cuda_reserved",
        "peak_cuda_allocated_bytes": int(4.1 * GIB), "peak_cuda_reserved_bytes": int(4.5 * GIB),
        "predicted_peak_bytes": int(4.95 * GIB),
        "similarity_score": 0.040, "similarity_score_before": 0.412,
        "accuracy": 0.81, "accuracy_before": 0.33, "f1": 0.79, "f1_before": 0.21,
        "accuracy_majority": 0.34, "train_examples": 336, "train_sequences": 336,
        "eval_loss": 0.84, "eval_samples": 64, "labels": "negative,neutral,positive",
        "qlora_ray_version": "0.1.0", "python_version": "3.11.9", "torch_version": "2.8.0",
        "git_commit": "5fb6629", "image": "ghcr.io/example/qlora-ray:0.1.0",
        "started_at": START, "finished_at": START + dt.timedelta(seconds=(seconds or 0) + 120),
    }
    base.update(values)
    return base


def failed(name: str, status: str, error: str, **values: Any) -> dict[str, Any]:
    """A non-ok row as the worker / scheduler writes it: config kept, metrics null."""
    nulls = dict.fromkeys([
        "train_seconds", "train_steps", "train_tokens", "tokens_per_second", "train_loss",
        "peak_memory_bytes", "memory_source", "peak_cuda_allocated_bytes", "peak_cuda_reserved_bytes",
        "similarity_score", "similarity_score_before", "accuracy", "accuracy_before", "f1",
        "f1_before", "accuracy_majority", "eval_loss", "eval_samples", "labels", "finished_at",
    ])
    return row(name, status=status, error=error, **{**nulls, **values})


def grid_rows() -> list[dict[str, Any]]:
    """A small grid: a 16-bit baseline, 4-bit and 8-bit cells on three cards, failures."""
    return [
        # the baseline: LoRA in 16 bits on the big card
        row("lora16-r8-bs4-A100-40G", gpu="A100-40G", device_name="NVIDIA A100-SXM4-40GB",
            quant_bits=16, quant_type=None, double_quant=None, compute_dtype="bfloat16",
            train_seconds=1431.0, peak_memory_bytes=12 * GIB, predicted_peak_bytes=int(11.4 * GIB),
            similarity_score=0.037, similarity_score_before=0.412),
        row("qlora-r8-bs4-A100-40G", gpu="A100-40G", device_name="NVIDIA A100-SXM4-40GB",
            compute_dtype="bfloat16", train_seconds=1700.0, peak_memory_bytes=6 * GIB,
            predicted_peak_bytes=int(6.6 * GIB), similarity_score=0.036),
        row("qlora-r8-bs2-L4", gpu="L4", device_name="NVIDIA L4", compute_dtype="bfloat16",
            batch_size=2, batch_size_requested="2", grad_accum=2,
            train_seconds=3332.0, peak_memory_bytes=3 * GIB, predicted_peak_bytes=int(2.7 * GIB),
            similarity_score=0.042),
        row("qlora-r16-bs2-T4", lora_r=16, batch_size=2, batch_size_requested="2",
            train_seconds=4553.0, peak_memory_bytes=int(4.8 * GIB),
            predicted_peak_bytes=int(4.95 * GIB), similarity_score=0.036),
        row("int8-r8-bs2-T4", quant_bits=8, quant_type=None, double_quant=None, batch_size=2,
            batch_size_requested="2", train_seconds=5000.0, peak_memory_bytes=8 * GIB,
            predicted_peak_bytes=8 * GIB, similarity_score=0.050),
        failed("lora16-r8-bs4-T4", "oom",
               "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (at train.py:88 in train)",
               quant_bits=16, quant_type=None, double_quant=None, error_phase="train",
               predicted_peak_bytes=int(16.2 * GIB)),
        failed("qlora-r64-bs16-T4", "unschedulable",
               "predicted 19.3 GiB does not fit on T4 (15.0 GiB); lower train.batch_size",
               lora_r=64, batch_size=16, batch_size_requested="16", predicted_peak_bytes=int(19.3 * GIB),
               started_at=None, device=None, device_name=None),
    ]


def write_rows(results: str, rows: list[dict[str, Any]], spec: str = SPEC) -> str:
    """Write each row through the real writer; returns RESULTS/<spec>."""
    for r in rows:
        write_run(results, spec, r)
    return f"{results}/{spec}"
