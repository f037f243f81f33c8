"""`qlora_ray.results.load` / `load_samples`: what a pandas user gets from a results folder."""

from __future__ import annotations

import datetime as dt
import re
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT
from results_factory import GIB, SPEC, failed, grid_rows, row, write_rows

from qlora_ray.results import (
    JOIN_KEY,
    RUN_SCHEMA,
    STATUSES,
    ResultsWarning,
    load,
    load_samples,
)
from qlora_ray.results_io import write_samples


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    return Path(write_rows(str(tmp_path / "results"), grid_rows()))


def _samples(eid: str, name: str) -> list[dict]:
    return [
        {"experiment_id": eid, "name": name, "phase": phase, "index": i, "prompt": f"Headline {i}",
         "reference": "positive", "generated": "positive" if phase == "after" else "the",
         "similarity_score": 0.01 if phase == "after" else 0.4, "label_predicted": "positive",
         "correct": phase == "after"}
        for phase in ("before", "after") for i in range(3)
    ]


def test_load_reads_every_row_with_analysis_friendly_dtypes(spec_dir: Path) -> None:
    df = load(spec_dir)

    assert len(df) == 7 and list(df.columns) == RUN_SCHEMA.names
    assert df[JOIN_KEY].is_unique
    assert isinstance(df["status"].dtype, pd.CategoricalDtype)
    assert list(df["status"].cat.categories) == list(STATUSES)
    # every status is a category even when absent, so counts show the zeros
    assert df["status"].value_counts()["failed"] == 0
    assert isinstance(df["gpu"].dtype, pd.CategoricalDtype)
    assert sorted(df["gpu"].cat.categories) == ["A100-40G", "L4", "T4"]
    assert str(df["started_at"].dtype) == "datetime64[us, UTC]"
    assert df["started_at"].min() == pd.Timestamp("2026-03-01 09:00", tz="UTC")
    assert df["lora_r"].dtype == "Int32" and df["peak_memory_bytes"].dtype == "Int64"
    assert df["similarity_score"].dtype == "Float64" and df["double_quant"].dtype == "boolean"


def test_failed_rows_keep_their_config_and_have_na_metrics(spec_dir: Path) -> None:
    df = load(spec_dir).set_index("name")

    oom = df.loc["lora16-r8-bs4-T4"]
    assert oom["status"] == "oom" and oom["quant_bits"] == 16 and oom["lora_r"] == 8
    assert oom["peak_memory_bytes"] is pd.NA and oom["similarity_score"] is pd.NA
    # an integer column holding an NA stays integer (not float with NaN)
    assert df["batch_size"].dtype == "Int32"
    assert df.loc["lora16-r8-bs4-A100-40G", "peak_memory_bytes"] == 12 * GIB


def test_load_accepts_the_spec_folder_or_its_runs_folder(spec_dir: Path) -> None:
    assert load(spec_dir / "runs")[JOIN_KEY].tolist() == load(str(spec_dir))[JOIN_KEY].tolist()


def test_load_of_a_missing_folder_says_what_it_expected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="RESULTS/<spec name>"):
        load(tmp_path / "nope")


def test_corrupt_and_foreign_files_are_reported_and_the_rest_loads(spec_dir: Path) -> None:
    runs = spec_dir / "runs"
    (runs / "truncated.parquet").write_bytes(b"PAR1 this is not a parquet file")
    pq.write_table(pa.table({"city": ["Oslo"], "temp": [3.5]}), runs / "weather.parquet")

    with pytest.warns(ResultsWarning) as caught:
        df = load(spec_dir)

    assert len(df) == 7
    messages = [str(w.message) for w in caught]
    assert any("truncated.parquet" in m for m in messages)
    assert any("weather.parquet" in m and "not a qlora-ray file" in m for m in messages)


def test_an_empty_results_folder_loads_as_an_empty_frame_with_the_same_dtypes(tmp_path: Path) -> None:
    (tmp_path / SPEC / "runs").mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = load(tmp_path / SPEC)
    assert df.empty and list(df.columns) == RUN_SCHEMA.names
    assert isinstance(df["status"].dtype, pd.CategoricalDtype) and df["lora_r"].dtype == "Int32"


def test_cpu_runs_without_a_gpu_have_na_in_the_gpu_categorical(tmp_path: Path) -> None:
    spec = write_rows(str(tmp_path), [
        row("cpu-r4", gpu=None, device="cpu", device_name="cpu", memory_source="cpu_rss"),
        failed("cpu-r8", "failed", "ValueError: boom", gpu=None, lora_r=8),
    ])
    df = load(spec)
    assert df["gpu"].isna().all() and list(df["gpu"].cat.categories) == []
    assert df.groupby("status", observed=True).size().to_dict() == {"ok": 1, "failed": 1}


