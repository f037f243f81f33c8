"""Results on S3: `--results s3://bucket/prefix` keeps the local layout and its guarantees.

On a cluster the head node is disposable, so results go to object storage. These tests
run against a real S3-compatible HTTP server (moto's server mode, in a thread on
127.0.0.1), reached through pyarrow's own S3 filesystem exactly as it reaches AWS: no
mock of pyarrow, no network beyond loopback. Two ways to name the endpoint are covered:

* `AWS_ENDPOINT_URL` in the environment (what users of MinIO, R2, Ceph set; plain
  `s3://bucket/prefix` URIs then work everywhere, `report` included);
* pyarrow's URI query, `s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http`.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest
from conftest import ROOT
from results_factory import SPEC, failed, grid_rows, row

from qlora_ray import results, results_io

pytestmark = pytest.mark.slow  # starts an S3 server (moto's, on 127.0.0.1) for the module

moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the dev extra: pip install -e '.[dev]'")

BUCKET = "qlora-ray-results"
FIXTURE_CONFIGS = ROOT / "tests" / "fixtures" / "configs"

# Dummy credentials and a fixed region: the AWS SDK inside pyarrow must not look for real
# ones (~/.aws, the EC2 metadata endpoint) and must not pause on IMDS time-outs.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """`127.0.0.1:PORT` of a moto S3 server with an empty bucket."""
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_ENDPOINT_URL", "AWS_PROFILE"]}
    os.environ.update(AWS_ENV)
    os.environ.pop("AWS_PROFILE", None)
    # One access-log line per S3 request would drown any failure's output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        admin = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http",
                                  region="us-east-1", allow_bucket_creation=True)
        admin.create_dir(BUCKET)
        yield f"{host}:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_env(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Plain s3:// URIs reach the test server through AWS_ENDPOINT_URL."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{endpoint}")
    return endpoint


def _fs(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1")


def _keys(fs: pafs.FileSystem, prefix: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File)


def _samples(eid: str, name: str) -> list[dict]:
    return [{"experiment_id": eid, "name": name, "phase": phase, "index": i, "prompt": f"headline {i}",
             "reference": "positive", "generated": "positive", "similarity_score": 0.02,
             "label_predicted": "positive", "correct": True}
            for phase in ("before", "after") for i in range(2)]


def test_rows_written_to_s3_read_back_with_every_reader(s3_env: str, request: pytest.FixtureRequest) -> None:
    root = f"s3://{BUCKET}/{request.node.name}"
    rows = grid_rows()
    for r in rows:
        path = results_io.write_run(root, SPEC, r)
        assert path == f"{BUCKET}/{request.node.name}/{SPEC}/runs/{r['experiment_id']}.parquet"
    results_io.write_samples(root, SPEC, rows[0]["experiment_id"], _samples(rows[0]["experiment_id"], rows[0]["name"]))

    # Exactly one whole object per experiment under runs/; the staging copies are gone.
    fs = _fs(s3_env)
    keys = _keys(fs, f"{BUCKET}/{request.node.name}/{SPEC}")
    assert [k for k in keys if k.startswith("runs/")] == sorted(f"runs/{r['experiment_id']}.parquet" for r in rows)
    assert keys == sorted([*(f"runs/{r['experiment_id']}.parquet" for r in rows),
                           f"samples/{rows[0]['experiment_id']}.parquet"])

    # The driver's resume reader, the report's table reader, the pandas helpers.
    by_id = results_io.read_run_rows(root, SPEC)
    assert set(by_id) == {r["experiment_id"] for r in rows}
    assert {by_id[r["experiment_id"]]["status"] for r in rows} == {r["status"] for r in rows}
    table, bad = results_io.read_runs_table(f"{root}/{SPEC}/runs")
    assert bad == [] and table.num_rows == len(rows) and table.schema == results.RUN_SCHEMA
    df = results.load(f"{root}/{SPEC}")
    assert sorted(df["name"]) == sorted(r["name"] for r in rows)
    assert str(df["status"].dtype) == "category" and str(df["peak_memory_bytes"].dtype) == "Int64"
    samples = results.load_samples(f"{root}/{SPEC}")
    assert len(samples) == 4 and set(samples["experiment_id"]) == {rows[0]["experiment_id"]}

    # Plain pandas on the same folder, given pyarrow's filesystem for the bucket.
    plain = pd.read_parquet(f"{BUCKET}/{request.node.name}/{SPEC}/runs", filesystem=fs)
    assert sorted(plain["experiment_id"]) == sorted(r["experiment_id"] for r in rows)
    assert plain.loc[plain["name"] == "qlora-r8-bs2-L4", "peak_memory_bytes"].item() == rows[2]["peak_memory_bytes"]


def test_a_rerun_replaces_the_object_and_a_crashed_write_stays_invisible(
    s3_env: str, request: pytest.FixtureRequest
) -> None:
    root = f"s3://{BUCKET}/{request.node.name}"
    first = failed("qlora-r64-bs8-T4", "oom", "CUDA out of memory")
    results_io.write_run(root, SPEC, first)
    results_io.write_run(root, SPEC, {**first, "status": "ok", "error": None, "attempt": 2,
                                   "peak_memory_bytes": 14 * 2**30})
    # A driver killed mid-write leaves its half object under .staging, never in runs/.
    fs = _fs(s3_env)
    with fs.open_output_stream(f"{BUCKET}/{request.node.name}/{SPEC}/.staging/dead-{first['experiment_id']}.parquet") as f:
        f.write(b"PAR1 truncated")

    rows = results_io.read_run_rows(root, SPEC)
    assert list(rows) == [first["experiment_id"]]
    assert rows[first["experiment_id"]]["status"] == "ok" and rows[first["experiment_id"]]["attempt"] == 2
    df = pd.read_parquet(f"{BUCKET}/{request.node.name}/{SPEC}/runs", filesystem=fs)
    assert len(df) == 1 and df["status"].item() == "ok"


def test_pyarrow_uri_with_endpoint_in_the_query_works_for_the_write_and_resume_path(
    endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    root = f"s3://{BUCKET}/{request.node.name}?endpoint_override={endpoint}&scheme=http&region=us-east-1"
    results_io.write_run(root, SPEC, row("qlora-r8-bs4-T4"))
    assert set(results_io.read_run_rows(root, SPEC)) == {row("qlora-r8-bs4-T4")["experiment_id"]}
    assert _keys(_fs(endpoint), f"{BUCKET}/{request.node.name}/{SPEC}/runs") == [
        f"{row('qlora-r8-bs4-T4')['experiment_id']}.parquet"]


def test_run_writes_its_rows_to_s3_and_a_rerun_keeps_one_object_per_cell(
    s3_env: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    # A 65B model on a T4 fits in no cell, so with --skip-unfit the driver writes a `skipped`
    # row per cell itself: the real `run` path down to the bucket, without starting Ray.
    from qlora_ray.scheduler import run_spec

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("QLORA_RAY_MODEL_CONFIGS", str(FIXTURE_CONFIGS))
    spec = Path(request.getfixturevalue("tmp_path")) / "too-big.yaml"
    spec.write_text(
        "name: too-big\n"
        "base:\n"
        "  model: huggyllama/llama-65b\n"
        "  dataset: {path: experiments/data/fin_sentiment.jsonl, eval_size: 16}\n"
        "  quant: {bits: 4, type: nf4, compute_dtype: float16}\n"
        "  train: {batch_size: 1}\n"
        "grid:\n"
        "  lora.r: [8, 16]\n"
        "  gpu: [T4]\n"
    )
    root = f"s3://{BUCKET}/{request.node.name}"
    prefix = f"{BUCKET}/{request.node.name}/too-big"
    for _ in range(2):
        out = io.StringIO()
        with redirect_stdout(out):
            code = run_spec(str(spec), results=root, skip_unfit=True, out=out)
        assert code == 1, out.getvalue()  # skipped cells are not `ok`
        assert f"-> {root}/too-big/runs/" in out.getvalue()
        df = results.load(f"{root}/too-big")
        assert list(df["status"]) == ["skipped", "skipped"]
        assert df["error"].str.contains("GiB").all(), df["error"].tolist()
        assert _keys(_fs(s3_env), prefix) == sorted(f"runs/{e}.parquet" for e in df["experiment_id"])


def test_report_reads_an_s3_results_folder(s3_env: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    from qlora_ray.cli import main

    root = f"s3://{BUCKET}/{request.node.name}"
    for r in grid_rows():
        results_io.write_run(root, SPEC, r)
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["report", f"{root}/{SPEC}", "--out", str(tmp_path / "report")])
    assert code == 0, out.getvalue()
    assert "qlora-r8-bs2-L4" in out.getvalue()
    assert (tmp_path / "report" / "report.html").is_file()


def test_a_missing_bucket_is_refused_before_anything_starts(
    s3_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from qlora_ray.config import ConfigError
    from qlora_ray.scheduler import run_spec

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("QLORA_RAY_MODEL_CONFIGS", str(FIXTURE_CONFIGS))
    spec = tmp_path / "too-big.yaml"  # every cell skipped: nothing would start Ray even without the check
    spec.write_text("name: too-big\nbase: {model: huggyllama/llama-65b, train: {batch_size: 1},\n"
                    "  dataset: {path: experiments/data/fin_sentiment.jsonl}}\ngrid: {gpu: [T4]}\n")
    with pytest.raises(ConfigError) as e:
        run_spec(str(spec), results="s3://no-such-bucket/qlora-ray", skip_unfit=True)
    message = str(e.value)
    assert "`--results`" in message and "s3://no-such-bucket/qlora-ray" in message
    assert "cannot be written" in message and "bucket exists" in message


CANARY_KEY, CANARY_SECRET = "AKIACANARYKEY0000000", "canary/Secret+0123456789abcdefABCDEF"


def test_credentials_in_the_results_uri_never_reach_the_output_or_the_rows(
    endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # pyarrow takes S3 keys from the URI's user info; moto accepts any keys.
    import urllib.parse

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_ray.scheduler import run_spec
    from qlora_ray.worker import save_adapter

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("QLORA_RAY_MODEL_CONFIGS", str(FIXTURE_CONFIGS))
    secret = urllib.parse.quote(CANARY_SECRET, safe="")
    root = (f"s3://{CANARY_KEY}:{secret}@{BUCKET}/{request.node.name}"
            f"?endpoint_override={endpoint}&scheme=http&region=us-east-1")
    spec = tmp_path / "too-big.yaml"
    spec.write_text("name: too-big\nbase: {model: huggyllama/llama-65b, train: {batch_size: 1},\n"
                    "  dataset: {path: experiments/data/fin_sentiment.jsonl}}\ngrid: {gpu: [T4]}\n")
    out = io.StringIO()
    with redirect_stdout(out):
        assert run_spec(str(spec), results=root, skip_unfit=True, out=out) == 1
    shown = f"s3://{BUCKET}/{request.node.name}?endpoint_override="
    assert shown in out.getvalue()
    # An adapter saved by a worker records where it went, not with which keys.
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2)), LoraConfig(r=2, target_modules=["q_proj"]))
    adapter_path = save_adapter(model, root, "too-big", "0123456789ab")
    assert adapter_path.startswith(shown) and "/too-big/adapters/0123456789ab" in adapter_path

    # `doctor --results` probes the same URI and says where, not with which keys.
    from qlora_ray.doctor import results_check

    check = results_check(root)
    assert check.status == "ok" and check.detail.startswith(shown), check

    written = [*_keys(_fs(endpoint), f"{BUCKET}/{request.node.name}")]
    assert any(k.startswith("too-big/adapters/0123456789ab/") for k in written)
    rows = pd.read_parquet(f"{BUCKET}/{request.node.name}/too-big/runs", filesystem=_fs(endpoint))
    assert list(rows.status) == ["skipped"]
    for text in [out.getvalue(), adapter_path, str(check), *(str(v) for v in rows.to_numpy().ravel())]:
        for canary in (CANARY_KEY, CANARY_SECRET, secret):
            assert canary not in text
