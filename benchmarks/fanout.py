"""Fan-out efficiency (issue 11 item 1): N equal tiny cells on S slots, makespan against the bound.

    flock /tmp/qlora-ray-ray.lock .venv/bin/python benchmarks/fanout.py [--cells 8] [--slots 2]
        [--steps 40] [--repeat 3]

Each repeat is one real `qlora-ray run` (fresh driver, the embedded Ray with `--num-cpus S`,
one thread per cell) of N cells that differ only in their seed: the built-in tiny Llama,
4-bit NF4, `--steps` optimizer steps on the shipped data, a short eval. (It starts Ray: on the
shared development machine it runs under the Ray lock, as above.)

From the same run: every cell's wall time is its Ray task's, from the task starting
(`started_at - process_start_seconds`) to its experiment's end (`finished_at`), on the
machine's clock; the bound is max(sum of those / S, the longest); the makespan is from the
first task's start to the moment the driver printed the last row as written (the
benchmark timestamps the driver's lines as they arrive; same clock). What falls outside
the bound is the runner's: a slot idle between two cells (the previous row returned, Ray
handing the slot to the next task) and the driver's collect-and-write of the last row.
A slot's first task also starts the warm process it forks experiments from (fresh.py:
Python, torch and transformers imported once per slot), which is in that cell's wall, as
every cell's imports used to be; `efficiency_from_experiment_start` is the same figure with
each cell from its experiment's start instead. Ray's own start happens once per run and is
reported beside it (`start_s`). Efficiency = bound / makespan, median of `--repeat` runs;
target >= 0.95 for N = 8, S = 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _result import report

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.95


def spec(cells: int, steps: int) -> dict:
    return {
        "name": "fanout",
        "base": {
            "model": "builtin:tiny-llama",
            "dataset": {"path": str(ROOT / "experiments/data/fin_sentiment.jsonl"), "eval_size": 16},
            "quant": {"bits": 4, "type": "nf4", "compute_dtype": "float32"},
            "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
            "train": {"max_steps": steps, "batch_size": 4, "optim": "adamw_torch", "max_seq_len": 128,
                      "gradient_checkpointing": False},
            "eval": {"max_new_tokens": 4, "before": False, "max_samples": 8},
        },
        "seeds": list(range(cells)),
    }


@dataclass
class GridRun:
    """One `qlora-ray run` as the benchmarks see it: its rows and the driver's lines, timed."""

    rows: Any  # pandas.DataFrame of the run's rows
    lines: list[tuple[dt.datetime, str]]  # every line the driver printed, with when it arrived
    written: dict[str, dt.datetime]  # cell name -> when the driver printed its row as written
    announced: dt.datetime  # the driver's first line: planned, Ray not started yet


def run_grid(path: Path, tmp: Path, slots: int, env: dict[str, str] | None = None) -> GridRun:
    """`qlora-ray run path` on the embedded Ray with `slots` CPU slots, one per cell."""
    import pandas as pd

    results = tmp / f"results-{time.monotonic_ns()}"
    cmd = [str(Path(sys.executable).with_name("qlora-ray")), "run", str(path), "--results", str(results),
           "--num-cpus", str(slots), "--cpus-per-task", "1"]
    # Ray's session folder under the short temp path (AF_UNIX socket paths are <= 107 bytes).
    env = dict(os.environ, RAY_ADDRESS="", RAY_TMPDIR=str(tmp), **(env or {}))
    lines: list[tuple[dt.datetime, str]] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=ROOT)
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((dt.datetime.now(dt.timezone.utc), line.rstrip()))
    proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n"
                         + "\n".join(text for _, text in lines[-40:]))
    rows = pd.read_parquet(results / yaml.safe_load(path.read_text())["name"] / "runs")
    if not (rows["status"] == "ok").all():
        raise SystemExit(f"not every cell is ok: {rows[['name', 'status', 'error']].to_dict('records')}")
    # Every cell is announced ("  [k/N] name: ok") right after its row and samples are written.
    written = {text.split("] ", 1)[1].rsplit(": ", 1)[0]: at for at, text in lines
               if text.lstrip().startswith("[") and "] " in text}
    # The driver's first line comes after planning, before Ray starts.
    announced = next(at for at, text in lines if " to run -> " in text)
    return GridRun(rows, lines, written, announced)


def one_run(path: Path, tmp: Path, slots: int) -> dict:
    import pandas as pd

    run = run_grid(path, tmp, slots)
    rows = run.rows
    experiment = pd.to_datetime(rows["started_at"], utc=True)
    started = experiment - pd.to_timedelta(rows["process_start_seconds"], unit="s")  # the task's start
    finished = pd.to_datetime(rows["finished_at"], utc=True)
    walls = (finished - started).dt.total_seconds().tolist()
    first = started.min().to_pydatetime()
    last_written = max(run.written.values())
    makespan = (last_written - first).total_seconds()
    bound = max(sum(walls) / slots, max(walls))
    # The same with each cell from its experiment's start: a slot's first cell then leaves
    # out its warm process's start, which makes the slots start apart.
    inner = (finished - experiment).dt.total_seconds().tolist()
    inner_makespan = (last_written - experiment.min().to_pydatetime()).total_seconds()
    return {
        "efficiency": bound / makespan, "makespan_s": makespan, "bound_s": bound,
        "efficiency_from_experiment_start": max(sum(inner) / slots, max(inner)) / inner_makespan,
        "cell_wall_s": [round(w, 2) for w in walls],
        "train_s": [round(x, 2) for x in rows["train_seconds"].tolist()],
        "eval_s": [round(x, 2) for x in rows["eval_seconds"].tolist()],
        "process_start_s": [round(x, 2) for x in rows["process_start_seconds"].tolist()],
        "preloaded": bool(rows["preloaded"].all()),
        "start_s": (first - run.announced).total_seconds(),
        "end_s": (run.lines[-1][0] - last_written).total_seconds(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=8)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    runs = []
    with tempfile.TemporaryDirectory(prefix="qlora-ray-fanout-") as tmp:
        path = Path(tmp) / "fanout.yaml"
        path.write_text(yaml.safe_dump(spec(args.cells, args.steps), sort_keys=False))
        for i in range(args.repeat):
            runs.append(one_run(path, Path(tmp), args.slots))
            print(f"run {i + 1}: efficiency {runs[-1]['efficiency']:.3f}", file=sys.stderr, flush=True)
    value = statistics.median(r["efficiency"] for r in runs)
    return report(
        "fanout", round(value, 4), "bound / makespan", f">= {TARGET} (N = 8, S = 2)", value >= TARGET,
        cells=args.cells, slots=args.slots, steps=args.steps, repeats=args.repeat,
        efficiency_runs=[round(r["efficiency"], 4) for r in runs],
        efficiency_from_experiment_start_runs=[round(r["efficiency_from_experiment_start"], 4) for r in runs],
        makespan_s_median=round(statistics.median(r["makespan_s"] for r in runs), 1),
        bound_s_median=round(statistics.median(r["bound_s"] for r in runs), 1),
        idle_per_cell_s_median=round(statistics.median(
            (r["makespan_s"] - r["bound_s"]) * args.slots / args.cells for r in runs), 2),
        runs=runs,
    )


if __name__ == "__main__":
    sys.exit(main())