def test_samples_join_to_runs_on_experiment_id(tmp_path: Path) -> None:
    results = str(tmp_path / "results")
    spec = write_rows(results, grid_rows())
    runs = load(spec)
    ok = runs[runs["status"] == "ok"].iloc[0]
    write_samples(results, SPEC, ok["experiment_id"], _samples(ok["experiment_id"], ok["name"]))

    samples = load_samples(spec)
    assert len(samples) == 6
    assert list(samples["phase"].cat.categories) == ["before", "after"]
    assert samples["correct"].dtype == "boolean" and samples["index"].dtype == "Int32"
    joined = samples.merge(runs[[JOIN_KEY, "gpu", "lora_r"]], on=JOIN_KEY)
    assert len(joined) == 6 and set(joined["gpu"]) == {ok["gpu"]}
    # the runs/ folder or the samples/ folder itself find the same samples
    assert len(load_samples(Path(spec) / "runs")) == 6 and len(load_samples(Path(spec) / "samples")) == 6


def test_a_spec_folder_without_samples_gives_an_empty_samples_frame(spec_dir: Path) -> None:
    samples = load_samples(spec_dir)
    assert samples.empty and JOIN_KEY in samples.columns


def test_a_foreign_samples_file_is_reported(tmp_path: Path) -> None:
    results = str(tmp_path / "results")
    spec = write_rows(results, grid_rows()[:1])
    eid = load(spec)[JOIN_KEY].iloc[0]
    write_samples(results, SPEC, eid, _samples(eid, "x"))
    pq.write_table(pa.table({"a": [1]}), Path(spec) / "samples" / "other.parquet")
    with pytest.warns(ResultsWarning, match="other.parquet"):
        assert len(load_samples(spec)) == 6


def test_rows_written_by_an_older_version_load_with_new_columns_as_na(tmp_path: Path) -> None:
    runs = tmp_path / SPEC / "runs"
    runs.mkdir(parents=True)
    old = {"experiment_id": "abc123abc123", "name": "old", "status": "ok", "lora_r": 8,
           "started_at": dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)}
    pq.write_table(pa.Table.from_pylist([old]), runs / "abc123abc123.parquet")
    df = load(tmp_path / SPEC)
    assert df.loc[0, "lora_r"] == 8 and df.loc[0, "f1"] is pd.NA
    assert df.loc[0, "started_at"] == pd.Timestamp("2025-01-01", tz="UTC")


# ---------------------------------------------------------------------------------------
# docs/analysis.md: its snippets run as written, and DuckDB / Polars read the same files

DOC = ROOT / "docs" / "analysis.md"
OTHER_ENGINES = ("import duckdb", "import polars")


def doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


@pytest.fixture
def analysis_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """results/rank-vs-gpu in the working directory, as the doc's RESULTS says."""
    monkeypatch.chdir(tmp_path)
    spec = Path(write_rows("results", grid_rows()))
    for r in grid_rows():
        if r["status"] == "ok":
            write_samples("results", SPEC, r["experiment_id"], _samples(r["experiment_id"], r["name"]))
    # what a driver killed mid-write leaves behind: the doc's globs must not pick it up
    (spec / ".staging").mkdir(exist_ok=True)
    (spec / ".staging" / "5e1f-0123456789ab.parquet").write_bytes(b"PAR1\x15\x00")
    return spec


def run_doc(blocks: list[str]) -> dict:
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    return namespace


def test_analysis_doc_pandas_snippets_answer_the_questions(
    analysis_results: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = run_doc([b for b in doc_blocks() if not any(e in b for e in OTHER_ENGINES)])

    assert set(ns["best"]["name"]) == {"qlora-r16-bs2-T4", "qlora-r8-bs2-L4", "qlora-r8-bs4-A100-40G"}
    (pair,) = ns["pairs"].to_dict("records")  # only the A100 r8 bs4 cell ran in both 4 and 16 bits
    assert pair["saved_gib"] == pytest.approx(6.0) and pair["4bit_over_16bit"] == pytest.approx(0.5)
    cheapest = ns["priced"].sort_values("usd_per_point").iloc[0]
    assert cheapest["name"] == "qlora-r16-bs2-T4"  # 1:15:53 at $0.35/h for 37.6 points
    assert len(ns["after"]) == 5 * 3
    assert "unschedulable" in capsys.readouterr().out
    # plain pandas skips the dot-file too
    assert len(pd.read_parquet(analysis_results / "runs")) == 7


@pytest.mark.parametrize("engine", ["duckdb", "polars"])
def test_duckdb_and_polars_read_the_same_rows_as_load(
    engine: str, analysis_results: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip(engine)
    blocks = doc_blocks()
    run_doc([blocks[0], *(b for b in blocks if f"import {engine}" in b)])  # the doc's own snippet runs
    assert "A100-40G" in capsys.readouterr().out

    pattern = str(analysis_results / "runs" / "*.parquet")
    if engine == "duckdb":
        import duckdb

        other = duckdb.sql(f"SELECT * FROM read_parquet('{pattern}', union_by_name = true)").df()
    else:
        import polars as pl

        other = pl.read_parquet(pattern, missing_columns="insert").to_pandas()
    ours = load(analysis_results)
    assert sorted(other[JOIN_KEY]) == sorted(ours[JOIN_KEY])
    assert list(other.columns) == list(ours.columns)
    assert other["peak_memory_bytes"].sum() == ours["peak_memory_bytes"].sum()
    assert sorted(other["status"]) == sorted(ours["status"].astype(str))
