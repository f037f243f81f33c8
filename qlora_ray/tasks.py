"""What runs on Ray: the experiment task, its payload, and the resources a cell asks for.

One fresh process per experiment, GPU cells pinned to one card (docs/cluster.md, "How
`run` uses Ray", says why it is declared the way it is): the Ray worker process, reused
from task to task, forks it from a warm process that imported torch and transformers once
(fresh.py).
"""

from __future__ import annotations

import datetime as dt
import os
import time
from typing import TYPE_CHECKING, Any

from qlora_ray.config import ExperimentConfig, to_dict
from qlora_ray.results import make_row

if TYPE_CHECKING:
    from qlora_ray.driver import Cell
    from qlora_ray.grid import Spec

# Test hook, not a user option (docs/performance.md): set to 1, every cell returns an `ok`
# row at once without loading anything (in the Ray worker itself, no process of its own), so
# benchmarks/driver_scale.py measures the driver alone over 10,000 cells.
NOOP_CELLS_ENV = "QLORA_RAY_TEST_NOOP_CELLS"


class Tracker:
    """Tiny actor the tasks report their start to, so progress can tell running from queued."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}

    def start(self, experiment_id: str) -> None:
        self.started[experiment_id] = time.time()

    def snapshot(self) -> dict[str, float]:
        return dict(self.started)


def experiment_task(payload: dict[str, Any], tracker: Any) -> Any:
    """Runs in the Ray worker process: one experiment."""
    import ray

    # Ray sets CUDA_VISIBLE_DEVICES only for tasks that reserved a GPU: set_visible_accelerator_ids
    # (ray/_private/utils.py) skips an empty id list unless RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO
    # is set, so a CPU task on a GPU node sees every card, and torch would use GPU 0, which
    # Ray gave to another task. Hide them from the experiment's process.
    env = dict(os.environ)
    if not ray.get_runtime_context().get_accelerator_ids().get("GPU"):
        env["CUDA_VISIBLE_DEVICES"] = ""
    started = time.time()
    context = ray.get_runtime_context()
    name = payload["config"]["name"]
    # Every task of a run has the same Ray name (task_options says why). Ray titles the
    # task's process `ray::<task name>` while it runs and `ray::IDLE` after
    # (`_changeproctitle` in ray/_private/worker.py, with ray._raylet.setproctitle): the
    # title names the cell again, as it did when the task was named after it, so `ps`, `top`
    # and `nvidia-smi` on a node show which cell a process runs. And the first line of the
    # task's log (`ray logs task --id`, the dashboard's task log) says which cell it is.
    setproctitle = getattr(getattr(ray, "_raylet", None), "setproctitle", None)
    if setproctitle is not None:
        setproctitle(f"ray::qlora-ray:{name}")
    print(f"qlora-ray: cell {name} (experiment {payload['experiment_id']}, "
          f"attempt {payload['attempt']}, task {context.get_task_id()})", flush=True)
    tracker.start.remote(payload["experiment_id"])
    if payload.pop("noop", False):
        from qlora_ray.config import from_dict

        output = _noop_output(from_dict(ExperimentConfig, payload.pop("config")), payload)
        output.row.update(worker_pid=os.getpid(), cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES"))
    else:
        from qlora_ray import fresh

        # The experiment runs in a fresh process of its own, forked from a process that has
        # torch and transformers imported already (fresh.py says how and why), with this
        # task's environment: the GPU Ray gave it, or none. Relative dataset paths in a spec
        # are relative to where `run` was started; on the same machine the experiment
        # follows it there (payload["cwd"]; on a cluster, --working-dir does the same).
        output = fresh.run_in_fresh_process("qlora_ray.fresh:run_cell", {"payload": payload}, env)
        output.row.update(preloaded=fresh.preloaded(),
                          process_start_seconds=output.row["started_at"].timestamp() - started)
    output.row.update(ray_node_id=context.get_node_id(), ray_task_id=context.get_task_id())
    return output


def _noop_output(cfg: ExperimentConfig, payload: dict[str, Any]) -> Any:
    """The NOOP_CELLS_ENV cell: an `ok` row and four samples, as a real cell returns them."""
    from qlora_ray.worker import RunOutput

    now = dt.datetime.now(dt.timezone.utc)
    row = make_row(cfg, payload["experiment_id"], payload["spec_name"], payload["attempt"],
                   payload["predicted_peak_bytes"], status="ok", started_at=now, finished_at=now)
    samples = [{"experiment_id": payload["experiment_id"], "name": cfg.name, "phase": "after", "index": i,
                "prompt": "p", "reference": "r", "generated": "g"} for i in range(4)]
    return RunOutput(row, samples)


def remote_functions(max_retries: int) -> tuple[Any, Any, Any]:
    import ray

    # Declared (not just .options()) with num_gpus=1: one GPU per task, in
    # CUDA_VISIBLE_DEVICES. Ray's worker processes are reused (max_calls=0, Ray's "no
    # limit"; for GPU tasks it would default to 1, a new process per task): they never touch
    # CUDA, each experiment runs in a fresh process of its own (fresh.py), and a reused
    # worker keeps the warm process it forks them from.
    gpu_task = ray.remote(num_gpus=1, max_calls=0, max_retries=max_retries)(experiment_task)
    cpu_task = ray.remote(num_cpus=1, max_calls=0, max_retries=max_retries)(experiment_task)
    tracker = ray.remote(num_cpus=0)(Tracker)
    return gpu_task, cpu_task, tracker


def task_name(spec_name: str) -> str:
    """The Ray name of every task of a run: one per run, not per cell.

    Ray's owner (the driver) keeps a `ray_tasks` metric series per task name and state for
    as long as it runs: TaskManager's task counter records `{State, Name, IsRetry, Source}`
    on every change (src/ray/core_worker/task_manager.h, the TaskManager constructor's
    `task_counter_.SetOnChangeCallback`), and a series once recorded stays. A name per cell
    cost the driver ~10 KB per cell, most of its growth over a 10,000-cell grid
    (docs/performance.md, item 6: flat with one name, or with RAY_enable_metrics_collection=0).
    The cell is named in its task's log and the row has the task's id (`ray_task_id`).
    """
    return f"qlora-ray:{spec_name}"


def task_options(cell: Cell, spec_name: str, cpus_per_task: int) -> dict[str, Any]:
    """The `.options()` of a cell's task: its name, CPU slots and card type."""
    options: dict[str, Any] = {"num_cpus": cpus_per_task, "name": task_name(spec_name)}
    accelerator = accelerator_type(cell.profile, cell.config.emulate_profile)
    if accelerator:
        options["accelerator_type"] = accelerator
    return options


