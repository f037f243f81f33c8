"""What runs on Ray: the experiment task, its payload, and the resources a cell asks for.

One fresh worker process per experiment, GPU cells pinned to one card (docs/cluster.md,
"How `run` uses Ray", says why it is declared the way it is).
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
# row at once without loading anything, and worker processes are reused, so
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
    row = make_row(cfg, payload["experiment_id"], payload["spec_name"], payload["attempt"],
                   payload["predicted_peak_bytes"], status="ok", started_at=now, finished_at=now)
    samples = [{"experiment_id": payload["experiment_id"], "name": cfg.name, "phase": "after", "index": i,
                "prompt": "p", "reference": "r", "generated": "g"} for i in range(4)]
    return RunOutput(row, samples)


def remote_functions(max_retries: int) -> tuple[Any, Any, Any]:
    import ray

    # Declared (not just .options()) with num_gpus=1 and max_calls=1: a fresh process per
    # experiment, pinned to one GPU. CPU cells get max_calls=1 too, so no state leaks.
    # (No-op test cells load nothing, so they reuse processes: 0 is Ray's "no limit".)
    calls = 0 if os.environ.get(NOOP_CELLS_ENV) == "1" else 1
    gpu_task = ray.remote(num_gpus=1, max_calls=calls, max_retries=max_retries)(experiment_task)
    cpu_task = ray.remote(num_cpus=1, max_calls=calls, max_retries=max_retries)(experiment_task)
    tracker = ray.remote(num_cpus=0)(Tracker)
    return gpu_task, cpu_task, tracker


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
