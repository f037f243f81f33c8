"""The driver on a real local Ray cluster with logical GPUs: scheduling, failures, resume, jobs.

One cluster for the module: a head node offering 2 logical GPUs tagged T4 and a second
node offering 1 GPU tagged L4. No CUDA exists here, so GPU cells run with
--allow-cpu-fallback, which is exactly what a logical-GPU node is for.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import DATA, ROOT
from ray_cluster import BIN, LocalCluster

pytestmark = pytest.mark.slow

# A cell that trains for two steps: enough to exercise every phase in a few seconds.
FAST_BASE = {
    "model": "builtin:tiny-llama",
    "dataset": {"path": str(DATA), "eval_size": 8},
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
    # the two T4 tasks held their GPUs at the same time, different GPUs (each task's start:
    # a slot's first task also starts the warm process it forks its experiment from, which
    # takes longer than these tiny experiments, so the experiments alone need not overlap)
    a, b = ok[ok.gpu == "T4"].sort_values("started_at").itertuples()
    b_task = b.started_at - pd.Timedelta(seconds=b.process_start_seconds)
    assert a.finished_at > b_task, "expected the two T4 tasks to overlap (2 T4 GPUs, 2 CPUs)"
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


def test_cpu_cells_see_no_gpu_emulated_cells_take_any_gpu_and_paged_backoff_restarts(cluster, tmp_path):
    """Issue 13 items 1, 4 and 8 on the real cluster: a CPU cell's process has the node's
    GPUs hidden; an `emulate_profile` A100-40G cell runs on whatever GPU there is (this
    cluster has none of its type); an OOM back-off after paged optimizer state reruns the
    cell in a fresh process at the smaller micro-batch."""
    import json

    spec = write_spec(tmp_path / "cards.yaml", "cards", runs=[
        {"name": "on-cpu"},
        {"name": "emulated", "gpu": "A100-40G", "emulate_profile": True},
        {"name": "paged", "gpu": "T4", "train.batch_size": 4, "train.oom_backoff": True},
    ])
    results, pids = tmp_path / "results", tmp_path / "pids"
    pids.mkdir()
    job = {"runtime_env": {"worker_process_setup_hook": "ray_hooks.paged_oom_at_batch_4",
                           "env_vars": {"PYTHONPATH": str(Path(__file__).parent),
                                        "QLORA_RAY_TEST_PIDS": str(pids)}}}
    proc = subprocess.run(
        [str(BIN / "qlora-ray"), "run", str(spec), "--results", str(results), "--address", cluster.address,
         "--allow-cpu-fallback", "--unschedulable-timeout", "5"],
        env={**cluster.env, "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)},
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    df = read_runs(results, "cards").set_index("name")
    assert (df.status == "ok").all()

    cpu = df.loc["on-cpu"]
    assert cpu.cuda_visible_devices == "" and cpu.device == "cpu" and not cpu.cpu_fallback
    emulated = df.loc["emulated"]
    assert emulated.cuda_visible_devices in ("0", "1") and emulated.emulate_profile
    paged = df.loc["paged"]
    failed_pids = {int(p.name) for p in pids.iterdir()}
    assert len(failed_pids) == 1 and paged.worker_pid not in failed_pids  # a fresh process
    assert (paged.batch_size, paged.grad_accum, paged.backoff_steps) == (2, 2, 1)
    assert "in a fresh process" in proc.stdout


# Where the driver is SIGKILLed (tests/kill_driver.py): kind, and which write of a run it hits.
# The two `skipped` rows (cells the planner refuses, --skip-unfit) are written first, before
# Ray starts; the trained cells' rows follow, one at a time (--max-parallel 1).
SKIPPED_FIRST, TRAINED_FIRST = 1, 3
KILL_POINTS = [
    ("run-half", SKIPPED_FIRST + 1),   # half of the second skipped row's bytes on disk
    ("run-staged", SKIPPED_FIRST),     # a skipped row complete in .staging, not renamed
    ("samples-moved", 1),              # a trained cell's samples in place, its row not yet
    ("run-half", TRAINED_FIRST),       # half of a trained cell's row on disk
    ("time", None),                    # anywhere: a seeded moment of the run
    ("run-moved", TRAINED_FIRST),      # a trained row renamed into place, nothing after it
]


def _kill_schedule(seed: int) -> list[tuple[str, float]]:
    rng = random.Random(seed)
    points = KILL_POINTS[:]
    rng.shuffle(points)
    # A trained row that lands (run-moved) last, so every earlier point still has a cell to hit.
    points.sort(key=lambda p: p[0] == "run-moved")
    return [(kind, n if n is not None else round(rng.uniform(2.0, 12.0), 1)) for kind, n in points]


def _readable_rows(runs: Path) -> dict[str, tuple[int, object]]:
    """Every file in runs/: readable, named after its row. name -> (mtime, started_at) of ok rows."""
    ok = {}
    for path in runs.glob("*"):
        table = pq.read_table(path)  # raises if any visible file is partial
        row = table.to_pylist()[0]
        assert table.num_rows == 1 and row["experiment_id"] == path.stem, path
        if row["status"] == "ok":
            ok[path.name] = (path.stat().st_mtime_ns, row["started_at"])
    return ok


@pytest.mark.parametrize("seed", [15])
def test_driver_sigkilled_at_seeded_points_then_rerun_keeps_one_row_per_cell(cluster, tmp_path, seed):
    spec = write_spec(tmp_path / "kill.yaml", "kill", runs=[
        {"name": "a", "lora.r": 2}, {"name": "b", "lora.r": 4},
        # bf16 on a T4: refused by the planner, so --skip-unfit makes the driver write these.
        {"name": "u1", "gpu": "T4", "quant.compute_dtype": "bfloat16", "lora.r": 8},
        {"name": "u2", "gpu": "T4", "quant.compute_dtype": "bfloat16", "lora.r": 16}])
    results = tmp_path / "results"
    runs = results / "kill" / "runs"
    args = ["run", str(spec), "--results", str(results), "--address", cluster.address, "--max-parallel", "1",
            "--skip-unfit"]
    kept: dict[str, tuple[int, object]] = {}
    for kind, where in _kill_schedule(seed):
        if kind == "time":
            driver = subprocess.Popen([str(BIN / "qlora-ray"), *args], env=cluster.env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(where)
            driver.send_signal(signal.SIGKILL)
            driver.wait()
        else:
            driver = subprocess.run([str(BIN / "python"), str(ROOT / "tests" / "kill_driver.py"), kind,
                                     str(where), "--", *args], env=cluster.env, capture_output=True,
                                    text=True, timeout=600)
        assert driver.returncode == -signal.SIGKILL, (kind, where, driver.returncode)
        ok = _readable_rows(runs) if runs.exists() else {}
        assert all(ok[name] == seen for name, seen in kept.items()), f"an ok row was rewritten ({kind})"
        kept = ok

    final = cluster.qlora_ray(*args)
    assert final.returncode == 1, final.stdout + final.stderr  # the skipped cells are not ok
    assert f"4 cells, {2 + len(kept)} already have a row, {2 - len(kept)} to run" in final.stdout, final.stdout
    df = read_runs(results, "kill").set_index("name")
    assert sorted(df.index) == ["a", "b", "u1", "u2"]  # exactly one row per cell
    assert df["experiment_id"].is_unique
    assert sorted(df.status) == ["ok", "ok", "skipped", "skipped"]
    assert all(_readable_rows(runs)[name] == seen for name, seen in kept.items())  # not trained again
    samples = pd.read_parquet(results / "kill" / "samples")
    assert set(samples.experiment_id) == set(df[df.status == "ok"].experiment_id)
    assert sorted(p.stem for p in (results / "kill" / "samples").glob("*")) == sorted(set(samples.experiment_id))


def test_a_full_disk_mid_grid_keeps_the_row_and_writes_it_when_there_is_room(cluster, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        spec = write_spec(tmp_path / "full.yaml", "full", runs=[{"name": "cell", "train.max_steps": 20}])
        log = tmp_path / "driver.log"
        with log.open("w") as out:
            driver = subprocess.Popen([str(BIN / "qlora-ray"), "run", str(spec), "--results", str(disk / "r"),
                                       "--address", cluster.address], env=cluster.env, stdout=out,
                                      stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not subprocess.run(
                ["pgrep", "-f", "ray::qlora-ray:cell"], capture_output=True).stdout:
            time.sleep(0.3)
        # The probe passed; now the disk fills up while the cell trains.
        filler = disk / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as f:
            while True:
                f.write(b"\0" * 4096)
        while time.monotonic() < deadline and "could not write the row of cell" not in log.read_text():
            time.sleep(0.3)
        assert "No space left on device" in log.read_text(), log.read_text()
        filler.unlink()  # someone frees space
        assert driver.wait(timeout=300) == 0, log.read_text()
        assert "wrote the row of cell on a later try" in log.read_text()
        df = pd.read_parquet(disk / "r" / "full" / "runs")
        assert list(df.status) == ["ok"]
        assert len(pd.read_parquet(disk / "r" / "full" / "samples")) > 0
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


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
    # Cells long enough for Ctrl-C to land mid-cell: cancelling a task in the instant it
    # completes trips a check in Ray's owner (task_manager.cc "Tried to complete task that
    # was not pending"), and 2-step cells that import nothing finish in about a second.
    spec = write_spec(tmp_path / "sigint.yaml", "sigint", grid={"lora.r": [2, 4, 8]},
                      base={**FAST_BASE, "train": {**FAST_BASE["train"], "max_steps": 30}})
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
    # The cell that was running ends with the job: no process is still titled with one of its
    # cells (a task's process is `ray::qlora-ray:<cell name>` while it runs, tasks.py).
    title = "^ray::qlora-ray:r[248]$"
    deadline = time.monotonic() + 60
    while subprocess.run(["pgrep", "-f", title], capture_output=True).returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    still = subprocess.run(["pgrep", "-a", "-f", title], capture_output=True, text=True).stdout
    assert not still, f"a cell of the interrupted run still runs: {still}"


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

    from fake_cuda import T4, MultiCardCuda

    from qlora_ray import doctor

    for key in ("HOME", "RAY_TMPDIR", "TMPDIR"):
        monkeypatch.setenv(key, cluster.env[key])
    spec = write_spec(tmp_path / "doc.yaml", "doc", grid={"gpu": ["T4", "L4", "H100"]})
    args = argparse.Namespace(spec=str(spec), address=cluster.address, results=str(tmp_path / "res"),
                              model_configs=[])
    out = io.StringIO()
    started = time.monotonic()
    code = doctor.main(args, cuda=MultiCardCuda(T4), out=out)
    text = out.getvalue()
    print(f"\n{text}\ndoctor on the cluster: {time.monotonic() - started:.0f} s")
    assert code == 1, text
    lines = text.splitlines()

    def one(prefix: str) -> str:
        found = [ln for ln in lines if ln.startswith(prefix)]
        assert found, f"no line starts with {prefix!r}:\n{text}"
        return found[0]

    assert "Tesla T4, 14.7 GiB" in one("ok    gpu ")
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


# Last: it leaves two dead nodes in the cluster's node table.
def test_a_gpu_node_stopped_mid_grid_its_cells_move_or_end_unschedulable(cluster, tmp_path):
    # Two nodes with an A10G each (logical GPUs), one stopped while its cell trains.
    for tag in ("nodeX", "nodeY"):
        cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:A10G": 1, tag: 1})
    spec = write_spec(tmp_path / "node.yaml", "node", runs=[
        {"name": "long1", "train.max_steps": 40, "lora.r": 2}, {"name": "long2", "train.max_steps": 40, "lora.r": 4}],
        grid={"gpu": ["A10G"]})
    results = tmp_path / "results"
    args = ["run", str(spec), "--results", str(results), "--address", cluster.address, "--allow-cpu-fallback",
            "--unschedulable-timeout", "8"]
    driver = subprocess.Popen([str(BIN / "qlora-ray"), *args], env=cluster.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    raylet_x = _raylet_of("nodeX")
    victim = None
    deadline = time.monotonic() + 240
    while victim is None and time.monotonic() < deadline and driver.poll() is None:
        tasks = _cell_processes(raylet_x)
        victim = tasks[0] if tasks else None
        time.sleep(0.3)
    if victim is None:
        driver.kill()
        raise AssertionError(f"no cell started on node X:\n{driver.communicate()[0][-3000:]}")
    victim_cell = " ".join(victim.cmdline()).split("ray::qlora-ray:")[1].split()[0]
    time.sleep(1)  # into the model load (40 steps take several seconds more)
    _stop_node(raylet_x)
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output
    df = read_runs(results, "node").set_index("name")
    assert len(df) == 2 and (df.status == "ok").all()
    # the victim ran again, in a new process on the node that was left (where the other cell ran)
    assert df.ray_node_id.nunique() == 1 and df.loc[victim_cell, "worker_pid"] != victim.pid

    # Now the last A10G node goes too, mid-cell: no node can run the cell any more.
    again = write_spec(tmp_path / "node2.yaml", "node2", runs=[{"name": "orphan", "train.max_steps": 40}],
                       grid={"gpu": ["A10G"]})
    args[1] = str(again)
    driver = subprocess.Popen([str(BIN / "qlora-ray"), *args], env=cluster.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    raylet_y = _raylet_of("nodeY")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None and not _cell_processes(raylet_y):
        time.sleep(0.3)
    _stop_node(raylet_y)
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 1, output
    row = read_runs(results, "node2").iloc[0]
    assert row.status == "unschedulable" and "accelerator_type:A10G" in row.error, row.error


def _cell_processes(raylet: psutil.Process) -> list[psutil.Process]:
    """The processes running a qlora-ray cell under this raylet (Ray titles them ray::<task name>)."""
    found = []
    for p in raylet.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # workers come and go (zombies included)
            if "ray::qlora-ray:" in " ".join(p.cmdline()):
                found.append(p)
    return found


def _stop_node(raylet: psutil.Process) -> None:
    """SIGKILL a node: its raylet and everything it started (workers, agents)."""
    for p in [raylet, *raylet.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _raylet_of(tag: str) -> psutil.Process:
    """The raylet of the node started with resource `tag` (its command line lists its resources)."""
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "raylet" and tag in " ".join(p.info["cmdline"] or []):
            return p
    raise AssertionError(f"no raylet with {tag}")


WINDOW_RUN = """
import io, json, sys
import ray
from qlora_ray import driver, scheduler

