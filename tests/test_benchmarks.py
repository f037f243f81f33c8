"""One quick smoke run per benchmark script, so none of them rots (issue 11).

Each runs the real script with small sizes and writes its results file to a temp folder
(QLORA_RAY_BENCH_RESULTS), never over the figures quoted in docs/performance.md; the
figures themselves come from the full runs, not from here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from qlora_ray.dispatch import Dispatcher, submission_order

KEYS = {"name", "value", "unit", "target", "met", "command", "measured_at", "cpus", "loadavg_start"}


def bench(tmp_path: Path, script: str, *argv: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *argv], capture_output=True,
                          text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "QLORA_RAY_BENCH_RESULTS": str(tmp_path), **(env or {})})
    name = script.removesuffix(".py")
    assert (tmp_path / f"{name}.json").exists(), f"{script} wrote no results:\n{proc.stderr[-3000:]}"
    written = json.loads((tmp_path / f"{name}.json").read_text())
    assert set(written) >= KEYS, proc.stdout + proc.stderr
    assert written["name"] == name and written["command"].startswith(".venv/bin/python benchmarks/")
    # The exit code is the target check: 0 exactly when the file says it was met.
    assert proc.returncode == (0 if written["met"] else 1), proc.stderr[-2000:]
    assert not (ROOT / "benchmarks" / "results" / f".{name}.json.tmp").exists()
    return written


class Cell:
    def __init__(self, name: str, seconds: float | None) -> None:
        self.name, self.predicted_seconds = name, seconds


def test_dispatch_longest_predicted_first_stable_unpredicted_last_and_max_parallel():
    cells = [Cell("a", 10), Cell("b", None), Cell("c", 30), Cell("d", 10), Cell("e", 0)]
    assert [c.name for c in submission_order(cells)] == ["c", "a", "d", "b", "e"]

    gate = Dispatcher(cells, max_parallel=2)
    assert [c.name for c in gate.release(running=0)] == ["c", "a"]
    assert gate.release(running=2) == []
    assert [c.name for c in gate.release(running=1)] == ["d"]
    assert len(gate) == 2
    gate.requeue(cells[0])  # a back-off retried in a fresh process goes before the rest
    assert [c.name for c in gate.release(running=0)] == ["a", "b"]
    assert [c.name for c in Dispatcher(cells).release(running=100)] == ["c", "a", "d", "b", "e"]
    with pytest.raises(ValueError, match="max_parallel"):
        Dispatcher(cells, max_parallel=0)


def test_dispatch_window_bounds_each_shape_out_and_starves_none():
    """Issue 11 item 6: the driver hands Ray at most `window` cells of a shape at a time (its
    memory grew with every task out at once), and a long queue of one GPU type never holds
    back another type's cells."""
    cells = [Cell(f"a{i}", 100 - i) for i in range(6)] + [Cell(f"t{i}", 10 - i) for i in range(3)]
    gate = Dispatcher(cells, window=2, shape=lambda c: c.name[0])
    assert [c.name for c in gate.release(running=0)] == ["a0", "a1", "t0", "t1"]
    assert gate.release(running=4) == [] and len(gate) == 5
    gate.finished(cells[0])  # an A100 cell came back: the next one goes, in order
    assert [c.name for c in gate.release(running=3)] == ["a2"]
    gate.requeue(cells[6])  # a T4 cell comes back for a retry: it goes again first
    assert [c.name for c in gate.release(running=3)] == ["t0"]
    with pytest.raises(ValueError, match="window"):
        Dispatcher(cells, window=0)


def test_schedule_sim_runs_the_driver_dispatch_on_a_clock(tmp_path):
    out = bench(tmp_path, "schedule_sim.py", "--cells", "200", "--repeat", "1")
    assert out["cells"] == 200 and all(out["cells_per_gpu"].values())
    # No schedule beats the bound; the driver's order is within the target of it.
    assert 1.0 <= out["value"] <= 1.05 and out["met"]


def test_startup_help_and_plan(tmp_path):
    out = bench(tmp_path, "startup.py", "--repeat", "1")
    assert out["plan_cells"] >= 1000
    assert out["heavy_modules_imported"] == {"help": [], "plan": []}


