"""Overhead per cell (issue 11 item 2): a cell's time outside loading, training and eval.

    flock /tmp/qlora-ray-ray.lock .venv/bin/python benchmarks/overhead.py [--cells 4]
        [--steps 20] [--repeat 3] [--no-cold]

Each repeat is one real `qlora-ray run` on the embedded Ray with ONE slot (`--num-cpus 1`),
so the cells run back to back and the time between two rows the driver writes is one
cell's whole cost as the driver sees it: scheduling, process start and imports, building
the data, loading the weights, evaluating before and after, training, returning the row,
writing the row and its samples. The cells are fanout.py's (the built-in tiny Llama,
4-bit NF4, `--steps` steps, a short eval), differing only in their seed.

Per cell k >= 2 of a run (the first one also pays its slot's one-time start):

    overhead_k = (written_k - written_{k-1}) - load_seconds - train_seconds
                 - eval_before_seconds - eval_seconds

and its parts, on the slot's timeline (the rows' columns and clock): scheduling (the
previous experiment ending -> this task starting: returning the previous row, Ray handing
the slot on), process start (`process_start_seconds`: the task starting -> its fresh
process running the experiment), setup (`setup_seconds`: device, dtype and the imports the
process did not have), data (`data_seconds`: tokenizer and tokenized data), and the rest
(the row's bookkeeping). `collect_write_s` is the driver's side (the experiment ending ->
its row written and printed), which overlaps the next cell on the slot.

The figure is the median over the cells and the repeats, in seconds and as a share of a
60 s cell (target <= 5%). With the default `--cold`, every repeat also runs the same grid
with the warm start and the data cache off (QLORA_RAY_PRELOAD=0, QLORA_RAY_DATA_CACHE=0),
alternating which goes first: what the same cells cost the way they used to start.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _result import report
from fanout import run_grid, spec

CELL_S = 60.0
TARGET_SHARE = 0.05
COLD = {"QLORA_RAY_PRELOAD": "0", "QLORA_RAY_DATA_CACHE": "0"}


def measure(path: Path, tmp: Path, env: dict[str, str]) -> dict:
    import pandas as pd

    run = run_grid(path, tmp, slots=1, env=env)
    rows = run.rows.copy()
    rows["written"] = pd.to_datetime(rows["name"].map(run.written), utc=True)
    rows = rows.sort_values("written").reset_index(drop=True)
    started = pd.to_datetime(rows["started_at"], utc=True)
    finished = pd.to_datetime(rows["finished_at"], utc=True)
    task_start = started - pd.to_timedelta(rows["process_start_seconds"], unit="s")
    before = rows["eval_before_seconds"].fillna(0.0)  # null when eval.before is off
    measured = rows["load_seconds"] + rows["train_seconds"] + before + rows["eval_seconds"]
    cells = []
    for k in range(1, len(rows)):
        period = (rows.written[k] - rows.written[k - 1]).total_seconds()
        inside = (finished[k] - started[k]).total_seconds()
        parts = {
            "scheduling": (task_start[k] - finished[k - 1]).total_seconds(),
            "process_start": float(rows.process_start_seconds[k]),
            "setup": float(rows.setup_seconds[k]),
            "data": float(rows.data_seconds[k]),
        }
        parts["rest"] = inside - float(measured[k]) - parts["setup"] - parts["data"]
        cells.append({"overhead_s": round(period - float(measured[k]), 3), "period_s": round(period, 2),
                      "load_s": round(float(rows.load_seconds[k]), 2),
                      "train_s": round(float(rows.train_seconds[k]), 2),
                      "eval_s": round(float(rows.eval_seconds[k] + before[k]), 2),
                      "collect_write_s": round((rows.written[k] - finished[k]).total_seconds(), 3),
                      **{f"{name}_s": round(v, 3) for name, v in parts.items()},
                      "preloaded": bool(rows.preloaded[k]), "data_cached": bool(rows.data_cached[k])})
    first = rows.iloc[0]
    return {"overhead_s": statistics.median(c["overhead_s"] for c in cells), "cells": cells,
            "first_cell_process_start_s": round(float(first.process_start_seconds), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-cold", dest="cold", action="store_false",
                    help="skip the comparison runs with the warm start and the data cache off")
    args = ap.parse_args()
    if args.cells < 2:
        ap.error("--cells must be >= 2 (the first cell of a run pays its slot's start)")

    warm, cold = [], []
    with tempfile.TemporaryDirectory(prefix="qlora-ray-overhead-") as tmp:
        path = Path(tmp) / "overhead.yaml"
        path.write_text(yaml.safe_dump({**spec(args.cells, args.steps), "name": "overhead"}, sort_keys=False))
        for i in range(args.repeat):
            order = [(warm, {}), (cold, COLD)] if args.cold else [(warm, {})]
            for runs, env in order if i % 2 == 0 else order[::-1]:
                runs.append(measure(path, Path(tmp), env))
            print(f"repeat {i + 1}: overhead {warm[-1]['overhead_s']:.2f} s per cell"
                  + (f" (cold {cold[-1]['overhead_s']:.2f} s)" if cold else ""), file=sys.stderr, flush=True)

    def median_of(runs: list[dict], key: str) -> float:
        return round(statistics.median(c[key] for r in runs for c in r["cells"]), 3)

    value = median_of(warm, "overhead_s")
    share = value / CELL_S
    parts = ("scheduling_s", "process_start_s", "setup_s", "data_s", "rest_s", "collect_write_s")
    return report(
        "overhead", round(value, 2), "seconds per cell", f"<= {TARGET_SHARE:.0%} of a {CELL_S:.0f} s cell "
        f"(<= {TARGET_SHARE * CELL_S:.1f} s)", share <= TARGET_SHARE,
        share_of_60s_cell=round(share, 4), cells=args.cells, steps=args.steps, repeats=args.repeat,
        overhead_runs_s=[round(r["overhead_s"], 3) for r in warm],
        parts_median_s={p: median_of(warm, p) for p in parts},
        cold=None if not cold else {
            "overhead_s": median_of(cold, "overhead_s"),
            "share_of_60s_cell": round(median_of(cold, "overhead_s") / CELL_S, 4),
            "overhead_runs_s": [round(r["overhead_s"], 3) for r in cold],
            "parts_median_s": {p: median_of(cold, p) for p in parts}},
        runs=warm, cold_runs=cold,
    )


if __name__ == "__main__":
    sys.exit(main())
