"""`qlora-ray run`: plan a spec, keep the rows it already has, run the rest on Ray.

    run_spec -> plan -> resume filter -> driver.run_cells -> summary

One Ray task per experiment (tasks.py), submitted and collected by the driver loop
(driver.py) on a cluster it joins or an embedded Ray (connect.py); each row is written to
Parquet the moment its experiment is done. docs/cluster.md tells the whole story.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from qlora_ray.dispatch import submission_order
from qlora_ray.driver import DEFAULT_UNSCHEDULABLE_TIMEOUT, Cell, run_cells
from qlora_ray.grid import DEFAULT_MAX_CELLS, load_spec
from qlora_ray.progress import print_summary
from qlora_ray.record import driver_row
from qlora_ray.results_io import redact
from qlora_ray.resume import RowWriter, check_writable, existing_rows

RETRYABLE = ("oom", "failed", "unschedulable")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="YAML grid spec, e.g. experiments/quickstart.yaml")
    p.add_argument("--results", default="results",
                   help="results root: a path or a pyarrow URI (file://, s3://, gs://); default: results")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--max-parallel", type=int, default=None,
                   help="at most this many experiments at once (default: as many as the cluster fits)")
    p.add_argument("--retry-failed", action="store_true",
                   help="rerun cells whose row is oom / failed / unschedulable (ok rows are always kept)")
    p.add_argument("--allow-cpu-fallback", action="store_true",
                   help="a GPU cell on a node without a CUDA device runs on the CPU instead of failing "
                        "(also QLORA_RAY_ALLOW_CPU_FALLBACK=1)")
    p.add_argument("--unschedulable-timeout", type=float, default=None,
                   help="seconds a cell may wait for a node type that no node has, with the autoscaler "
                        "launching none that fits, before it becomes an `unschedulable` row (default "
                        f"{DEFAULT_UNSCHEDULABLE_TIMEOUT:.0f} where an autoscaler can add nodes; 0 on a "
                        "fixed cluster and on the embedded Ray, which cannot grow)")
    p.add_argument("--cpus-per-task", type=int, default=1,
                   help="CPU slots per experiment; torch uses this many threads (default 1)")
    p.add_argument("--max-retries", type=int, default=2,
                   help="Ray retries of a task whose worker process or node died (default 2)")
    p.add_argument("--skip-unfit", action="store_true",
                   help="record cells the planner says cannot run as `skipped` rows instead of refusing")
    p.add_argument("--force", action="store_true",
                   help="run every cell, even those the planner says cannot run (one that runs out of "
                        "memory ends as an `oom` row: the measurement the planner could not make)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="embedded Ray only: CPU slots to offer (default: all cores)")
    p.add_argument("--max-cells", type=int, default=DEFAULT_MAX_CELLS, metavar="N",
                   help=f"refuse a spec that expands to more cells (default {DEFAULT_MAX_CELLS:,})")
    from qlora_ray.planner import add_planning_arguments

    add_planning_arguments(p)

def main(args: argparse.Namespace) -> int:
    return run_spec(
        args.spec, results=args.results, address=args.address, max_parallel=args.max_parallel,
        retry_failed=args.retry_failed, allow_cpu_fallback=args.allow_cpu_fallback,
        unschedulable_timeout=args.unschedulable_timeout, cpus_per_task=args.cpus_per_task,
        max_retries=args.max_retries, skip_unfit=args.skip_unfit, num_cpus=args.num_cpus,
        model_configs=args.model_configs, max_cells=args.max_cells, force=args.force,
        worst_case=args.worst_case, corrections=args.corrections,
    )


def run_spec(
    spec_path: str,
    *,
    results: str = "results",
    address: str | None = None,
    max_parallel: int | None = None,
    retry_failed: bool = False,
    allow_cpu_fallback: bool = False,
    unschedulable_timeout: float | None = None,
    cpus_per_task: int = 1,
    max_retries: int = 2,
    skip_unfit: bool = False,
    num_cpus: int | None = None,
    model_configs: list[str] | None = None,
    max_cells: int = DEFAULT_MAX_CELLS,
    force: bool = False,
    worst_case: bool = False,
    corrections: str | None = None,
    out: Any = None,
) -> int:
    """Run a spec; returns the exit code (0 when every cell has an `ok` row)."""
    from qlora_ray.datacheck import check_spec_datasets

    out = out or sys.stdout
    spec = load_spec(spec_path, max_cells=max_cells)  # every spec problem is raised here, before any work
    # Every local dataset read and checked once, here: a bad file is one error naming its
    # line, not a model load and a `failed` row in every cell.
    for note in check_spec_datasets(spec):
        print(f"note: {note}", file=out)
    # Pin down where we are before Ray starts: under `ray job submit` the working directory
    # is a package Ray may re-extract in place (another raylet on the same machine sharing
    # the session folder), after which this process's cwd no longer exists.
    cwd = os.getcwd()
    if "://" not in results:
        results = os.path.abspath(results)

    # Plan first: cells that cannot run as specified stop the run before Ray starts.
    from qlora_ray.planner import TIME_KEYS, load_corrections, plan_spec

    plans = plan_spec(spec, model_configs=model_configs or (), worst_case=worst_case,
                      corrections=load_corrections(corrections))
    unfit = [p for p in plans if p.problems]
    if unfit and not skip_unfit and not force:
        print(f"qlora-ray run: {len(unfit)} cell(s) cannot run as specified "
              "(fix the spec, pass --skip-unfit to record them as skipped, or --force to run them "
              "anyway):", file=sys.stderr)
        for p in unfit:
            print(f"  - {p.name}: {'; '.join(p.problems)}", file=sys.stderr)
        return 2
    if unfit and force:
        print(f"--force: running {len(unfit)} cell(s) the planner says cannot run as specified:",
              file=out)
        for p in unfit:
            print(f"  - {p.name}: {'; '.join(p.problems)}", file=out)
    check_writable(results, spec.name)  # an unwritable folder or a full disk fails here, not per row
    shown = redact(results).rstrip("/")  # never print a URI's credentials

    existing = existing_rows(results, spec.name, plans, out)
    writer = RowWriter(results, spec.name, out)
    todo: list[Cell] = []
    kept: dict[str, dict[str, Any]] = {}
    for plan in plans:
        prev = existing.get(plan.experiment_id)
        attempt = int(prev.get("attempt") or 0) + 1 if prev else 1
        predicted = plan.to_json()
        predicted = {**{k: predicted[k] for k in TIME_KEYS}, **plan.predictions()}
        # ok rows are always kept; oom / failed / unschedulable ones unless --retry-failed.
        if prev and (prev["status"] == "ok" or (prev["status"] in RETRYABLE and not retry_failed)):
            kept[plan.experiment_id] = prev
            continue
        if plan.problems and not force:
            row = driver_row(plan.config, plan.experiment_id, spec.name, "skipped",
                             "; ".join(plan.problems), attempt, plan.predicted_peak_bytes, predicted)
            writer.write(row)
            kept[plan.experiment_id] = row
            continue
        todo.append(Cell(plan.config, plan.experiment_id, plan.batch_size, plan.predicted_peak_bytes,
                         plan.profile, attempt, predicted=predicted))
    # Longest predicted first (dispatch.py says why; the scheduling simulation runs it too).
    todo = submission_order(todo)
    # Each cell has its predictions now; only the ids' order is needed later, and the
    # plans' breakdowns would stay in memory through a 10,000-cell run.
    ids = [p.experiment_id for p in plans]
    del plans, existing, unfit
    print(f"{spec.name}: {len(ids)} cells, {len(kept)} already have a row, {len(todo)} to run "
          f"-> {shown}/{spec.name}/runs/", file=out)

    rows = dict(kept)
    interrupted = False
    if todo:
        new_rows, interrupted = run_cells(
            spec, todo, writer, results=results, address=address, max_parallel=max_parallel,
            allow_cpu_fallback=allow_cpu_fallback, unschedulable_timeout=unschedulable_timeout,
            cpus_per_task=cpus_per_task, max_retries=max_retries, num_cpus=num_cpus, cwd=cwd, out=out,
        )
        rows.update(new_rows)
    _flush(writer, out)
    ordered = [rows[i] for i in ids if i in rows]
    print_summary(ordered, out)
    print(f"results: {shown}/{spec.name}/runs/  (pandas.read_parquet reads the folder)", file=out)
    missing = len(ids) - len(ordered)
    if missing:
        print(f"interrupted: {missing} cell(s) have no row yet; rerun the same command to resume",
              file=out)
    if writer.unwritten:
        print(f"NOT WRITTEN: {len(writer.unwritten)} finished cell(s) could not be written to {shown} "
              "(their results are above); fix the cause and rerun the same command: those cells run "
              "again", file=out)
        for row, _, error in writer.unwritten.values():
            print(f"  {row['name']}: {row['status']}: {error}", file=out)
        return 1
    if interrupted:
        return 130  # the shell's convention for "stopped by Ctrl-C"
    return 0 if not missing and all(r["status"] == "ok" for r in ordered) else 1


# Seconds between the last tries to write rows that failed to write (a disk being freed).
FLUSH_TRIES = (1.0, 2.0, 4.0, 8.0)


def _flush(writer: RowWriter, out: Any) -> None:
    for pause in FLUSH_TRIES:
        if not writer.unwritten:
            return
        time.sleep(pause)
        writer.retry()
