"""The result-row schema, atomic one-file-per-experiment writes, and readers.

Layout (the contract):

    RESULTS/<spec name>/runs/<experiment_id>.parquet      one row per file
    RESULTS/<spec name>/samples/<experiment_id>.parquet   per-sample generations

`RESULTS` is a local path or any pyarrow filesystem URI (`file://`, `s3://`, `gs://`).
Files are written to `RESULTS/<spec name>/.staging/` and then renamed into place, so
`runs/` and `samples/` only ever hold whole files: pandas, DuckDB and Polars can glob
`runs/*.parquet` at any time, and a driver killed mid-write leaves its debris in
`.staging/`, which no reader looks at.

The explicit schema keeps every file's column types identical, whatever a given run
filled in, so files from different runs and versions always concatenate.
"""

from __future__ import annotations

import contextlib
import io
import os
import urllib.parse
import uuid
import warnings
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from qlora_ray import provenance
from qlora_ray.config import flatten

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
    # the flattened config (config.flatten)
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
    "batching": pa.string(),  # padded, length_grouped or packed (config.batching)
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


# ---------------------------------------------------------------------------------------
# locations


def resolve(results: str) -> tuple[pafs.FileSystem, str]:
    """A local path or a URI -> (filesystem, base path inside it)."""
    if "://" in results:
        fs, path = pafs.FileSystem.from_uri(results)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(results)


# Query options of a URI that carry a secret (pyarrow reads S3 keys from the URI's user
# info; these names cover its and other stores' credential options).
_SECRET_OPTIONS = ("key", "secret", "token", "password", "credential", "signature")


def redact(results: str) -> str:
    """`results` safe to print, log or record: a URI's user info and secret options dropped.

    pyarrow accepts `s3://KEY:SECRET@bucket/prefix`; the driver needs those to write, but
    they must not reach the console, `ray job logs` or a row. Local paths pass unchanged.
    """
    if "://" not in results:
        return results
    parts = urllib.parse.urlsplit(results)
    netloc = parts.netloc.rpartition("@")[2]
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
             if not any(word in k.lower() for word in _SECRET_OPTIONS)]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, urllib.parse.urlencode(query),
                                    parts.fragment))


# About two rows: the probe fails on a disk without room for the first row.
PROBE_BYTES = 64 * 1024


def probe_write(results: str, spec_name: str) -> None:
    """Write a row-sized file where rows will be staged, then delete it; raises if it can't."""
    fs, base = resolve(results)
    staging = f"{base}/{spec_name}/.staging"
    fs.create_dir(staging, recursive=True)
    path = f"{staging}/probe-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(path) as out:
            out.write(b"\0" * PROBE_BYTES)
    finally:
        _delete_if_present(fs, path)


def _write_atomic(fs: pafs.FileSystem, folder: str, filename: str, table: pa.Table) -> str:
    staging = f"{folder.rsplit('/', 1)[0]}/.staging"
    fs.create_dir(folder, recursive=True)
    fs.create_dir(staging, recursive=True)
    final = f"{folder}/{filename}"
    # uuid: writers never share a temp file; the folder's name says what debris was.
    tmp = f"{staging}/{uuid.uuid4().hex}-{folder.rsplit('/', 1)[-1]}-{filename}"
    buf = io.BytesIO()
    pq.write_table(table, buf)
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(buf.getvalue())
    except Exception:
        with contextlib.suppress(Exception):  # a half-written temp file keeps a full disk full
            _delete_if_present(fs, tmp)
        raise
    # On a local disk this is an atomic rename(2) (same filesystem, sibling folder); on
    # object stores the object appears whole at the final key, which is what readers need.
    fs.move(tmp, final)
    return final


def write_run(results: str, spec_name: str, row: dict[str, Any]) -> str:
    """Write one run row to RESULTS/<spec>/runs/<experiment_id>.parquet; returns its path."""
    fs, base = resolve(results)
    table = to_table([row], RUN_SCHEMA)
    return _write_atomic(fs, f"{base}/{spec_name}/runs", f"{row['experiment_id']}.parquet", table)


def write_samples(
    results: str, spec_name: str, experiment_id: str, samples: list[dict[str, Any]]
) -> str | None:
    """Replace an experiment's samples file; with no samples, remove the previous one.

    A retry that produced no samples (a crash before eval, an unschedulable row) must not
    leave the last attempt's generations beside its new row.
    """
    fs, base = resolve(results)
    if not samples:
        _delete_if_present(fs, f"{base}/{spec_name}/samples/{experiment_id}.parquet")
        return None
    table = to_table(samples, SAMPLE_SCHEMA)
    return _write_atomic(fs, f"{base}/{spec_name}/samples", f"{experiment_id}.parquet", table)


