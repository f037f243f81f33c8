"""Where result files live and how they are written and read: whole files only.

    RESULTS/<spec name>/runs/<experiment_id>.parquet      one row per file
    RESULTS/<spec name>/samples/<experiment_id>.parquet   per-sample generations

`RESULTS` is a local path or a pyarrow filesystem URI (`s3://`, `gs://`, ...). Each file
is written under `.staging/` and renamed into place, so readers never see a partial one
(docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import io
import os
import urllib.parse
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from qlora_ray.results import RUN_COLUMNS, RUN_SCHEMA, SAMPLE_SCHEMA, to_table


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
