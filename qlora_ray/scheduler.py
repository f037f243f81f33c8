"""`qlora-ray run`: fan a spec's cells out on Ray, one task per experiment, rows to Parquet.

The only module that drives Ray. Read top to bottom:

    run_spec -> plan -> resume filter -> connect -> submit / wait loop -> summary

* One Ray task per experiment. GPU cells use a remote function *declared* with
  `num_gpus=1` and `max_calls=1`, so every experiment gets a fresh worker process with
  exactly one GPU in CUDA_VISIBLE_DEVICES (Ray reuses worker processes when GPUs are only
  given through `.options()`, and a CUDA context would stick to the wrong card). The card
  type is asked for with `accelerator_type` (`emulate_profile` cells take any GPU). Cells
  without a `gpu` take CPU slots instead, with the node's GPUs hidden from them.
* An OOM back-off that cannot run in the failed process (bitsandbytes' paged optimizer
  state is never freed) comes back as a retry: the same cell, in a fresh process.
* Rows are written by the driver as each task returns, so a row exists the moment its
  experiment is done and results can live on any pyarrow filesystem.
* A cell whose resources no live node offers waits while the autoscaler is launching or
  setting up a node that would fit it (a cold GPU node takes many minutes), and becomes an
  `unschedulable` row after `--unschedulable-timeout` seconds with none coming. A cluster
  without an autoscaler cannot grow, so there it gives up at once (cluster.py reads the
  autoscaler's report).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from qlora_ray.config import ExperimentConfig, flatten, to_dict
from qlora_ray.dispatch import Dispatcher, submission_order
from qlora_ray.grid import DEFAULT_MAX_CELLS, Spec, load_spec
from qlora_ray.results import empty_row, make_row, redact
from qlora_ray.resume import RowWriter, check_writable, existing_rows
from qlora_ray.units import GIB, hms

RETRYABLE = ("oom", "failed", "unschedulable")
DEFAULT_UNSCHEDULABLE_TIMEOUT = 600.0
# How often the driver looks at the nodes and the autoscaler's report (which its monitor
# refreshes every 5 s, AUTOSCALER_UPDATE_INTERVAL_S).
NODE_CHECK_INTERVAL_S = 2.0
# Test hook, not a user option (docs/performance.md): set to 1, every cell returns an `ok`
# row at once without loading anything, and worker processes are reused, so
# benchmarks/driver_scale.py measures the driver alone over 10,000 cells.
NOOP_CELLS_ENV = "QLORA_RAY_TEST_NOOP_CELLS"
PROGRESS_INTERVAL_S = 1.0
# What the end-of-run summary and the exit code read of each row the driver keeps.
SUMMARY_KEYS = ("experiment_id", "name", "status", "error", "train_seconds", "peak_memory_bytes",
                "memory_source", "similarity_score", "similarity_score_before", "accuracy",
                "accuracy_majority")


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


@dataclass
class Cell:
    """One experiment on its way through the driver."""

    config: ExperimentConfig
    experiment_id: str
    batch_size: int
    predicted_peak_bytes: int | None
    profile: Any
    attempt: int = 1
    backoff_steps: int = 0  # OOM back-off steps a retry in a fresh process starts from
    submitted_at: float | None = None
    waiting_since: float | None = None  # since when no live or coming node could run it
    ref: Any = None
    resources: dict[str, float] = field(default_factory=dict)
    predicted: dict[str, Any] = field(default_factory=dict)
    """The planner's memory, time and cost columns, copied into the row."""

    @property
    def predicted_seconds(self) -> float:
        return self.predicted.get("predicted_seconds") or 0.0


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
            row = _driver_row(plan.config, plan.experiment_id, spec.name, "skipped",
                              "; ".join(plan.problems), attempt, plan.predicted_peak_bytes, predicted)
            writer.write(row)
            kept[plan.experiment_id] = row
            continue
        todo.append(Cell(plan.config, plan.experiment_id, plan.batch_size, plan.predicted_peak_bytes,
                         plan.profile, attempt, predicted=predicted))
    # Longest predicted first (dispatch.py says why; the scheduling simulation runs it too).
    todo = submission_order(todo)
    print(f"{spec.name}: {len(plans)} cells, {len(kept)} already have a row, {len(todo)} to run "
          f"-> {shown}/{spec.name}/runs/", file=out)

    rows = dict(kept)
    interrupted = False
    if todo:
        new_rows, interrupted = _run_cells(
            spec, todo, writer, results=results, address=address, max_parallel=max_parallel,
            allow_cpu_fallback=allow_cpu_fallback, unschedulable_timeout=unschedulable_timeout,
            cpus_per_task=cpus_per_task, max_retries=max_retries, num_cpus=num_cpus, cwd=cwd, out=out,
        )
        rows.update(new_rows)
    _flush(writer, out)
    ordered = [rows[p.experiment_id] for p in plans if p.experiment_id in rows]
    print_summary(ordered, out)
    print(f"results: {shown}/{spec.name}/runs/  (pandas.read_parquet reads the folder)", file=out)
    missing = len(plans) - len(ordered)
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


