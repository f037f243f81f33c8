"""What the driver asks Ray for per cell: one task name per run, the cell named in its log."""

from __future__ import annotations

from conftest import DATA

from qlora_ray.config import ExperimentConfig, from_dict
from qlora_ray.driver import Cell
from qlora_ray.profiles import get_profile
from qlora_ray.tasks import task_options


def _cell(name: str, gpu: str | None) -> Cell:
    cfg = from_dict(ExperimentConfig, {"name": name, "dataset": {"path": str(DATA)}})
    return Cell(cfg, f"id-{name}", 1, None, get_profile(gpu) if gpu else None)


def test_every_task_of_a_run_has_the_one_name_of_its_grid() -> None:
    """Issue 11 item 6: a Ray name per cell (`qlora-ray:<cell name>`) grew the driver by
    ~10 KB per cell for the whole run (Ray's owner keeps a metric series per task name), so
    a 10,000-cell grid went over 500 MB. A run's tasks now share its grid's name; the cell
    is named in the task's log (tests/test_scheduler_ray.py checks it on a real cluster)."""
    a = task_options(_cell("r8-seed1", "T4"), "sweep", 2)
    b = task_options(_cell("r16-seed2", None), "sweep", 1)
    assert a["name"] == b["name"] == "qlora-ray:sweep"
    # What does differ per cell is what Ray schedules on.
    assert a == {"name": "qlora-ray:sweep", "num_cpus": 2, "accelerator_type": "T4"}
    assert b == {"name": "qlora-ray:sweep", "num_cpus": 1}