def _delete_if_present(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def read_status(results: str, spec_name: str, experiment_id: str) -> str | None:
    """The `status` of the row on disk for one experiment; None if there is no readable one."""
    fs, base = resolve(results)
    path = f"{base}/{spec_name}/runs/{experiment_id}.parquet"
    try:
        with fs.open_input_file(path) as f:
            statuses = pq.read_table(f, columns=["status"]).column("status").to_pylist()
    except (OSError, pa.ArrowException, KeyError):
        return None
    return statuses[0] if statuses else None


def move_experiment(results: str, spec_name: str, row: dict[str, Any], new_id: str) -> dict[str, Any]:
    """File an existing row (and its samples) under another experiment id; returns the new row.

    Samples first, then the run row, then the old files go: a move cut short leaves the
    old row in place (moved again next time) or both rows (the caller drops the old one).
    Adapters stay where they are (`adapter_path` in the row says where).
    """
    fs, base = resolve(results)
    old_id = row["experiment_id"]
    old_samples = f"{base}/{spec_name}/samples/{old_id}.parquet"
    if fs.get_file_info(old_samples).type == pafs.FileType.File:
        with fs.open_input_file(old_samples) as f:
            table = _conform(pq.read_table(f), SAMPLE_SCHEMA)
        table = table.set_column(table.schema.get_field_index("experiment_id"), "experiment_id",
                                 pa.array([new_id] * table.num_rows, pa.string()))
        _write_atomic(fs, f"{base}/{spec_name}/samples", f"{new_id}.parquet", table)
    else:  # no samples of the moved row: none of another attempt may stay beside it
        _delete_if_present(fs, f"{base}/{spec_name}/samples/{new_id}.parquet")
    moved = {k: v for k, v in row.items() if k in RUN_COLUMNS}
    moved["experiment_id"] = new_id
    write_run(results, spec_name, moved)
    remove_experiment(results, spec_name, old_id)
    return moved


def remove_experiment(results: str, spec_name: str, experiment_id: str) -> None:
    """Delete an experiment's samples and run row (in that order: the row is what resume sees)."""
    fs, base = resolve(results)
    _delete_if_present(fs, f"{base}/{spec_name}/samples/{experiment_id}.parquet")
    _delete_if_present(fs, f"{base}/{spec_name}/runs/{experiment_id}.parquet")


def _parquet_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    info = fs.get_file_info(folder)
    if info.type != pafs.FileType.Directory:
        return []
    sel = pafs.FileSelector(folder, recursive=False)
    return sorted(
        i.path for i in fs.get_file_info(sel)
        if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
        and not i.base_name.startswith((".", "_"))
    )


def read_run_rows(
    results: str, spec_name: str, bad: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """experiment_id -> existing row (for resume).

    A file that is not a readable run row is skipped (its cell, if it is one, runs again and
    its new row replaces the file) and described in `bad` when a list is given.
    """
    fs, base = resolve(results)
    rows: dict[str, dict[str, Any]] = {}
    folder = f"{base}/{spec_name}/runs"
    for path in _parquet_files(fs, folder):
        try:
            with fs.open_input_file(path) as f:
                table = pq.read_table(f)
        except (OSError, pa.ArrowException) as e:
            _note(bad, f"{path}: {e}")
            continue
        if not {"experiment_id", "status"} <= set(table.column_names):
            _note(bad, f"{path}: not a qlora-ray run file (no experiment_id or status column)")
            continue
        for row in table.to_pylist():
            if row.get("experiment_id"):
                rows[row["experiment_id"]] = row
    for path in _stray_files(fs, folder):
        _note(bad, f"{path}: not a .parquet file ({STRAY_HINT})")
    return rows


STRAY_HINT = "pandas.read_parquet on the folder fails while it is there: move it elsewhere"


def _note(bad: list[str] | None, message: str) -> None:
    if bad is not None:
        bad.append(message)


def _stray_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    """Files in a runs/samples folder that no Parquet reader would skip and none can read."""
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        return []
    return sorted(
        i.path for i in fs.get_file_info(pafs.FileSelector(folder, recursive=False))
        if not i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_"))
    )


def read_runs_table(folder: str, schema: pa.Schema = RUN_SCHEMA) -> tuple[pa.Table, list[str]]:
    """Every readable run file in `folder` cast to `schema`, plus a message per bad file."""
    return read_folder(folder, schema, required=("experiment_id", "status"), kind="qlora-ray")


def read_folder(
    folder: str, schema: pa.Schema, required: tuple[str, ...], kind: str
) -> tuple[pa.Table, list[str]]:
    """Part files of one kind: the readable ones cast to `schema`, and why the others were not."""
    fs, base = resolve(folder)
    tables: list[pa.Table] = []
    bad: list[str] = []
    for path in _parquet_files(fs, base):
        try:
            with fs.open_input_file(path) as f:
                table = pq.read_table(f)
            missing = [n for n in required if n not in table.column_names]
            if missing:
                bad.append(f"{path}: not a {kind} file (no {', '.join(missing)} column)")
                continue
            tables.append(_conform(table, schema))
        except (OSError, pa.ArrowException) as e:
            bad.append(f"{path}: {e}")
    bad.extend(f"{path}: not a .parquet file ({STRAY_HINT})" for path in _stray_files(fs, base))
    if not tables:
        return schema.empty_table(), bad
    return pa.concat_tables(tables), bad


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Add missing columns as nulls, drop unknown ones, cast to the schema (older files)."""
    cols = []
    for f in schema:
        if f.name in table.column_names:
            cols.append(table.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


# ---------------------------------------------------------------------------------------
# pandas helpers: `load(path)` / `load_samples(path)`.
#
# pandas is imported inside the functions: the driver and the workers import this module
# and should not pay for pandas to write a row.

# The column that joins runs to samples (and a rerun's row to the cell it replaces).
JOIN_KEY = "experiment_id"


class ResultsWarning(UserWarning):
    """A file in a results folder was skipped (corrupt, foreign, or of another schema)."""


def _pandas_dtypes() -> dict[pa.DataType, Any]:
    import pandas as pd

    # Nullable dtypes everywhere, so a missing value is pd.NA in every column, an integer
    # column with an OOM row in it stays integer, and a bool column stays bool.
    return {
        pa.int32(): pd.Int32Dtype(),
        pa.int64(): pd.Int64Dtype(),
        pa.float64(): pd.Float64Dtype(),
        pa.bool_(): pd.BooleanDtype(),
        pa.string(): pd.StringDtype(),
    }


def _to_frame(table: pa.Table, categories: dict[str, list[str] | None]) -> Any:
    """Table -> DataFrame with nullable dtypes; `categories` columns become categoricals.

    A `None` category list means "the sorted values present" (e.g. the GPU names).
    """
    import pandas as pd

    df = table.to_pandas(types_mapper=_pandas_dtypes().get)
    for column, cats in categories.items():
        values = cats if cats is not None else sorted(df[column].dropna().unique())
        df[column] = df[column].astype(pd.CategoricalDtype(list(values)))
    return df


def _warn_bad(bad: list[str]) -> None:
    for message in bad:
        # stacklevel=3: point at the user's load() call, not at this helper.
        warnings.warn(f"skipped {message}", ResultsWarning, stacklevel=3)


def _is_dir(path: str) -> bool:
    fs, base = resolve(path)
    return fs.get_file_info(base).type == pafs.FileType.Directory


def _runs_folder(path: str) -> str:
    """The spec folder (holding `runs/`) or the runs folder itself -> the runs folder."""
    path = str(path).rstrip("/")
    if _is_dir(f"{path}/runs"):
        return f"{path}/runs"
    if _is_dir(path):
        return path
    raise FileNotFoundError(f"no results at {path}: expected RESULTS/<spec name> or its runs/ folder")


def load(path: str | os.PathLike[str]) -> Any:
    """Every run row under `path` as a pandas DataFrame, one row per experiment.

    `path` is `RESULTS/<spec name>` (or its `runs/` folder; a local path or a URI).
    Columns are exactly `RUN_SCHEMA`'s, whatever version wrote each file, with dtypes:
    `status` and `gpu` categorical (`status` always has all of `STATUSES` as categories),
    `started_at`/`finished_at` timezone-aware UTC, numbers and booleans as pandas
    nullable dtypes (`Int32`, `Int64`, `Float64`, `boolean`), text as `string`. Missing
    values are `pd.NA`; an `oom` row keeps its config columns and has NA metrics.

    Join key: `experiment_id` (`JOIN_KEY`) is unique per row here and links to
    `load_samples(path)`.

    A corrupt or foreign `.parquet` file in the folder does not stop the read: it is
    reported with a `ResultsWarning` naming the file, and the other files load.
    """
    table, bad = read_runs_table(_runs_folder(os.fspath(path)))
    _warn_bad(bad)
    return _to_frame(table, {"status": list(STATUSES), "gpu": None})


def _samples_folder(path: str) -> str | None:
    path = str(path).rstrip("/")
    parent, _, leaf = path.rpartition("/")
    for candidate in (f"{path}/samples", f"{parent}/samples" if leaf == "runs" else None):
        if candidate and _is_dir(candidate):
            return candidate
    if _is_dir(path) and leaf == "samples":
        return path
    if _is_dir(path):
        return None  # a spec folder whose runs wrote no samples (yet)
    raise FileNotFoundError(f"no results at {path}: expected RESULTS/<spec name> or its samples/ folder")


def load_samples(path: str | os.PathLike[str]) -> Any:
    """Per-sample generations under `path` (spec folder, its runs/ or samples/ folder).

    One row per (experiment, phase, eval example), columns `SAMPLE_SCHEMA`, `phase`
    categorical (`before`, `after`), nullable dtypes as in `load`. Join to the runs on
    `experiment_id`: `load(p).merge(load_samples(p), on="experiment_id")` (both tables have
    a `name` and a `similarity_score` column, so pass `suffixes=` or select columns first).
    Bad files are reported with a `ResultsWarning`, as in `load`.
    """
    folder = _samples_folder(os.fspath(path))
    table, bad = (SAMPLE_SCHEMA.empty_table(), []) if folder is None else read_folder(
        folder, SAMPLE_SCHEMA, required=(JOIN_KEY,), kind="qlora-ray samples"
    )
    _warn_bad(bad)
    return _to_frame(table, {"phase": ["before", "after"]})