FLUSH_TRIES = (1.0, 2.0, 4.0, 8.0)
"""Seconds between the last tries to write rows that failed to write (a disk being freed)."""


def _flush(writer: RowWriter, out: Any) -> None:
    for pause in FLUSH_TRIES:
        if not writer.unwritten:
            return
        time.sleep(pause)
        writer.retry()


# --------------------------------------------------------------------------- Ray side


class _Tracker:
    """Tiny actor the tasks report their start to, so progress can tell running from queued."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}

    def start(self, experiment_id: str) -> None:
        self.started[experiment_id] = time.time()

    def snapshot(self) -> dict[str, float]:
        return dict(self.started)


def _task(payload: dict[str, Any], tracker: Any) -> Any:
    """Runs in the Ray worker process: one experiment."""
    import ray

    # Ray sets CUDA_VISIBLE_DEVICES only for tasks that reserved a GPU: set_visible_accelerator_ids
    # (ray/_private/utils.py) skips an empty id list unless RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO
    # is set, so a CPU task on a GPU node sees every card, and torch would use GPU 0, which
    # Ray gave to another task. Hide them before anything imports torch.
    if not ray.get_runtime_context().get_accelerator_ids().get("GPU"):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from qlora_ray.config import from_dict
    from qlora_ray.worker import run_experiment

    tracker.start.remote(payload["experiment_id"])
    # Relative dataset paths in a spec are relative to where `run` was started; on the same
    # machine the worker can follow it there (on a cluster, --working-dir does the same).
    cwd = payload.pop("cwd", None)
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    cfg = from_dict(ExperimentConfig, payload.pop("config"))
    output = _noop_output(cfg, payload) if payload.pop("noop", False) else run_experiment(cfg, **payload)
    output.row["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    output.row["worker_pid"] = os.getpid()
    return output


def _noop_output(cfg: ExperimentConfig, payload: dict[str, Any]) -> Any:
    """The NOOP_CELLS_ENV cell: an `ok` row and four samples, as a real cell returns them."""
    from qlora_ray.worker import RunOutput

    now = dt.datetime.now(dt.timezone.utc)
    row = empty_row()
    row.update(flatten(cfg))
    row.update(experiment_id=payload["experiment_id"], spec_name=payload["spec_name"], status="ok",
               attempt=payload["attempt"], predicted_peak_bytes=payload["predicted_peak_bytes"],
               started_at=now, finished_at=now)
    samples = [{"experiment_id": payload["experiment_id"], "name": cfg.name, "phase": "after", "index": i,
                "prompt": "p", "reference": "r", "generated": "g"} for i in range(4)]
    return RunOutput(row, samples)


def _remote_functions(max_retries: int) -> tuple[Any, Any, Any]:
    import ray

    # Declared (not just .options()) with num_gpus=1 and max_calls=1: a fresh process per
    # experiment, pinned to one GPU. CPU cells get max_calls=1 too, so no state leaks.
    # (No-op test cells load nothing, so they reuse processes: 0 is Ray's "no limit".)
    calls = 0 if os.environ.get(NOOP_CELLS_ENV) == "1" else 1
    gpu_task = ray.remote(num_gpus=1, max_calls=calls, max_retries=max_retries)(_task)
    cpu_task = ray.remote(num_cpus=1, max_calls=calls, max_retries=max_retries)(_task)
    tracker = ray.remote(num_cpus=0)(_Tracker)
    return gpu_task, cpu_task, tracker


def _connect(address: str | None, num_cpus: int | None) -> dict[str, str | None] | None:
    """Join a cluster (--address, $RAY_ADDRESS, or the job's own) or start an embedded one.

    Returns None when joining a cluster, else what `_private_token` changed in the
    environment (to restore after shutdown): the cluster is embedded and cannot grow.
    """
    import ray

    # Ray retries a task its memory monitor killed forever by default; an OOM must not be
    # retried unchanged, it becomes an `oom` row. The owner (this driver) reads this.
    os.environ.setdefault("RAY_task_oom_retries", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return None
    return start_embedded(num_cpus=num_cpus)


def start_embedded(*, num_cpus: int | None = None, log_to_driver: bool = True) -> dict[str, str | None]:
    """Start the embedded Ray of `run` and `doctor`: loopback only, token auth, no trace on disk.

    Returns what `_private_token` changed in the environment; `stop_embedded` puts it back.
    """
    import ray

    saved = _private_token()
    saved.update(_loopback_only())
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
    except BaseException:
        _restore(saved)
        raise
    return saved


def stop_embedded(saved: dict[str, str | None]) -> None:
    import ray

    ray.shutdown()
    _restore(saved)


AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
SINGLE_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _loopback_only() -> dict[str, str | None]:
    """Make the embedded Ray's node IP 127.0.0.1, so that every server of it listens on loopback.

    The GCS, raylet, workers and agents bind to loopback only when the node IP is exactly
    127.0.0.1 (gcs_server.cc, node_manager.cc: `node_ip_address == "127.0.0.1"`;
    dashboard/agent.py: `is_localhost(self.ip)`), but on Linux Ray turns 127.0.0.1 into the
    host's routable address (ray/_private/services.py, resolve_ip_for_localhost and
    get_node_ip_address) unless clusters are off, as Ray has them on macOS and Windows for
    the same reason. Off is what an embedded Ray is: one node that never grows.
    """
    from ray._private import ray_constants

    saved = {SINGLE_NODE: os.environ.get(SINGLE_NODE)}
    os.environ[SINGLE_NODE] = "0"  # Ray's child processes read it at import
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process has read it already (Ray 2.52-2.60)
    return saved


def _private_token() -> dict[str, str | None]:
    """Token authentication for the embedded Ray, with a token that never touches the disk.

    Left to itself, `ray.init()` turns token auth on only from Ray 2.59 and then saves its
    token to ~/.ray/auth_token, readable by everyone (default umask), where every later
    `ray start --head` finds it and turns token auth on, so the user's next plain
    `ray job submit` fails. Instead: token mode for every Ray we allow (>= 2.52, where token
    auth exists), and a fresh token in RAY_AUTH_TOKEN, which Ray reads before any file and
    which only the processes this driver starts inherit (/proc/PID/environ is readable by
    their owner alone). With the loopback node IP (`_loopback_only`) no other host reaches
    the embedded cluster; the token keeps other users of this machine out.
    """
    saved = {k: os.environ.get(k) for k in AUTH_VARIABLES}
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    _reload_ray_auth()
    return saved


def _restore(saved: dict[str, str | None]) -> None:
    from ray._private import ray_constants

    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _reload_ray_auth()
    if SINGLE_NODE in saved:  # what ray_constants computes at import, from the restored variable
        default = not ray_constants.IS_WINDOWS_OR_OSX
        ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(SINGLE_NODE, default)


def _reload_ray_auth() -> None:
    # Ray reads RAY_AUTH_MODE into its config and caches the token when ray is imported;
    # re-read both, as Ray's own ray/_private/authentication/authentication_token_setup.py
    # (_enable_token_auth, Ray 2.60) does after changing the mode. Both exist since 2.52.
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _accelerator_type(profile: Any, emulate: bool = False) -> str | None:
    """The card type a GPU cell asks Ray for. An `emulate_profile` cell asks for none: it
    exists to run on a bigger card than its profile (the worker caps memory to the profile,
    and refuses a card smaller than it), and Ray cannot ask for "at least this big"."""
    if profile is None or not profile.is_gpu or emulate:
        return None
    return profile.ray_accelerator_type


def _requirement(profile: Any, cpus_per_task: int, emulate: bool = False) -> dict[str, float]:
    """The Ray resources a cell on `profile` asks for (`emulate`: its `emulate_profile`)."""
    if profile is not None and profile.is_gpu:
        req = {"GPU": 1.0, "CPU": float(cpus_per_task)}
        if _accelerator_type(profile, emulate):
            req[f"accelerator_type:{_accelerator_type(profile, emulate)}"] = 0.001
        return req
    return {"CPU": float(cpus_per_task)}


def _feasible(req: dict[str, float], nodes: list[dict[str, Any]]) -> bool:
    """Could any live node ever run this (its totals, not what is free right now)?"""
    return any(
        node.get("Alive") and all(node.get("Resources", {}).get(k, 0) >= v for k, v in req.items())
        for node in nodes
    )


def _run_cells(
    spec: Spec,
    todo: list[Cell],
    writer: RowWriter,
    *,
    results: str,
    address: str | None,
    max_parallel: int | None,
    allow_cpu_fallback: bool,
    unschedulable_timeout: float | None,
    cpus_per_task: int,
    max_retries: int,
    num_cpus: int | None,
    cwd: str,
    out: Any,
) -> tuple[dict[str, dict[str, Any]], bool]:
    """Submit, wait, write; returns the rows written and whether the run was interrupted."""
    import ray

    _prebuild_builtin_models(todo)
    embedded = _connect(address, num_cpus)
    from qlora_ray.cluster import NodeWaits

    waits = NodeWaits(unschedulable_timeout, DEFAULT_UNSCHEDULABLE_TIMEOUT, embedded=embedded is not None)
    gpu_task, cpu_task, tracker_cls = _remote_functions(max_retries)
    tracker = tracker_cls.remote()
    rows: dict[str, dict[str, Any]] = {}
    pending = Dispatcher(todo, max_parallel=max_parallel)
    running: dict[Any, Cell] = {}
    progress = _Progress(len(todo), out)
    interrupted = False
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)  # `ray job stop`
    try:
        while len(pending) or running:
            for cell in pending.release(len(running)):
                cell.resources = _requirement(cell.profile, cpus_per_task, cell.config.emulate_profile)
                task = gpu_task if "GPU" in cell.resources else cpu_task
                options: dict[str, Any] = {"num_cpus": cpus_per_task,
                                           "name": f"qlora-ray:{cell.config.name}"}
                accelerator = _accelerator_type(cell.profile, cell.config.emulate_profile)
                if accelerator:
                    options["accelerator_type"] = accelerator
                cell.ref = task.options(**options).remote(
                    _payload(cell, spec, results, allow_cpu_fallback, cpus_per_task, cwd), tracker)
                cell.submitted_at = cell.waiting_since = time.monotonic()
                running[cell.ref] = cell

            done, rest = ray.wait(list(running), num_returns=1, timeout=1.0)
            if done and rest:
                # Whatever else has finished, in the same call: a wait over every running
                # cell per finished cell is quadratic over a 10,000-cell grid.
                done += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            for ref in done:
                cell = running.pop(ref)
                row, samples, retry_steps = _collect(ref, cell, spec)
                if retry_steps is not None:
                    # An OOM back-off that must not reuse the failed process (the worker says
                    # why in the row's error): the same cell again, in a fresh one.
                    print(f"  {cell.config.name}: {row['error'][:200]}", file=out, flush=True)
                    cell.backoff_steps = retry_steps
                    pending.requeue(cell)
                    continue
                row.update(cell.predicted)
                writer.write(row, samples)
                # The summary's columns only: the full rows are on disk, and a driver that kept
                # them all would grow with the grid.
                rows[cell.experiment_id] = {k: row.get(k) for k in SUMMARY_KEYS}
                progress.finished(row)
            writer.retry()

            _expire_unschedulable(running, rows, spec, writer, waits, progress)
            if time.monotonic() >= progress.next_show:
                # At most once a second: the tracker's answer and the counts grow with the grid.
                progress.next_show = time.monotonic() + PROGRESS_INTERVAL_S
                started = _safe_get(tracker.snapshot.remote()) or {}
                progress.show(running=sum(1 for c in running.values() if c.experiment_id in started),
                              queued=len(pending) + sum(1 for c in running.values()
                                                        if c.experiment_id not in started))
    except KeyboardInterrupt:
        interrupted = True
        for ref in running:
            ray.cancel(ref, force=True)
        print(f"\ninterrupted: cancelled {len(running)} running experiment(s); "
              f"{len(rows)} row(s) written this run stay valid", file=out)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        if embedded is not None:
            stop_embedded(embedded)
    return rows, interrupted


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _safe_get(ref: Any) -> Any:
    import ray

    try:
        return ray.get(ref, timeout=5)
    except Exception:
        return None


def _payload(
    cell: Cell, spec: Spec, results: str, allow_cpu_fallback: bool, cpus: int, cwd: str
) -> dict[str, Any]:
    return {
        "config": to_dict(cell.config),
        "experiment_id": cell.experiment_id,
        "spec_name": spec.name,
        "batch_size": cell.batch_size,
        "profile": cell.profile,
        "predicted_peak_bytes": cell.predicted_peak_bytes,
        "results": results,
        "allow_cpu_fallback": allow_cpu_fallback,
        "num_threads": cpus,
        "attempt": cell.attempt,
        "backoff_steps": cell.backoff_steps,
        "cwd": cwd,
        "noop": os.environ.get(NOOP_CELLS_ENV) == "1",
    }


def _collect(ref: Any, cell: Cell, spec: Spec) -> tuple[dict[str, Any], list[dict[str, Any]], int | None]:
    """The task's row, samples and back-off retry, or a row describing how the task died."""
    import ray
    from ray import exceptions as rex

    try:
        output = ray.get(ref)
        return output.row, output.samples, output.retry_backoff_steps
    except rex.TaskCancelledError:
        status, error = "failed", "cancelled"
    except rex.OutOfMemoryError as e:  # Ray's memory monitor killed the worker
        status, error = "oom", f"killed by Ray's memory monitor: {_first_line(e)}"
    except (rex.WorkerCrashedError, rex.NodeDiedError, rex.RayTaskError, rex.RayError) as e:
        status, error = "failed", f"{type(e).__name__}: {_first_line(e)}"
    return _driver_row(cell.config, cell.experiment_id, spec.name, status, error, cell.attempt,
                       cell.predicted_peak_bytes, cell.predicted), [], None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:2000] if text else type(exc).__name__