@pytest.mark.slow
def test_vs_plain_trains_both_and_compares(tmp_path):
    out = bench(tmp_path, "vs_plain.py", "--steps", "2", "--repeat", "1")
    run = out["runs"][0]
    # The same rows, hyperparameters and step count (each side draws its own batches).
    assert run["plain"]["steps"] == run["qlora_ray"]["steps"] == 2
    assert run["plain"]["tokens"] > 0 and run["qlora_ray"]["tokens"] > 0
    assert out["ratio_cpu_runs"][0] > 0



@pytest.mark.slow
def test_packing_trains_padded_padding_free_and_packed_on_the_same_tokens(tmp_path):
    # Three fresh worker processes, not four: `grouped` differs from `padded` only by its
    # spec flag (tests/test_worker.py checks its batches).
    out = bench(tmp_path, "packing.py", "--epochs", "1", "--repeat", "1", "--train-rows", "24",
                "--eval-rows", "4", "--variants", "padding_free,packed")
    run = out["runs"][0]
    variants = ("padded", "padding_free", "packed")
    assert len({run[v]["tokens"] for v in variants}) == 1 and run["padded"]["tokens"] > 0
    # Padding-free keeps the batches and steps; packing lays 24 rows into fewer, fuller ones.
    assert run["padding_free"]["steps"] == run["padded"]["steps"] == 6
    assert run["packed"]["steps"] < 6
    # Padding-free computes on the real tokens only; the padded batches on more.
    assert run["padding_free"]["computed_tokens"] == run["padding_free"]["tokens"] < run["padded"]["computed_tokens"]
    assert set(out["speedup_cpu"]) == set(variants[1:]) and out["best"] in out["speedup_cpu"]



# The three below start Ray: run this file under the machine's Ray lock, like every test that does.


@pytest.mark.slow
def test_fanout_on_the_embedded_ray(tmp_path):
    out = bench(tmp_path, "fanout.py", "--cells", "2", "--steps", "1", "--repeat", "1")
    run = out["runs"][0]
    assert len(run["cell_wall_s"]) == 2 and run["bound_s"] > 0 and 0 < out["value"] <= 1.0
    assert run["preloaded"]


@pytest.mark.slow
def test_overhead_cells_start_warm_and_read_cached_data(tmp_path):
    """Issue 11 item 2: the second cell on a slot starts in a process forked with torch and
    transformers already imported, and reads the tokenized data the first one built."""
    out = bench(tmp_path, "overhead.py", "--cells", "2", "--steps", "1", "--repeat", "1", "--no-cold")
    (cell,) = out["runs"][0]["cells"]
    assert cell["preloaded"] and cell["data_cached"]
    assert set(out["parts_median_s"]) == {"scheduling_s", "process_start_s", "setup_s", "data_s", "rest_s",
                                          "collect_write_s"}
    # The gap between two row writes minus the second cell's measured phases: slightly
    # negative when the driver writes a row after the slot's next cell has already started,
    # and the gap itself can be under 0.1 s with one-step cells. Well under the ~5 s a cold
    # start costs here is what a warm start shows.
    assert abs(out["value"]) < 2.0 and out["cold"] is None


@pytest.mark.slow
def test_driver_scale_on_the_embedded_ray(tmp_path):
    out = bench(tmp_path, "driver_scale.py", "--cells", "5", "15", "--repeat", "1")
    assert set(out["peak_rss_mb"]) == {"5", "15"} and out["peak_rss_mb"]["15"] > 0
    # Every task of a run has one Ray name; each cell is still named in its task's log.
    assert out["cells_named_in_task_logs"] == {"5": [5], "15": [15]}
    assert "rss_growth_kb_per_cell" in out


def test_the_widened_model_computes_what_the_built_in_one_does(tmp_path):
    """benchmarks/wide_model.py (the `--model wide` of packing.py): the same function in a
    wider body, so its eval quality means what the built-in model's does."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_ray.builtin import ensure_builtin

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from wide_model import build

    wide = AutoModelForCausalLM.from_pretrained(build(tmp_path / "wide", factor=2)).eval()
    tiny = AutoModelForCausalLM.from_pretrained(ensure_builtin("builtin:tiny-llama")).eval()
    assert wide.config.hidden_size == 2 * tiny.config.hidden_size
    ids = torch.arange(3, 60).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(wide(ids).logits, tiny(ids).logits, rtol=0, atol=0.05)
