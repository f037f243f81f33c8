"""What `run` does with the rows already in a results folder (no Ray needed: nothing runs).

"ok rows are always kept" for every path that writes, a retry leaves no stale samples,
files that are not rows are named, and a folder that cannot take rows is refused before
any work starts.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import DATA
from results_factory import failed, row

from qlora_ray.config import ConfigError
from qlora_ray.grid import load_spec
from qlora_ray.results import ResultsWarning, load
from qlora_ray.results_io import redact, write_run, write_samples
from qlora_ray.resume import RowWriter
from qlora_ray.scheduler import run_spec

BASE = {
    "model": "builtin:tiny-llama",
    "dataset": {"path": str(DATA), "eval_size": 8},
    "train": {"max_steps": 2, "batch_size": 2},
}


def spec_file(tmp_path: Path, name: str, **sections) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": BASE, **sections}))
    return path


def samples(eid: str, n: int = 2) -> list[dict]:
    return [{"experiment_id": eid, "name": "x", "phase": "after", "index": i, "prompt": "p",
             "reference": "positive", "generated": "positive", "similarity_score": 0.1,
             "label_predicted": "positive", "correct": True} for i in range(n)]


# --------------------------------------------------------------------------- ok rows are kept


@pytest.fixture
def unfit(tmp_path: Path) -> tuple[Path, str]:
    """A one-cell spec the planner refuses (bf16 on a T4), and the cell's experiment id."""
    path = spec_file(tmp_path, "unfit", grid={"gpu": ["T4"]}, **{"runs": [{"name": "bf16",
                                                                          "quant.compute_dtype": "bfloat16"}]})
    return path, load_spec(path).cells[0].experiment_id


def test_skip_unfit_never_replaces_an_ok_row(tmp_path, unfit, capsys):
    # The cell ran fine under an older planner (or on a card profile since corrected).
    path, eid = unfit
    results = tmp_path / "results"
    write_run(str(results), "unfit", row("bf16", experiment_id=eid, spec_name="unfit"))
    before = (results / "unfit" / "runs" / f"{eid}.parquet").read_bytes()

    assert run_spec(str(path), results=str(results), skip_unfit=True) == 0
    assert "1 already have a row, 0 to run" in capsys.readouterr().out
    assert (results / "unfit" / "runs" / f"{eid}.parquet").read_bytes() == before
    assert list(load(results / "unfit").status) == ["ok"]


def test_skip_unfit_keeps_a_failed_row_unless_retry_failed_is_given(tmp_path, unfit, capsys):
    path, eid = unfit
    results = tmp_path / "results"
    write_run(str(results), "unfit", failed("bf16", "oom", "CUDA out of memory", experiment_id=eid,
                                            spec_name="unfit"))
    run_spec(str(path), results=str(results), skip_unfit=True)
    assert list(load(results / "unfit").status) == ["oom"]
    run_spec(str(path), results=str(results), skip_unfit=True, retry_failed=True)
    df = load(results / "unfit")
    assert list(df.status) == ["skipped"] and "bf16" in df.error[0] and df.attempt[0] == 2


def test_the_row_writer_never_replaces_an_ok_row(tmp_path, capsys):
    # Two drivers on one grid: the second finishes a cell the first already wrote as ok.
    results = str(tmp_path)
    ok = row("cell")
    write_run(results, "s", ok)
    write_samples(results, "s", ok["experiment_id"], samples(ok["experiment_id"], 4))
    writer = RowWriter(results, "s", out=None)
    writer.write(failed("cell", "failed", "WorkerCrashedError"), [])
    assert "kept the ok row of cell" in capsys.readouterr().out
    assert list(load(tmp_path / "s").status) == ["ok"]
    assert len(pd.read_parquet(tmp_path / "s" / "samples")) == 4


def test_a_retry_without_samples_removes_the_previous_attempts_samples(tmp_path):
    results = str(tmp_path)
    first = failed("cell", "failed", "eval crashed", error_phase="eval")
    writer = RowWriter(results, "s", out=None)
    writer.write(first, samples(first["experiment_id"]))  # attempt 1 got as far as the eval
    assert (tmp_path / "s" / "samples" / f"{first['experiment_id']}.parquet").is_file()
    writer.write({**first, "status": "unschedulable", "error": "no node", "attempt": 2}, [])
    assert not (tmp_path / "s" / "samples" / f"{first['experiment_id']}.parquet").exists()
    assert list(load(tmp_path / "s").attempt) == [2]