def _expire_unschedulable(
    running: dict[Any, Cell],
    rows: dict[str, dict[str, Any]],
    spec: Spec,
    writer: RowWriter,
    waits: Any,
    progress: _Progress,
) -> None:
    import ray

    from qlora_ray.cluster import unschedulable_reason

    now = time.monotonic()
    if now < waits.next_check or not running:
        return
    waits.next_check = now + NODE_CHECK_INTERVAL_S
    nodes = ray.nodes()
    stuck = []
    for cell in running.values():
        if _feasible(cell.resources, nodes):
            # Only queued behind others; if its node goes away later, its wait starts then.
            cell.waiting_since = now
        else:
            stuck.append(cell)
    if not stuck:
        return
    view = waits.view()
    limit = waits.limit(view)
    for cell in stuck:
        if view.coming_for(cell.resources):
            cell.waiting_since = now  # the clock starts once nothing is coming for it
            continue
        if now - (cell.waiting_since or now) < limit or ray.wait([cell.ref], timeout=0)[0]:
            continue  # still within its wait, or it finished (its row is collected next round)
        ray.cancel(cell.ref, force=True)
        running.pop(cell.ref)
        error = unschedulable_reason(view, cell.resources, cell.config.gpu, limit)
        row = _driver_row(cell.config, cell.experiment_id, spec.name, "unschedulable", error,
                          cell.attempt, cell.predicted_peak_bytes, cell.predicted)
        writer.write(row)
        rows[cell.experiment_id] = row
        progress.finished(row)


