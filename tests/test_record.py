"""Rows come from one builder: a driver-written row and a worker's carry the same provenance."""

from __future__ import annotations

from conftest import DATA

from qlora_ray import provenance
from qlora_ray.config import ExperimentConfig, from_dict
from qlora_ray.record import Record, driver_row
from qlora_ray.results import RUN_COLUMNS

CFG = from_dict(ExperimentConfig, {"name": "cell", "dataset": {"path": str(DATA)}})


def test_a_driver_row_and_a_worker_row_carry_the_same_provenance() -> None:
    # A worker that failed in setup (what Record.row gives the driver), and the row the
    # driver writes for a cell whose task died: same cell, same machine.
    record = Record(CFG, "abc123", "spec", attempt=2, predicted_peak_bytes=10)
    record.fail(RuntimeError("no device"))
    worker = record.row()
    driver = driver_row(CFG, "abc123", "spec", "failed", "WorkerCrashedError: gone", 2, 10)

    assert list(worker) == list(driver) == list(RUN_COLUMNS)
    keys = [*provenance.PACKAGES, "python_version", "git_commit", "hostname", "image", "ray_node_id"]
    assert {k: worker[k] for k in keys} == {k: driver[k] for k in keys}
    # ... and filled, not merely present: versions of what is installed, this machine's name.
    assert worker["qlora_ray_version"] and worker["torch_version"] and worker["ray_version"]
    assert worker["hostname"] and worker["python_version"]
    for row in (worker, driver):
        assert (row["experiment_id"], row["spec_name"], row["attempt"], row["name"]) == ("abc123", "spec", 2, "cell")
        assert row["status"] == "failed" and row["started_at"] <= row["finished_at"]
