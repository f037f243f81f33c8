"""Results as pandas DataFrames: `load(path)` (one row per experiment), `load_samples(path)`.

Users import both from `qlora_ray.results`; docs/analysis.md shows what to do with them.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from qlora_ray.results import JOIN_KEY, SAMPLE_SCHEMA, STATUSES, ResultsWarning
from qlora_ray.results_io import read_folder, read_runs_table, resolve


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


def runs_folder(path: str) -> str:
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
    table, bad = read_runs_table(runs_folder(os.fspath(path)))
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
