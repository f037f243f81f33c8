"""datacheck: local dataset files read without torch, the rows a run trains on, checked once.

The broken-file messages are in tests/test_bad_input.py; this file covers what the reader
returns for good files and how the check is wired into `plan` and `run`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import DATA, ROOT

from qlora_ray import datacheck
from qlora_ray.cli import main as cli_main
from qlora_ray.config import ExperimentConfig, from_dict
from qlora_ray.grid import expand

ROWS = [json.loads(line) for line in DATA.read_text().splitlines()][:20]


def test_every_format_gives_the_same_rows(tmp_path: Path) -> None:
    import pandas as pd

    (tmp_path / "d.json").write_text(json.dumps(ROWS, indent=1))
    columns = {k: [r[k] for r in ROWS] for k in ROWS[0]}
    (tmp_path / "cols.json").write_text(json.dumps(columns))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    pd.DataFrame(ROWS).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    with_bom = tmp_path / "bom.jsonl"
    with_bom.write_bytes(b"\xef\xbb\xbf" + "\n\n".join(json.dumps(r) for r in ROWS).encode())
    for name in ("d.json", "cols.json", "lines.json", "d.csv", "d.parquet", "bom.jsonl"):
        assert datacheck.read_rows(tmp_path / name) == ROWS, name


def test_csv_keeps_text_as_written_and_empty_cells_are_null(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\n"Say ""hi"", twice",,007\n"multi\nline",x,1.50\n')
    assert datacheck.read_rows(path) == [
        {"instruction": 'Say "hi", twice', "input": None, "output": "007"},
        {"instruction": "multi\nline", "input": "x", "output": "1.50"},
    ]


def test_the_worker_trains_on_the_rows_the_check_read(tmp_path: Path) -> None:
    from qlora_ray.data import load_rows

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = from_dict(ExperimentConfig, {"dataset": {"path": str(path), "eval_size": 2}})
    assert load_rows(cfg.dataset) == datacheck.check_dataset(cfg.dataset).rows == ROWS


def test_rows_with_a_null_answer_are_counted_and_noted_by_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [{**r, "output": None} if i % 5 == 0 else r for i, r in enumerate(ROWS)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = datacheck.check_dataset(from_dict(ExperimentConfig, {"dataset": {"path": str(path),
                                                                            "eval_size": 2}}).dataset)
    assert (found.usable, found.dropped) == (16, 4)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "n", "base": {"dataset": {"path": str(path), "eval_size": 2}}}))
    assert cli_main(["plan", str(spec)]) == 0
    assert f"note: {path}: 4 of 20 rows have a null or empty 'output' and will be dropped" in capsys.readouterr().out


def test_a_grid_reads_each_file_once_and_reports_a_bad_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    bad.write_text("not json\n")
    reads: list[str] = []
    real = datacheck._read
    monkeypatch.setattr(datacheck, "_read", lambda path, key: reads.append(path) or real(path, key))
    spec = expand({"name": "g", "grid": {"dataset.path": [str(good), str(bad)], "dataset.eval_size": [2, 3],
                                         "lora.r": [4, 8]}})
    with pytest.raises(datacheck.ConfigError) as err:
        datacheck.check_spec_datasets(spec)
    assert sorted(reads) == [str(bad), str(good)]
    assert err.value.problems == [f"`{bad}:1` is not valid JSON (Expecting value at column 1), got 'not json'; "
                                  'write one JSON object per line, e.g. {"instruction": "...", "output": "..."}']


def test_hub_names_and_folders_are_left_to_the_worker(tmp_path: Path) -> None:
    assert not datacheck.is_local("org/some-dataset")
    assert not datacheck.is_local(str(tmp_path))
    assert datacheck.is_local("data/missing.jsonl") and datacheck.is_local("./x")
    spec = expand({"name": "h", "base": {"dataset": {"path": "org/some-dataset"}}})
    assert datacheck.check_spec_datasets(spec) == []


def test_checking_imports_neither_torch_nor_datasets() -> None:
    code = ("import sys; from qlora_ray.grid import load_spec; from qlora_ray.datacheck import "
            "check_spec_datasets; check_spec_datasets(load_spec('experiments/quickstart.yaml')); "
            "print(sorted(m for m in ('torch', 'datasets', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