def _prebuild_builtin_models(cells: list[Cell]) -> None:
    """Build the local tiny model once here rather than in N workers racing for one lock."""
    names = {c.config.model.name for c in cells if c.config.model.name.startswith("builtin:")}
    if names:
        from qlora_ray.builtin import ensure_builtin

        for name in sorted(names):
            ensure_builtin(name)


# --------------------------------------------------------------------------- rows and output


def _driver_row(
    cfg: ExperimentConfig, experiment_id: str, spec_name: str, status: str, error: str,
    attempt: int, predicted_peak_bytes: int | None, predicted: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A row for a cell whose task never produced one (skipped, unschedulable, crashed)."""
    now = dt.datetime.now(dt.timezone.utc)
    row = make_row(cfg, experiment_id, spec_name, attempt, predicted_peak_bytes, status=status,
                   error=error, started_at=now, finished_at=now)
    row.update(predicted or {})  # the planner's columns (predicted_peak_bytes among them)
    return row


class _Progress:
    """One status line whenever the counts change (plain lines: readable in `ray job logs`)."""

    def __init__(self, total: int, out: Any):
        self.total = total
        self.out = out
        self.done = 0
        self.failed = 0
        self.durations: list[float] = []
        self.last = ""
        self.t0 = time.monotonic()
        self.next_show = 0.0

    def finished(self, row: dict[str, Any]) -> None:
        self.done += 1
        if row["status"] != "ok":
            self.failed += 1
        if row.get("started_at") and row.get("finished_at") and row["status"] == "ok":
            self.durations.append((row["finished_at"] - row["started_at"]).total_seconds())
        print(f"  [{self.done}/{self.total}] {row['name']}: {row['status']}"
              + (f" ({row['error'][:160]})" if row.get("error") else ""), file=self.out, flush=True)

    def show(self, running: int, queued: int) -> None:
        eta = ""
        if self.durations and (running or queued):
            mean = sum(self.durations) / len(self.durations)
            eta = f" · ETA ~{_hms(mean * (running + queued) / max(running, 1))}"
        line = (f"progress: {self.done}/{self.total} done ({self.failed} not ok) · {running} running · "
                f"{queued} pending{eta}")
        if line.split(" · ETA")[0] != self.last.split(" · ETA")[0]:
            print(line, file=self.out, flush=True)
            self.last = line


def _hms(seconds: float | None) -> str:
    return "-" if seconds is None else hms(seconds)


def print_summary(rows: list[dict[str, Any]], out: Any) -> None:
    header = ("name", "status", "train time", "peak GiB", "source", "similarity before -> after",
              "accuracy", "majority")
    lines = []
    for r in rows:
        peak = r.get("peak_memory_bytes")
        sim = r.get("similarity_score")
        before = r.get("similarity_score_before")
        acc = r.get("accuracy")
        majority = r.get("accuracy_majority")
        lines.append((
            r["name"], r["status"], _hms(r.get("train_seconds")),
            f"{peak / GIB:.2f}" if peak else "-", r.get("memory_source") or "-",
            (f"{before:.3f} -> " if before is not None else "") + (f"{sim:.3f}" if sim is not None else "-"),
            f"{acc:.2f}" if acc is not None else "-", f"{majority:.2f}" if majority is not None else "-",
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print("\n" + fmt.format(*header), file=out)
    print(fmt.format(*("-" * w for w in widths)), file=out)
    for line in lines:
        print(fmt.format(*line), file=out)
    for r in rows:
        if r["status"] != "ok" and r.get("error"):
            print(f"  {r['name']}: {r['status']}: {r['error'][:300]}", file=out)