# --------------------------------------------------------------------------- files that are not rows


def test_stray_and_corrupt_files_are_named_and_every_other_row_is_used(tmp_path, capsys):
    path = spec_file(tmp_path, "two", grid={"lora.r": [4, 8]})
    results = tmp_path / "results"
    runs = results / "two" / "runs"
    for cfg in load_spec(path).cells:
        write_run(str(results), "two", row(cfg.name, experiment_id=cfg.experiment_id, spec_name="two"))
    (runs / "0123456789ab.parquet").write_bytes(b"PAR1 cut short by a full disk")
    (runs / "notes.txt").write_text("r8 looked odd\n")

    assert run_spec(str(path), results=str(results)) == 0
    captured = capsys.readouterr()
    assert "2 already have a row, 0 to run" in captured.out
    assert "0123456789ab.parquet" in captured.err and "notes.txt" in captured.err
    assert "pandas.read_parquet on the folder fails" in captured.err

    with pytest.warns(ResultsWarning) as caught:
        df = load(results / "two")
    assert len(df) == 2
    named = " ".join(str(w.message) for w in caught)
    assert "0123456789ab.parquet" in named and "notes.txt" in named


# --------------------------------------------------------------------------- where rows go


def test_credentials_in_a_results_uri_are_never_shown():
    assert redact("s3://AKIAKEY:s3cr3t@bucket/prefix") == "s3://bucket/prefix"
    assert redact("s3://bucket/p?endpoint_override=h:9000&secret_key=s3cr3t&access_key=AK&scheme=http") == (
        "s3://bucket/p?endpoint_override=h%3A9000&scheme=http")
    assert redact("gs://bucket/prefix") == "gs://bucket/prefix"
    assert redact("/local/results") == "/local/results"


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs: a disk that fills up, or is mounted read-only."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the full-disk tests mount a tmpfs and must run as root on CI")
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_refused_before_anything_starts(tmp_path, tmpfs):
    path = spec_file(tmp_path, "full", grid={"lora.r": [4]})
    (tmpfs / "filler").write_bytes(b"\0" * (255 * 1024))  # what is left cannot hold a row
    with pytest.raises(ConfigError) as e:
        run_spec(str(path), results=str(tmpfs / "results"))
    message = str(e.value)
    assert "`--results`" in message and str(tmpfs / "results") in message
    assert "No space left on device" in message and "the disk is full" in message
    assert not list((tmpfs / "results").rglob("*.parquet"))


def test_a_read_only_results_folder_is_refused_before_anything_starts(tmp_path, tmpfs):
    path = spec_file(tmp_path, "ro", grid={"lora.r": [4]})
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with pytest.raises(ConfigError, match=r"`--results`.*cannot be written.*read-only file system"):
        run_spec(str(path), results=str(tmpfs / "results"))


def test_rows_that_do_not_fit_on_the_disk_are_reported_then_written_by_the_rerun(tmp_path, tmpfs, monkeypatch,
                                                                                 capsys):
    # --skip-unfit rows are written by the driver alone: the write path without Ray.
    import qlora_ray.scheduler as scheduler

    monkeypatch.setattr(scheduler, "FLUSH_TRIES", (0.1,))
    path = spec_file(tmp_path, "fill", grid={"lora.r": [2, 4, 8, 16], "gpu": ["T4"]},
                     **{"runs": [{"name": "bf16", "quant.compute_dtype": "bfloat16"}]})
    results = tmpfs / "results"
    free = os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize
    (tmpfs / "filler").write_bytes(b"\0" * (free - 100 * 1024))  # room for the probe and ~3 rows

    assert run_spec(str(path), results=str(results), skip_unfit=True) == 1
    out = capsys.readouterr().out
    written = sorted(p.stem for p in (results / "fill" / "runs").glob("*.parquet"))
    assert 1 <= len(written) < 4
    assert "could not write the row of" in out and "No space left on device" in out
    assert f"NOT WRITTEN: {4 - len(written)} finished cell(s) could not be written" in out
    assert not list((results / "fill" / ".staging").iterdir())  # no half-written debris left

    (tmpfs / "filler").unlink()
    assert run_spec(str(path), results=str(results), skip_unfit=True) == 1  # skipped is not ok
    assert len(load(results / "fill")) == 4
