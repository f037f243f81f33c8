"""The driver on a real local Ray cluster with logical GPUs: scheduling, failures, resume, jobs.

One cluster for the module: a head node offering 2 logical GPUs tagged T4 and a second
node offering 1 GPU tagged L4. No CUDA exists here, so GPU cells run with
--allow-cpu-fallback, which is exactly what a logical-GPU node is for.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from ray_cluster import BIN, LocalCluster

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

# A cell that trains for two steps: enough to exercise every phase in a few seconds.
FAST_BASE = {
    "model": "builtin:tiny-llama",
    "dataset": {"path": str(ROOT / "experiments/data/fin_sentiment.jsonl"), "eval_size": 8},
    "quant": {"compute_dtype": "float32"},
    "train": {"max_steps": 2, "batch_size": 2, "optim": "adamw_torch", "gradient_checkpointing": False},
    "eval": {"max_new_tokens": 2, "before": False, "max_samples": 4},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("ray"))
    try:
        c.start(num_cpus=2, num_gpus=2, resources={"accelerator_type:T4": 2}, dashboard=True)
        # Labels as Ray sets them on a real L4 node (ray.io/accelerator-type) plus a custom one:
        # the label-selector trial below schedules on them.
        c.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:L4": 1},
                   labels={"ray.io/accelerator-type": "L4", "qlora-ray/gpu-memory-gib": "24"})
        yield c
    finally:
        c.stop()


def write_spec(path: Path, name: str, **sections) -> Path:
    spec = {"name": name, "base": FAST_BASE, **sections}
    path.write_text(yaml.safe_dump(spec))
    return path


def read_runs(results: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(results / name / "runs")


def test_gpu_cells_one_gpu_each_fresh_process_right_node_and_unschedulable(cluster, tmp_path):
    spec = write_spec(tmp_path / "gpus.yaml", "gpus", grid={"gpu": ["T4", "L4", "H100"], "lora.r": [4, 8]})
    results = tmp_path / "results"
    started = time.monotonic()
    proc = cluster.qlora_ray("run", str(spec), "--results", str(results), "--address", cluster.address,
                             "--allow-cpu-fallback", "--unschedulable-timeout", "5")
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the H100 cells are not ok

    df = read_runs(results, "gpus")
    assert len(df) == 6 and df["experiment_id"].is_unique
    by_gpu = df.groupby("gpu")["status"].apply(set).to_dict()
    assert by_gpu == {"T4": {"ok"}, "L4": {"ok"}, "H100": {"unschedulable"}}
    h100 = df[df.gpu == "H100"]
    assert h100["error"].str.contains("no node offers").all()
    assert h100["error"].str.contains("accelerator_type:H100").all()
    assert elapsed < 300  # bounded: the missing card did not hang the grid

    ok = df[df.status == "ok"]
    # each task saw exactly one GPU id, ran on the CPU because the GPUs are logical, and
    # was a fresh process
    assert ok["cuda_visible_devices"].isin(["0", "1"]).all(), ok["cuda_visible_devices"].tolist()
    assert ok["cpu_fallback"].all()
    assert ok["worker_pid"].is_unique
    # T4 cells all ran on the T4 node, L4 cells on the other one
    t4_nodes, l4_nodes = set(ok[ok.gpu == "T4"].ray_node_id), set(ok[ok.gpu == "L4"].ray_node_id)
    assert len(t4_nodes) == 1 and len(l4_nodes) == 1 and t4_nodes != l4_nodes
    # the two T4 cells ran at the same time, on different GPUs
    a, b = ok[ok.gpu == "T4"].sort_values("started_at").itertuples()
    assert a.finished_at > b.started_at, "expected the two T4 cells to overlap (2 T4 GPUs, 2 CPUs)"
    assert a.cuda_visible_devices != b.cuda_visible_devices

    assert "T4-r4" in proc.stdout and "unschedulable" in proc.stdout  # the summary table

    # --retry-failed tries only the cells that are not ok, as a second attempt
    ok_files = {p: p.stat().st_mtime_ns for p in (results / "gpus" / "runs").glob("*.parquet")
                if p.stem in set(ok.experiment_id)}
    again = cluster.qlora_ray("run", str(spec), "--results", str(results), "--address", cluster.address,
                              "--allow-cpu-fallback", "--unschedulable-timeout", "2", "--retry-failed")
    assert "4 already have a row, 2 to run" in again.stdout, again.stdout + again.stderr
    df = read_runs(results, "gpus")
    assert df.set_index("gpu").loc["H100", "attempt"].tolist() == [2, 2]
    assert all(p.stat().st_mtime_ns == m for p, m in ok_files.items())


def test_gpu_cell_without_cuda_is_a_failed_row_by_default(cluster, tmp_path):
    spec = write_spec(tmp_path / "nofallback.yaml", "nofallback", grid={"gpu": ["T4"]})
    results = tmp_path / "results"
    proc = cluster.qlora_ray("run", str(spec), "--results", str(results), "--address", cluster.address)
    assert proc.returncode == 1
    row = read_runs(results, "nofallback").iloc[0]
    assert row.status == "failed" and row.error_phase == "setup"
    assert "torch sees no CUDA device" in row.error and "--allow-cpu-fallback" in row.error


def test_killed_driver_then_rerun_gives_one_row_per_experiment(cluster, tmp_path):
    spec = write_spec(tmp_path / "resume.yaml", "resume", grid={"lora.r": [2, 4, 8, 16]})
    results = tmp_path / "results"
    runs = results / "resume" / "runs"
    args = [str(BIN / "qlora-ray"), "run", str(spec), "--results", str(results),
            "--address", cluster.address, "--max-parallel", "1"]
    driver = subprocess.Popen(args, env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(list(runs.glob("*.parquet"))) < 1:
            time.sleep(0.2)
        assert list(runs.glob("*.parquet")), "no row appeared before the deadline"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    first = {p.name: p.stat().st_mtime_ns for p in runs.glob("*.parquet")}
    assert 1 <= len(first) < 4

    proc = cluster.qlora_ray("run", str(spec), "--results", str(results), "--address", cluster.address)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    df = read_runs(results, "resume")
    assert len(df) == 4 and df["experiment_id"].is_unique and (df.status == "ok").all()
    # finished experiments were not run again: same files, first attempt
    assert all(runs.joinpath(name).stat().st_mtime_ns == mtime for name, mtime in first.items())
    assert (df.attempt == 1).all()
    assert f"{len(first)} already have a row" in proc.stdout

    # and a third run does nothing at all
    again = cluster.qlora_ray("run", str(spec), "--results", str(results), "--address", cluster.address)
    assert again.returncode == 0 and "0 to run" in again.stdout


def test_a_worker_process_that_dies_is_retried(cluster, tmp_path):
    spec = write_spec(tmp_path / "crash.yaml", "crash", runs=[{"name": "victim", "train.max_steps": 60}])
    results = tmp_path / "results"
    args = [str(BIN / "qlora-ray"), "run", str(spec), "--results", str(results), "--address", cluster.address]
    driver = subprocess.Popen(args, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline:
        # Ray titles a task's process `ray::<task name>`; the driver names tasks qlora-ray:<cell>.
        found = subprocess.run(["pgrep", "-f", "ray::qlora-ray:victim"], capture_output=True, text=True).stdout.split()
        if found:
            time.sleep(3)  # let it get into the model load
            killed = int(found[0])
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    output, _ = driver.communicate(timeout=300)
    assert killed is not None, "the task's process never showed up"
    assert driver.returncode == 0, output
    row = read_runs(results, "crash").iloc[0]
    assert row.status == "ok" and row.worker_pid != killed  # a new process ran it again


def test_ctrl_c_stops_cleanly_and_keeps_written_rows(cluster, tmp_path):
    spec = write_spec(tmp_path / "sigint.yaml", "sigint", grid={"lora.r": [2, 4, 8]})
    results = tmp_path / "results"
    runs = results / "sigint" / "runs"
    args = [str(BIN / "qlora-ray"), "run", str(spec), "--results", str(results),
            "--address", cluster.address, "--max-parallel", "1"]
    driver = subprocess.Popen(args, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list(runs.glob("*.parquet")):
        time.sleep(0.2)
    driver.send_signal(signal.SIGINT)
    output, _ = driver.communicate(timeout=60)
    assert driver.returncode == 130, output
    assert "interrupted: cancelled 1 running experiment(s)" in output
    assert "rerun the same command to resume" in output
    df = read_runs(results, "sigint")  # what was written is whole and readable
    assert 1 <= len(df) < 3 and (df.status == "ok").all()


def test_ray_job_submit_runs_the_quickstart(cluster, tmp_path):
    results = tmp_path / "job-results"
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", str(ROOT),
         "--", "qlora-ray", "run", "experiments/quickstart.yaml", "--results", str(results)],
        env=cluster.env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout.lower()
    spec = yaml.safe_load((ROOT / "experiments/quickstart.yaml").read_text())
    from qlora_ray.grid import expand

    expected = len(expand(spec).cells)
    df = pd.read_parquet(results / spec["name"] / "runs")
    assert len(df) == expected and (df.status == "ok").all()
    assert str(df["status"].dtype) in ("object", "str", "string")
    assert df["peak_memory_bytes"].dtype == "int64"
    assert str(df["started_at"].dtype).startswith("datetime64") and df["started_at"].dt.tz is not None
    assert df["ray_node_id"].notna().all()
    assert os.path.isdir(results / spec["name"] / "samples")
    # The planner counted the very tokens and steps the Trainer saw, and said how long.
    assert (df["predicted_train_tokens"] == df["train_tokens"]).all()
    assert (df["predicted_steps"] == df["train_steps"]).all()
    assert (df["predicted_seconds"] > 0).all() and (df["predicted_gpu_seconds"] > df["predicted_seconds"]).all()


def test_on_a_cluster_that_cannot_grow_a_missing_gpu_type_is_unschedulable_at_once(cluster, tmp_path):
    # This cluster's head was started by hand: its monitor is read-only, no node can be
    # added, so waiting the default 600 s for an H100 would only delay the grid.
    spec = write_spec(tmp_path / "fixed.yaml", "fixed", grid={"gpu": ["H100", "L4"]})
    results = tmp_path / "results"
    started = time.monotonic()
    proc = cluster.qlora_ray("run", str(spec), "--results", str(results), "--address", cluster.address,
                             "--allow-cpu-fallback", timeout=240)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr
    df = read_runs(results, "fixed").set_index("gpu")
    assert df.loc["L4", "status"] == "ok"
    assert df.loc["H100", "status"] == "unschedulable"
    assert "cannot add one" in df.loc["H100", "error"] and "read-only monitor" in df.loc["H100", "error"]
    print(f"\nfixed cluster: H100 cell unschedulable, grid done in {elapsed:.0f} s")


LABEL_TRIAL = """
import json, sys, time
import ray

