"""A cell waits while the autoscaler is launching a node that fits it, and gives up when none is coming.

A real head node and a real `qlora-ray run` driver; only the autoscaler is stood in for,
by its report: the head runs without Ray's monitor (`--no-monitor`), and the test writes
the monitor's `__autoscaling_status` into the real GCS, built with Ray's own classes
(tests/test_cluster_status.py `v1_report`), first "an H100 node is being launched", then
"the H100 launch failed: VcpuLimitExceeded" (what a new AWS account's zero GPU quota
gives). No node with an H100 ever exists, so without the autoscaler check the cell would
expire after --unschedulable-timeout, while the node is still on its way.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import DATA
from ray_cluster import BIN, LocalCluster
from test_cluster_status import v1_report

pytestmark = pytest.mark.slow
H100_NODE = {"CPU": 192.0, "GPU": 8.0, "accelerator_type:H100": 1.0}


@pytest.fixture
def head(tmp_path_factory: pytest.TempPathFactory):
    c = LocalCluster(tmp_path_factory.mktemp("aw"))  # short: Ray's socket paths must fit 107 bytes
    try:
        c.start(num_cpus=1, extra=["--no-monitor"])
        yield c
    finally:
        c.stop()


class ReportWriter(threading.Thread):
    """Writes the current report every second, as the monitor refreshes its own."""

    def __init__(self, address: str):
        super().__init__(daemon=True)
        from ray._raylet import GcsClient

        self.gcs = GcsClient(address=address)
        self.report = ""
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.report:
                self.gcs.internal_kv_put(b"__autoscaling_status", self.report.encode(), True)
            self.stop.wait(1.0)


def test_a_cell_waits_for_a_launching_node_then_gives_up_when_its_launch_fails(head: LocalCluster, tmp_path: Path):
    spec = tmp_path / "h100.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "h100", "base": {"model": "builtin:tiny-llama",
                                 "dataset": {"path": str(DATA)},
                                 "train": {"max_steps": 1}},
        "grid": {"gpu": ["H100"]}}))
    results = tmp_path / "results"
    writer = ReportWriter(head.address)
    writer.report = v1_report(active={"head": 1}, pending_launches={"gpu_h100": 1}, pending_resources=H100_NODE)
    writer.start()
    driver = subprocess.Popen([str(BIN / "qlora-ray"), "run", str(spec), "--results", str(results),
                               "--address", head.address, "--unschedulable-timeout", "3"],
                              env=head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Three times the timeout with the node "launching": the cell is still waiting.
        time.sleep(9)
        assert driver.poll() is None, driver.communicate()[0][-3000:]
        assert not list((results / "h100" / "runs").glob("*.parquet"))

        writer.report = v1_report(active={"head": 1}, pending_resources={}, unavailable={
            "gpu_h100": ("VcpuLimitExceeded", "You have requested more vCPU capacity than your current vCPU limit of 0")})
        failed_at = time.monotonic()
        output, _ = driver.communicate(timeout=120)
        gave_up_after = time.monotonic() - failed_at
    finally:
        writer.stop.set()
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 1, output[-3000:]
    row = pd.read_parquet(results / "h100" / "runs").iloc[0]
    assert row.status == "unschedulable"
    assert "none that would was being launched for 3s" in row.error
    assert "gpu_h100: VcpuLimitExceeded" in row.error
    # The report is re-read every 5 s; then the 3 s timeout runs from the last launch seen.
    assert gave_up_after < 30