# A window of 3 and no-op cells (QLORA_RAY_TEST_NOOP_CELLS: each returns its row at once), so
# only the driver is exercised; after each collected cell, the object refs this process
# still holds (what `ray memory` lists for it: refs in scope pin their objects here).
driver.SUBMIT_WINDOW = 3
live, collect = [], driver._collect
def counting(ref, cell, spec):
    out = collect(ref, cell, spec)
    live.append(len(ray._private.worker.global_worker.core_worker.get_all_reference_counts()))
    return out
driver._collect = counting
code = scheduler.run_spec(sys.argv[1], results=sys.argv[2], address=sys.argv[3], out=io.StringIO())
print(json.dumps({"code": code, "live": live}))
"""


def test_the_driver_keeps_no_finished_cell_and_at_most_a_window_out_at_ray(cluster, tmp_path):
    """Issue 11 item 6: the driver's memory grew with the grid: every cell's finished task
    stayed referenced (its result pinned in the driver) and every cell was handed to Ray at
    once (Ray's owner keeps each submitted task). Now at most SUBMIT_WINDOW cells of a shape
    are out, and a collected cell holds nothing."""
    spec = write_spec(tmp_path / "many.yaml", "many", seeds=list(range(24)))
    script = tmp_path / "window.py"
    script.write_text(WINDOW_RUN)
    proc = subprocess.run([str(BIN / "python"), str(script), str(spec), str(tmp_path / "results"),
                           cluster.address], env={**cluster.env, "QLORA_RAY_TEST_NOOP_CELLS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # (Ray echoes the tasks' log lines into the driver's output too.)
    out = json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith('{"code"')))
    assert out["code"] == 0 and len(out["live"]) == 24
    assert len(read_runs(tmp_path / "results", "many")) == 24
    # The 3 cells out and a few of the driver's own (the progress tracker's answer); before,
    # 24 at the first collected cell (all submitted) and still 24 at the last (all kept).
    assert max(out["live"]) <= 3 + 4, out["live"]

    # One Ray task name for the whole run (a name per cell cost the driver ~10 KB per cell for
    # the rest of the run); what a user sees in `ray list tasks`, and the cell named in the
    # log of the task a row points at (`ray logs task --id`).
    rows = read_runs(tmp_path / "results", "many")
    tasks: list[dict] = []
    for _ in range(30):  # task events reach the GCS about once a second
        listed = subprocess.run([str(BIN / "ray"), "list", "tasks", "--address", cluster.dashboard,
                                 "--filter", "func_or_class_name=experiment_task", "--format", "json",
                                 "--limit", "1000"], env=cluster.env, capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0, listed.stdout[-2000:] + listed.stderr[-2000:]
        assert listed.stdout.lstrip().startswith("["), listed.stdout[-2000:] + listed.stderr[-2000:]
        tasks = [t for t in json.loads(listed.stdout) if t["task_id"] in set(rows.ray_task_id)]
        if len(tasks) == 24:
            break
        time.sleep(1)
    assert len(tasks) == 24 and {t["name"] for t in tasks} == {"qlora-ray:many"}, tasks[:3]
    # A cell that ran on the head node: this test cluster's other nodes share one host and one
    # session folder, and `ray logs task` for their tasks fails ("Agent for node id ... doesn't
    # exist", "Could not find log file for task attempt"), whatever the task printed.
    nodes = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", cluster.dashboard, "--format",
                            "json"], env=cluster.env, capture_output=True, text=True, timeout=120)
    head = next(n["node_id"] for n in json.loads(nodes.stdout) if n["is_head_node"])
    on_head = rows[rows.ray_node_id == head]
    assert len(on_head), f"no cell ran on the head node {head}: {rows.ray_node_id.value_counts()}"
    cell = on_head.iloc[-1]
    log = subprocess.run([str(BIN / "ray"), "logs", "task", "--id", cell.ray_task_id, "--address",
                          cluster.address], env=cluster.env, capture_output=True, text=True, timeout=120)
    assert f"qlora-ray: cell {cell['name']} (experiment {cell.experiment_id}, attempt 1" in log.stdout, (
        log.stdout[-2000:] + log.stderr[-2000:])