ray.init(address=sys.argv[1], log_to_driver=False)

@ray.remote(num_gpus=1, num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_id()

l4 = [n["NodeID"] for n in ray.nodes() if n["Labels"].get("ray.io/accelerator-type") == "L4"]
by_type = ray.get(where.options(label_selector={"ray.io/accelerator-type": "L4"}).remote(), timeout=120)
by_memory = ray.get(where.options(label_selector={"qlora-ray/gpu-memory-gib": "in(24,48)"}).remote(), timeout=120)
waiting = where.options(label_selector={"ray.io/accelerator-type": "H100"}).remote()
gcs = ray._raylet.GcsClient(address=sys.argv[1])
demand, deadline = [], time.monotonic() + 30
while not demand and time.monotonic() < deadline:
    time.sleep(1)
    status = json.loads(gcs.internal_kv_get(b"__autoscaling_status") or b"{}")
    demand = (status.get("load_metrics_report") or {}).get("resource_demand") or []
ray.cancel(waiting, force=True)
print(json.dumps({"l4": l4, "by_type": by_type, "by_memory": by_memory, "demand": demand}))
"""


def test_label_selector_trial_places_tasks_but_the_autoscaler_never_sees_the_label(cluster, tmp_path):
    # The trial behind docs/cluster.md "Label selectors": Ray 2.60's label_selector= on
    # node labels (ray.io/accelerator-type, a custom memory label) places tasks right, but
    # the demand the v1 autoscaler (the cluster launcher's) scales on carries no label: an
    # H100-selected task is just {"CPU": 1, "GPU": 1} to it, so it would start any GPU type.
    script = tmp_path / "trial.py"
    script.write_text(LABEL_TRIAL)
    proc = subprocess.run([str(BIN / "python"), str(script), cluster.address], env=cluster.env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["by_type"] in out["l4"] and out["by_memory"] in out["l4"]
    shapes = [shape for shape, _count in out["demand"]]
    assert {"CPU": 1.0, "GPU": 1.0} in shapes, out["demand"]
    assert not [s for s in shapes if any("H100" in k for k in s)]


def test_doctor_reports_nodes_gpus_and_what_the_spec_needs(cluster, tmp_path, monkeypatch):
    # In this process, with the CUDA stand-in for this machine's card; the GPU nodes are
    # checked by real tasks on them, where torch finds no CUDA behind the logical GPUs.
    import argparse
    import io

    from test_doctor import T4, FakeCuda

    from qlora_ray import doctor

    for key in ("HOME", "RAY_TMPDIR", "TMPDIR"):
        monkeypatch.setenv(key, cluster.env[key])
    spec = write_spec(tmp_path / "doc.yaml", "doc", grid={"gpu": ["T4", "L4", "H100"]})
    args = argparse.Namespace(spec=str(spec), address=cluster.address, results=str(tmp_path / "res"),
                              model_configs=[])
    out = io.StringIO()
    started = time.monotonic()
    code = doctor.main(args, cuda=FakeCuda(T4), out=out)
    text = out.getvalue()
    print(f"\n{text}\ndoctor on the cluster: {time.monotonic() - started:.0f} s")
    assert code == 1, text
    lines = text.splitlines()

    def one(prefix: str) -> str:
        found = [ln for ln in lines if ln.startswith(prefix)]
        assert found, f"no line starts with {prefix!r}:\n{text}"
        return found[0]

    assert "Tesla T4, 14.6 GiB" in one("ok    gpu ")
    assert "3 node(s)" not in one("ok    ray ") and "2 node(s)" in one("ok    ray ")
    nodes = [ln for ln in lines if ln.startswith("ok    node ")]
    assert any("2 GPU, accelerator_type T4" in ln for ln in nodes)
    assert any("accelerator_type L4, labels qlora-ray/gpu-memory-gib=24,ray.io/accelerator-type=L4" in ln
               for ln in nodes)
    assert "none: a fixed cluster (read-only monitor" in one("ok    autoscaler")
    assert "T4: 1 node(s) offer" in one("ok    gpu type      T4")
    assert "L4: 1 node(s) offer" in one("ok    gpu type      L4")
    assert "cannot add one: 1 cell(s) would be unschedulable" in one("fail  gpu type      H100")
    # Both GPU nodes were checked where they are: logical GPUs, no CUDA behind them.
    no_cuda = [ln for ln in lines if re.match(r"fail  node \S+ gpus: the node offers [12] GPU\(s\)", ln)]
    assert len(no_cuda) == 2, text
    assert len([ln for ln in lines if re.match(r"ok    node \S+ bitsandbytes: .* on cpu matches", ln)]) == 2
    assert one("ok    results").endswith("wrote, read back and deleted a probe object")


def test_longest_predicted_cell_starts_first_and_rows_carry_the_prediction(cluster, tmp_path):
    # Spec order is short, long; with one slot the driver must start the long one first.
    spec = write_spec(tmp_path / "order.yaml", "order",
                      runs=[{"name": "short", "train.max_steps": 1}, {"name": "long", "train.max_steps": 6}])
    results = tmp_path / "results"
    proc = cluster.qlora_ray("run", str(spec), "--results", str(results), "--address", cluster.address,
                             "--max-parallel", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    df = read_runs(results, "order").sort_values("started_at")
    assert df["name"].tolist() == ["long", "short"]
    assert (df["predicted_seconds"] > 0).all() and df["train_seconds"].notna().all()
    assert (df["predicted_steps"] == df["train_steps"]).all()
    long, short = df.set_index("name").loc["long"], df.set_index("name").loc["short"]
    assert long.predicted_seconds > short.predicted_seconds
    assert long.time_calibration == "default" and pd.isna(long.predicted_usd)  # CPU: no price


def test_force_runs_a_cell_the_planner_refuses(cluster, tmp_path):
    """Issue 9: a cell planned "does not fit" runs with --force and ends with its own row."""
    # A T4 that offers 300 MiB: even the low end of the tiny model's range (which counts a
    # CUDA context) is over it, so the plan refuses the cell.
    spec = write_spec(tmp_path / "force.yaml", "force", grid={"gpu": ["T4"]},
                      profiles={"T4": {"total_mib": 300}})
    results = tmp_path / "results"
    refused = cluster.qlora_ray("run", str(spec), "--results", str(results), "--address", cluster.address,
                                "--allow-cpu-fallback")
    assert refused.returncode == 2 and "--force" in refused.stderr, refused.stdout + refused.stderr
    assert not (results / "force" / "runs").exists()

    forced = cluster.qlora_ray("run", str(spec), "--results", str(results), "--address", cluster.address,
                               "--allow-cpu-fallback", "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "--force: running 1 cell(s)" in forced.stdout
    (row,) = read_runs(results, "force").to_dict("records")
    assert row["status"] == "ok"
    assert row["predicted_train_low_bytes"] > 300 * 2**20  # it was refused for a reason
    assert row["predicted_peak_bytes"] == max(row["predicted_train_bytes"], row["predicted_eval_bytes"])
