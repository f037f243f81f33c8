"""A Hugging Face token in the environment never ends up in anything qlora-ray writes.

A canary `HF_TOKEN` is set for a whole quickstart-style run on the embedded Ray (one cell
that trains, one whose fixed hub embedder cannot be loaded, so an error message is made
with the token in the environment), a `plan` that fails on a hub model, and the report.
Then every file under the test's folder (rows, samples, report.*, PNGs, the embedded Ray's
session logs, the private HOME and TMPDIR) and every line printed is searched for it,
Parquet files decoded (their pages may be compressed).

Starts Ray: run under the machine's Ray lock (`flock /tmp/qlora-ray-ray.lock pytest ...`).
"""

from __future__ import annotations

import os
import secrets
import string
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import BIN, DATA

pytestmark = pytest.mark.slow
CANARY = "hf_" + "".join(secrets.choice(string.ascii_letters) for _ in range(34))


def leaks(folder: Path, needle: str) -> list[str]:
    """Files under `folder` holding `needle`: raw bytes, and every value of Parquet files."""
    found = []
    for path in folder.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        if needle.encode() in data:
            found.append(str(path))
        elif path.suffix == ".parquet" and needle in repr(pq.read_table(path).to_pylist()):
            found.append(f"{path} (decoded)")
    return found


def test_a_canary_hf_token_appears_in_no_row_sample_log_report_or_message(tmp_path: Path, ray_tmp: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "HF_TOKEN": CANARY,
        "HF_HUB_OFFLINE": "1",  # no network here; the hub loads fail fast, with their messages
        "HOME": str(home),
        "RAY_TMPDIR": str(ray_tmp),
        "TMPDIR": str(ray_tmp),
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    spec = tmp_path / "canary.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "canary",
        "base": {
            "model": "builtin:tiny-llama",
            "dataset": {"path": str(DATA), "eval_size": 8},
            "quant": {"bits": 4, "compute_dtype": "float32"},
            "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
            "train": {"max_steps": 2, "batch_size": 2, "optim": "adamw_torch",
                      "gradient_checkpointing": False, "save_adapter": True},
            "eval": {"max_new_tokens": 2, "max_samples": 4},
        },
        "runs": [{"name": "qlora"},
                 {"name": "hub-embedder", "eval.similarity.embedder": "example-org/private-embedder"}],
    }))
    gated = tmp_path / "gated.yaml"
    gated.write_text(yaml.safe_dump({"name": "gated", "base": {
        "model": "example-org/gated-model", "dataset": str(DATA)}}))
    results = tmp_path / "results"

    def qlora_ray(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "qlora-ray"), *args], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)

    run = qlora_ray("run", str(spec), "--results", str(results), "--num-cpus", "2")
    assert run.returncode == 1, run.stdout + run.stderr  # the hub-embedder cell fails, as meant
    assert "hub-embedder: failed" in run.stdout and "qlora: ok" in run.stdout, run.stdout + run.stderr
    plan = qlora_ray("plan", str(gated))
    assert plan.returncode == 2 and "example-org/gated-model" in plan.stderr
    report = qlora_ray("report", str(results / "canary"))
    assert report.returncode == 0, report.stderr

    # what was written is what the scan covers
    import pandas as pd

    rows = pd.read_parquet(results / "canary" / "runs").set_index("name")
    assert rows.loc["qlora", "status"] == "ok" and rows.loc["hub-embedder", "status"] == "failed"
    assert not rows["trust_remote_code"].any()  # off unless asked for, and recorded
    assert rows.loc["hub-embedder", "error"].startswith("OSError")  # a message made with the token set
    assert len(pd.read_parquet(results / "canary" / "samples")) > 0
    assert (results / "canary" / "report.html").is_file()
    assert list((results / "canary" / "adapters").iterdir())
    assert list(ray_tmp.rglob("*.log")) or list(ray_tmp.rglob("*.out")), "no Ray logs to search"

    printed = {f"{name} {stream}": text for name, proc in (("run", run), ("plan", plan), ("report", report))
               for stream, text in (("stdout", proc.stdout), ("stderr", proc.stderr))}
    assert [k for k, text in printed.items() if CANARY in text] == []
    assert leaks(tmp_path, CANARY) + leaks(ray_tmp, CANARY) == []
