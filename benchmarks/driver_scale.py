"""Driver at scale (issue 11 item 6): peak RSS under 500 MB and flat in N, < 20 ms per cell.

    flock /tmp/qlora-ray-ray.lock .venv/bin/python benchmarks/driver_scale.py [--cells 1000 10000]
        [--repeat 3]

Runs `qlora-ray run` (a fresh driver process, the embedded Ray, `--num-cpus 4`; it starts
Ray, so on the shared machine it runs under the Ray lock) on grids of N no-op cells: with the test
hook QLORA_RAY_TEST_NOOP_CELLS=1 (tasks.NOOP_CELLS_ENV) each cell returns an `ok` row
and four samples at once, so what is measured is the driver:
planning, submitting, collecting, writing every row and its samples to Parquet, progress.
The cells are the built-in tiny Llama on the shipped data, one per `seeds` value.

Measured on the driver process alone (not Ray's daemons), from /proc/PID/status and
/proc/PID/stat, polled every 0.1 s: its peak RSS (VmHWM) and its CPU time. The per-cell
cost is the marginal one, (CPU at the largest N - CPU at the smallest N) / (difference in
N), so the fixed start-up (imports, Ray start, planning set-up) is not spread over the
cells; the rows written are counted, and so are the cells named in their task's log (every
task of a run has the same Ray name; the log's first line names the cell). Largest and
smallest N alternate within each repeat; medians of `--repeat`. Targets: peak RSS < 500 MB
at every N; flat in N: the peak grows by at most 5.5 KB per cell from the smallest to the
largest N (49.5 MB from 1,000 to 10,000 cells, a tenth of the budget); marginal CPU per
cell < 20 ms.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _result import report

ROOT = Path(__file__).resolve().parents[1]
RSS_BUDGET_MB = 500.0
# "Flat": what one more cell adds to the peak, (peak at the largest N - at the smallest) /
# (difference in N). The driver holds its grid (each cell's config, predictions and summary
# columns, a few KB), so not zero; before issue 11 item 6 it was ~41 KB.
GROWTH_BUDGET_KB_PER_CELL = 5.5
CELL_BUDGET_MS = 20.0
TICKS = os.sysconf("SC_CLK_TCK")


def spec(n: int) -> dict:
    return {
        "name": f"driver-scale-{n}",
        "base": {"model": "builtin:tiny-llama",
                 "dataset": {"path": str(ROOT / "experiments/data/fin_sentiment.jsonl"), "eval_size": 16}},
        "seeds": list(range(n)),
    }


def _sample(pid: int) -> tuple[float, float] | None:
    """(peak RSS MB, CPU seconds) of one process, or None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
    if hwm is None:  # exiting (a zombie has no memory left to report)
        return None
    fields = stat.rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15 of proc(5))
    return hwm / 1024, cpu


def run_driver(n: int, tmp: Path) -> dict[str, float]:
    path = tmp / f"scale-{n}.yaml"
    path.write_text(yaml.safe_dump(spec(n), sort_keys=False))
    results = tmp / f"results-{n}-{time.monotonic_ns()}"
    # Ray's session folder under the short temp path (AF_UNIX socket paths are <= 107 bytes),
    # one per run, so this run's task logs are the ones counted.
    ray_tmp = tmp / f"r{len(list(tmp.glob('r*')))}"
    env = dict(os.environ, QLORA_RAY_TEST_NOOP_CELLS="1", RAY_ADDRESS="", RAY_TMPDIR=str(ray_tmp))
    cmd = [str(Path(sys.executable).with_name("qlora-ray")), "run", str(path), "--results", str(results),
           "--num-cpus", "4", "--max-cells", str(n)]
    log = (tmp / f"driver-{n}.log").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    last = (0.0, 0.0)
    while proc.poll() is None:
        last = _sample(proc.pid) or last
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    log.close()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}; see {log.name}:\n"
                         + Path(log.name).read_text()[-3000:])
    rows = len(list((results / spec(n)["name"] / "runs").glob("*.parquet")))
    samples = len(list((results / spec(n)["name"] / "samples").glob("*.parquet")))
    if rows != n or samples != n:
        raise SystemExit(f"N={n}: {rows} rows and {samples} sample files written, expected {n} each")
    named = _cells_named_in_task_logs(ray_tmp)
    if named != n:
        raise SystemExit(f"N={n}: {named} cells named in their tasks' logs under {ray_tmp}, expected {n}")
    return {"peak_rss_mb": last[0], "cpu_s": last[1], "wall_s": wall, "cells_named_in_task_logs": named}


def _cells_named_in_task_logs(ray_tmp: Path) -> int:
    """Distinct cells named by the first line of their task's log (tasks.experiment_task),
    in the worker logs that `ray logs task --id` reads."""
    line = re.compile(r"^qlora-ray: cell (\S+) \(experiment ", re.M)
    return len({m.group(1) for path in ray_tmp.glob("ray/session_*/logs/worker-*.out")
                for m in line.finditer(path.read_text(errors="replace"))})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    sizes = sorted(args.cells)
    small, large = sizes[0], sizes[-1]

    runs: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
    with tempfile.TemporaryDirectory(prefix="qlora-ray-scale-") as tmp:
        for i in range(args.repeat):
            for n in sizes if i % 2 == 0 else reversed(sizes):
                runs[n].append(run_driver(n, Path(tmp)))
                print(f"repeat {i + 1}: N={n}: {runs[n][-1]}", file=sys.stderr, flush=True)

    def med(n: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[n])

    pairs = list(zip(runs[small], runs[large], strict=True))
    per_cell_ms = [(b["cpu_s"] - a["cpu_s"]) / (large - small) * 1000 for a, b in pairs]
    wall_ms = [(b["wall_s"] - a["wall_s"]) / (large - small) * 1000 for a, b in pairs]
    peak = max(med(n, "peak_rss_mb") for n in sizes)
    growth = med(large, "peak_rss_mb") - med(small, "peak_rss_mb")
    growth_kb = growth * 1024 / (large - small)
    cell_ms = statistics.median(per_cell_ms)
    met = peak < RSS_BUDGET_MB and growth_kb <= GROWTH_BUDGET_KB_PER_CELL and cell_ms < CELL_BUDGET_MS
    return report(
        "driver_scale", round(cell_ms, 2), "ms driver CPU per cell (marginal)",
        f"< {CELL_BUDGET_MS} ms per cell, peak RSS < {RSS_BUDGET_MB:.0f} MB, flat: peak RSS growth "
        f"{small}->{large} cells <= {GROWTH_BUDGET_KB_PER_CELL} KB per cell", met,
        peak_rss_mb={n: round(med(n, "peak_rss_mb"), 1) for n in sizes},
        rss_growth_mb=round(growth, 1), rss_growth_kb_per_cell=round(growth_kb, 2),
        cells_named_in_task_logs={n: [r["cells_named_in_task_logs"] for r in runs[n]] for n in sizes},
        driver_cpu_s={n: round(med(n, "cpu_s"), 2) for n in sizes},
        driver_wall_s={n: round(med(n, "wall_s"), 1) for n in sizes},
        per_cell_cpu_ms_runs=[round(x, 2) for x in per_cell_ms],
        per_cell_wall_ms_median=round(statistics.median(wall_ms), 2),
        repeats=args.repeat, runs={n: runs[n] for n in sizes},
    )


if __name__ == "__main__":
    sys.exit(main())
