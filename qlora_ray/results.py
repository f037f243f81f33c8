"""The result row: its columns (the contract), how a config becomes them, and readers.

`RUN_COLUMNS` / `SAMPLE_COLUMNS` fix every column's type, so files from any run or version
concatenate. Files: `results_io.py` (where rows live, written atomically); pandas:
`load` and `load_samples` (in `results_load.py`, importable from here).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from qlora_ray import provenance
from qlora_ray.config import ExperimentConfig, to_dict

STATUSES = ("ok", "oom", "failed", "unschedulable", "skipped")
TIMESTAMP = pa.timestamp("us", tz="UTC")

# name -> type. Order is the column order in every file.
RUN_COLUMNS: dict[str, pa.DataType] = {
    # identity and outcome
    "experiment_id": pa.string(),
    "name": pa.string(),
    "spec_name": pa.string(),
    "status": pa.string(),
    "error": pa.string(),
    "error_phase": pa.string(),
    "attempt": pa.int32(),
    # the flattened config (flatten, below)
    "gpu": pa.string(),
    "model": pa.string(),
    "model_revision": pa.string(),
    "attn_implementation": pa.string(),
    "trust_remote_code": pa.bool_(),  # whether the model's own code from the hub ran
    "dataset": pa.string(),
    "quant_bits": pa.int32(),
    "quant_type": pa.string(),
    "double_quant": pa.bool_(),
    "compute_dtype": pa.string(),
    "compute_dtype_requested": pa.string(),
    "lora_r": pa.int32(),
    "lora_alpha": pa.float64(),
    "lora_dropout": pa.float64(),
    "lora_target_modules": pa.string(),
    "use_rslora": pa.bool_(),
    "use_dora": pa.bool_(),
    "batch_size": pa.int32(),
    "batch_size_requested": pa.string(),
    "grad_accum": pa.int32(),
    "epochs": pa.float64(),
    "max_steps": pa.int32(),
    "learning_rate": pa.float64(),
    "lr_scheduler": pa.string(),
    "max_seq_len": pa.int32(),
    "optim": pa.string(),
    "optim_effective": pa.string(),
    "gradient_checkpointing": pa.bool_(),
    "seed": pa.int32(),
    "packing": pa.bool_(),
    "batching": pa.string(),  # padded, length_grouped, padding_free or packed (batching, below)
    "eval_max_new_tokens": pa.int32(),
    "embedder": pa.string(),
    "embedder_revision": pa.string(),  # the fixed embedder's commit (as pinned, or as resolved)
    "emulate_profile": pa.bool_(),
    "config_json": pa.string(),
    # where it ran
    "device": pa.string(),
    "device_name": pa.string(),
    "device_total_memory_bytes": pa.int64(),
    "cpu_fallback": pa.bool_(),
    "num_threads": pa.int32(),
    "cuda_visible_devices": pa.string(),  # what Ray (or docker --gpus) exposed to the task
    "worker_pid": pa.int64(),
    # training
    "train_seconds": pa.float64(),
    "train_steps": pa.int32(),  # optimizer steps: packing makes fewer, fuller ones per epoch
    "train_examples": pa.int32(),  # training rows (examples) per epoch
    "train_sequences": pa.int32(),  # sequences they became (fewer than examples when packed)
    "train_tokens": pa.int64(),
    "tokens_per_second": pa.float64(),
    "train_loss": pa.float64(),
    "train_loss_first": pa.float64(),
    "train_loss_last": pa.float64(),
    "trainable_params": pa.int64(),
    "total_params": pa.int64(),
    # memory (docs/memory.md, "What a row measures"): peak_memory_bytes and the peak_cuda_*,
    # peak_nvml_*, peak_rss_* columns are the training phase, from memory_source;
    # peak_train/eval_* are each phase as the card saw it (CUDA: + context, + paged state)
    "peak_memory_bytes": pa.int64(),
    "memory_source": pa.string(),
    "peak_cuda_allocated_bytes": pa.int64(),
    "peak_cuda_reserved_bytes": pa.int64(),
    "peak_nvml_bytes": pa.int64(),
    "nvml_memory_scope": pa.string(),  # "process", or "device" where NVML cannot see our PID
    "peak_rss_bytes": pa.int64(),
    "peak_train_bytes": pa.int64(),
    "peak_eval_bytes": pa.int64(),
    "peak_eval_before_bytes": pa.int64(),
    "cuda_context_bytes": pa.int64(),
    "paged_optimizer_bytes": pa.int64(),
    "emulated_cap_bytes": pa.int64(),  # emulate_profile: the allocator's cap
    "backoff_steps": pa.int32(),  # OOM back-off steps taken before the run that made this row
    "predicted_peak_bytes": pa.int64(),
    # time and cost: the planner's prediction (timing.TimePrediction) and the price it used
    "predicted_tokens_per_second": pa.float64(),
    "predicted_seconds": pa.float64(),  # training; compare with train_seconds
    "predicted_eval_seconds": pa.float64(),
    "predicted_gpu_seconds": pa.float64(),  # the whole cell; compare with finished - started
    "predicted_usd": pa.float64(),
    "usd_per_hour": pa.float64(),
    "predicted_train_tokens": pa.int64(),
    "predicted_steps": pa.int32(),
    "time_efficiency": pa.float64(),
    "time_calibration": pa.string(),
    # the planner's predictions (training and eval peaks as the card sees them, with ranges)
    "predicted_train_bytes": pa.int64(),
    "predicted_eval_bytes": pa.int64(),
    "predicted_train_low_bytes": pa.int64(),
    "predicted_train_high_bytes": pa.int64(),
    "predicted_eval_low_bytes": pa.int64(),
    "predicted_eval_high_bytes": pa.int64(),
    "predicted_tight": pa.bool_(),
    "predicted_train_seq": pa.int32(),
    "predicted_lengths": pa.string(),
    "model_family": pa.string(),
    "memory_correction": pa.float64(),
    # evaluation
    "similarity_score": pa.float64(),
    "similarity_score_before": pa.float64(),
    "accuracy": pa.float64(),
    "accuracy_before": pa.float64(),
    "accuracy_majority": pa.float64(),  # always answering the eval split's most common label
    "f1": pa.float64(),
    "f1_before": pa.float64(),
    "eval_loss": pa.float64(),
    "eval_loss_before": pa.float64(),
    "eval_samples": pa.int32(),
    "labels": pa.string(),
    "labels_note": pa.string(),  # why there is no label set (eval.labels: auto on free text)
    "eval_seconds": pa.float64(),
    # where a cell's time went outside training and evaluation (docs/performance.md, item 2)
    "process_start_seconds": pa.float64(),  # the task starting -> the experiment's process running it
    "preloaded": pa.bool_(),  # that process started with torch and transformers already imported
    "setup_seconds": pa.float64(),  # device, dtype, imports the process did not have
    "data_seconds": pa.float64(),  # tokenizer and data (from the cache when data_cached)
    "data_cached": pa.bool_(),
    "load_seconds": pa.float64(),  # weights, k-bit preparation, adapters, the Trainer
    "eval_before_seconds": pa.float64(),
    "adapter_path": pa.string(),
    # provenance
    "qlora_ray_version": pa.string(),
    "python_version": pa.string(),
    "torch_version": pa.string(),
    "transformers_version": pa.string(),
    "peft_version": pa.string(),
    "bitsandbytes_version": pa.string(),
    "accelerate_version": pa.string(),
    "datasets_version": pa.string(),
    "ray_version": pa.string(),
    "cuda_version": pa.string(),
    "git_commit": pa.string(),
    "image": pa.string(),
    "hostname": pa.string(),
    "ray_node_id": pa.string(),
    "ray_task_id": pa.string(),  # `ray logs task --id` shows the cell's log (its first line names it)
    "started_at": TIMESTAMP,
    "finished_at": TIMESTAMP,
}
RUN_SCHEMA = pa.schema([pa.field(k, t) for k, t in RUN_COLUMNS.items()])

SAMPLE_COLUMNS: dict[str, pa.DataType] = {
    "experiment_id": pa.string(),
    "name": pa.string(),
    "phase": pa.string(),  # "before" or "after" training
    "index": pa.int32(),
    "prompt": pa.string(),
    "reference": pa.string(),
    "generated": pa.string(),
    "similarity_score": pa.float64(),
    "label_predicted": pa.string(),
    "correct": pa.bool_(),
}
SAMPLE_SCHEMA = pa.schema([pa.field(k, t) for k, t in SAMPLE_COLUMNS.items()])


def empty_row() -> dict[str, Any]:
    """A row with every contract column present and null."""
    return dict.fromkeys(RUN_COLUMNS)


def make_row(
    cfg: Any, experiment_id: str, spec_name: str, attempt: int, predicted_peak_bytes: int | None,
    **columns: Any,
) -> dict[str, Any]:
    """The one place a run row is assembled: the contract's columns, the flattened config,
    identity, provenance, then what the run measured (`columns`, which may override the
    config's values, e.g. the batch size an OOM back-off settled on)."""
    row = empty_row()
    row.update(flatten(cfg))
    row.update(provenance.collect(cuda_version=columns.get("cuda_version")))
    row.update(experiment_id=experiment_id, spec_name=spec_name, attempt=attempt,
               predicted_peak_bytes=predicted_peak_bytes)
    row.update(columns)
    return row


def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows -> table with exactly `schema`; unknown keys are an error, missing ones null."""
    names = set(schema.names)
    for row in rows:
        extra = set(row) - names
        if extra:
            raise KeyError(f"result row has columns outside the schema: {sorted(extra)}")
    return pa.Table.from_pylist([{k: row.get(k) for k in schema.names} for row in rows], schema=schema)


# The column that joins runs to samples (and a rerun's row to the cell it replaces).
JOIN_KEY = "experiment_id"


class ResultsWarning(UserWarning):
    """A file in a results folder was skipped (corrupt, foreign, or of another schema)."""


def flatten(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config columns of a result row (names are part of the results contract)."""
    lora_targets = cfg.lora.target_modules
    return {
        "experiment_id": cfg.experiment_id,
        "name": cfg.name,
        "gpu": cfg.gpu,
        "model": cfg.model.name,
        "model_revision": cfg.model.revision,
        "attn_implementation": cfg.model.attn_implementation,
        "trust_remote_code": cfg.model.trust_remote_code,
        "dataset": cfg.dataset.path,
        "quant_bits": cfg.quant.bits,
        "quant_type": cfg.quant.type if cfg.quant.bits == 4 else None,
        "double_quant": cfg.quant.double_quant if cfg.quant.bits == 4 else None,
        "compute_dtype_requested": cfg.quant.compute_dtype,
        "lora_r": cfg.lora.r,
        "lora_alpha": float(cfg.lora.alpha),
        "lora_dropout": cfg.lora.dropout,
        "lora_target_modules": lora_targets if isinstance(lora_targets, str) else ",".join(lora_targets),
        "use_rslora": cfg.lora.use_rslora,
        "use_dora": cfg.lora.use_dora,
        "batch_size_requested": str(cfg.train.batch_size),
        "grad_accum": cfg.train.grad_accum,
        "epochs": float(cfg.train.epochs),
        "max_steps": cfg.train.max_steps,
        "learning_rate": cfg.train.learning_rate,
        "lr_scheduler": cfg.train.lr_scheduler,
        "max_seq_len": cfg.train.max_seq_len,
        "optim": cfg.train.optim,
        "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "seed": cfg.train.seed,
        "packing": cfg.dataset.packing,
        "batching": batching(cfg),
        "eval_max_new_tokens": cfg.eval.max_new_tokens,
        "embedder": cfg.eval.similarity.embedder,
        "embedder_revision": cfg.eval.similarity.revision,
        "emulate_profile": cfg.emulate_profile,
        "config_json": json.dumps(to_dict(cfg), sort_keys=True),
    }


def batching(cfg: ExperimentConfig) -> str:
    """How a cell's training batches are made: `padded` (random rows, each batch padded to its
    longest; the default), `length_grouped` (train.group_by_length), `padding_free`
    (train.padding_free: the same batches without padding) or `packed` (dataset.packing)."""
    if cfg.dataset.packing:
        return "packed"
    if cfg.train.padding_free:
        return "padding_free"
    return "length_grouped" if cfg.train.group_by_length else "padded"


def __getattr__(name: str) -> Any:
    # `from qlora_ray.results import load` is the documented way in; the pandas readers live
    # in results_load, imported on first use (the driver and workers never need pandas).
    if name in ("load", "load_samples"):
        from qlora_ray import results_load

        return getattr(results_load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
