"""The `run` driver's loop: submit cells to Ray, wait, write each row as its task returns.

It also requeues an OOM back-off that needs a fresh process, and turns a cell no node can
run into an `unschedulable` row (docs/cluster.md, "How `run` uses Ray").
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from qlora_ray.config import ExperimentConfig
from qlora_ray.connect import connect, stop_embedded
from qlora_ray.dispatch import Dispatcher
from qlora_ray.grid import Spec
from qlora_ray.progress import SUMMARY_KEYS, Progress
from qlora_ray.record import driver_row
from qlora_ray.resume import RowWriter
from qlora_ray.tasks import (
    accelerator_type,
    feasible,
    remote_functions,
    requirement,
    task_options,
    task_payload,
)

DEFAULT_UNSCHEDULABLE_TIMEOUT = 600.0
# How often the driver looks at the nodes and the autoscaler's report (which its monitor
# refreshes every 5 s, AUTOSCALER_UPDATE_INTERVAL_S).
NODE_CHECK_INTERVAL_S = 2.0
PROGRESS_INTERVAL_S = 1.0
# Cells of one resource shape (GPU type, or CPU) out at Ray at once, at most: Ray's owner (this
# process) keeps every submitted task until it returns, and its memory does not shrink after
# (docs/performance.md, item 6). Far above the slots of one card type, so Ray and the
# autoscaler see a long queue of each type all the same.
SUBMIT_WINDOW = 1000


# One tuple of column names per distinct set of them (in practice one per run).
_SHARED_KEYS: dict[tuple[str, ...], tuple[str, ...]] = {}


class Predicted(Mapping[str, Any]):
    """A cell's predicted columns, read-only: the values of one cell, the keys shared by all.

    A driver holds one per cell for the whole run; a dict of the planner's 22 columns is
    ~830 bytes, this ~270 (docs/performance.md, item 6).
    """

    __slots__ = ("_keys", "_values")

    def __init__(self, columns: Mapping[str, Any] | None = None) -> None:
        columns = columns or {}
        keys = tuple(columns)
        self._keys = _SHARED_KEYS.setdefault(keys, keys)
        self._values = tuple(columns.values())

    def __getitem__(self, key: str) -> Any:
        try:
            return self._values[self._keys.index(key)]
        except ValueError:
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(slots=True)
class Cell:
    """One experiment on its way through the driver (slots: 10,000 of them live through a run)."""

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
    # The planner's memory, time and cost columns, copied into the row.
    predicted: Mapping[str, Any] = field(default_factory=Predicted)

    def __post_init__(self) -> None:
        if not isinstance(self.predicted, Predicted):
            self.predicted = Predicted(self.predicted)

    @property
    def predicted_seconds(self) -> float:
        return self.predicted.get("predicted_seconds") or 0.0


def run_cells(
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
    embedded = connect(address, num_cpus=num_cpus)
    from qlora_ray.cluster import NodeWaits

    waits = NodeWaits(unschedulable_timeout, DEFAULT_UNSCHEDULABLE_TIMEOUT, embedded=embedded is not None)
    gpu_task, cpu_task, tracker_cls = remote_functions(max_retries)
    tracker = tracker_cls.remote()
    rows: dict[str, dict[str, Any]] = {}
    pending = Dispatcher(todo, max_parallel=max_parallel, window=SUBMIT_WINDOW, shape=_shape)
    running: dict[Any, Cell] = {}
    progress = Progress(len(todo), out)
    interrupted = False
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)  # `ray job stop`
    try:
        while len(pending) or running:
            for cell in pending.release(len(running)):
                cell.resources = requirement(cell.profile, cpus_per_task, cell.config.emulate_profile)
                task = gpu_task if "GPU" in cell.resources else cpu_task
                cell.ref = task.options(**task_options(cell, spec.name, cpus_per_task)).remote(
                    task_payload(cell, spec, results, allow_cpu_fallback, cpus_per_task, cwd), tracker)
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
                # A live ObjectRef pins the task's result (row and samples) in this process;
                # the Cell lives on in the run's list, so it must not keep one.
                cell.ref = None
                if retry_steps is not None:
                    # An OOM back-off that must not reuse the failed process (the worker says
                    # why in the row's error): the same cell again, in a fresh one.
                    print(f"  {cell.config.name}: {row['error'][:200]}", file=out, flush=True)
                    cell.backoff_steps = retry_steps
                    pending.requeue(cell)
                    continue
                pending.finished(cell)
                row.update(cell.predicted)
                writer.write(row, samples)
                # The summary's columns only: the full rows are on disk, and a driver that kept
                # them all would grow with the grid.
                rows[cell.experiment_id] = {k: row.get(k) for k in SUMMARY_KEYS}
                progress.finished(row)
            writer.retry()

            for cell in _expire_unschedulable(running, rows, spec, writer, waits, progress):
                pending.finished(cell)
            if time.monotonic() >= progress.next_show:
                # At most once a second: the tracker's answer and the counts grow with the grid.
                progress.next_show = time.monotonic() + PROGRESS_INTERVAL_S
                started = _safe_get(tracker.snapshot.remote()) or {}
                progress.show(running=sum(1 for c in running.values() if c.experiment_id in started),
                              queued=len(pending) + sum(1 for c in running.values()
                                                        if c.experiment_id not in started))
    except KeyboardInterrupt:
        interrupted = True
        # No ray.cancel: the running tasks end with the job. Ray kills the worker processes of a
        # job whose driver has gone (an embedded Ray is shut down below), and each experiment's
        # process dies with its worker (fresh.py). A force-cancel raced a task's own reply in
        # Ray's owner (task_manager.cc CompletePendingTask, "Check failed: it !=
        # submissible_tasks_"), which aborted the driver: 1 of 3 clean-clone CI runs.
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
    row = driver_row(cell.config, cell.experiment_id, spec.name, status, error, cell.attempt,
                     cell.predicted_peak_bytes, cell.predicted)
    row["ray_task_id"] = ref.task_id().hex()  # the task whose log says how it died
    return row, [], None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:2000] if text else type(exc).__name__


def _expire_unschedulable(
    running: dict[Any, Cell],
    rows: dict[str, dict[str, Any]],
    spec: Spec,
    writer: RowWriter,
    waits: Any,
    progress: Progress,
) -> list[Cell]:
    """Give up on cells no node can run and none is coming for (`unschedulable` rows); returns them."""
    import ray

    from qlora_ray.cluster import unschedulable_reason

    now = time.monotonic()
    if now < waits.next_check or not running:
        return []
    waits.next_check = now + NODE_CHECK_INTERVAL_S
    nodes = ray.nodes()
    stuck = []
    for cell in running.values():
        if feasible(cell.resources, nodes):
            # Only queued behind others; if its node goes away later, its wait starts then.
            cell.waiting_since = now
        else:
            stuck.append(cell)
    if not stuck:
        return []
    view = waits.view()
    limit = waits.limit(view)
    expired = []
    for cell in stuck:
        if view.coming_for(cell.resources):
            cell.waiting_since = now  # the clock starts once nothing is coming for it
            continue
        if now - (cell.waiting_since or now) < limit or ray.wait([cell.ref], timeout=0)[0]:
            continue  # still within its wait, or it finished (its row is collected next round)
        ray.cancel(cell.ref, force=True)
        running.pop(cell.ref)
        error = unschedulable_reason(view, cell.resources, cell.config.gpu, limit)
        row = driver_row(cell.config, cell.experiment_id, spec.name, "unschedulable", error,
                         cell.attempt, cell.predicted_peak_bytes, cell.predicted)
        writer.write(row)
        rows[cell.experiment_id] = row
        progress.finished(row)
        expired.append(cell)
    return expired


def _shape(cell: Cell) -> str:
    """The resource shape a cell queues in at Ray: its card type, any GPU, or CPU slots."""
    if cell.profile is not None and cell.profile.is_gpu:
        return accelerator_type(cell.profile, cell.config.emulate_profile) or "GPU"
    return "CPU"


def _prebuild_builtin_models(cells: list[Cell]) -> None:
    """Build the local tiny model once here rather than in N workers racing for one lock."""
    names = {c.config.model.name for c in cells if c.config.model.name.startswith("builtin:")}
    if names:
        from qlora_ray.builtin import ensure_builtin

        for name in sorted(names):
            ensure_builtin(name)