def accelerator_type(profile: Any, emulate: bool = False) -> str | None:
    """The card type a GPU cell asks Ray for. An `emulate_profile` cell asks for none: it
    exists to run on a bigger card than its profile (the worker caps memory to the profile,
    and refuses a card smaller than it), and Ray cannot ask for "at least this big"."""
    if profile is None or not profile.is_gpu or emulate:
        return None
    return profile.ray_accelerator_type


def requirement(profile: Any, cpus_per_task: int, emulate: bool = False) -> dict[str, float]:
    """The Ray resources a cell on `profile` asks for (`emulate`: its `emulate_profile`)."""
    if profile is not None and profile.is_gpu:
        req = {"GPU": 1.0, "CPU": float(cpus_per_task)}
        if accelerator_type(profile, emulate):
            req[f"accelerator_type:{accelerator_type(profile, emulate)}"] = 0.001
        return req
    return {"CPU": float(cpus_per_task)}


def feasible(req: dict[str, float], nodes: list[dict[str, Any]]) -> bool:
    """Could any live node ever run this (its totals, not what is free right now)?"""
    return any(
        node.get("Alive") and all(node.get("Resources", {}).get(k, 0) >= v for k, v in req.items())
        for node in nodes
    )


def task_payload(
    cell: Cell, spec: Spec, results: str, allow_cpu_fallback: bool, cpus: int, cwd: str
) -> dict[str, Any]:
    """What `experiment_task` gets: the keyword arguments of `worker.run_experiment`, and more."""
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
