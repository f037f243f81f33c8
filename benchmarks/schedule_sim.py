"""Scheduling at scale, simulated (issue 11 item 5): makespan against the lower bound.

    .venv/bin/python benchmarks/schedule_sim.py [--cells 1000] [--cluster T4=8,L4=4,A100-80G=2]
        [--noise 0.25] [--repeat 5]

1,000 cells of a mixed grid (five models from TinyLlama to Llama-2-13B, four ranks, four
micro-batches, one to three epochs, three sequence lengths, on T4, L4 and A100-80G) are planned by the real
planner (`plan_spec`, config.json fixtures, the shipped dataset). Each cell then holds its
GPU for its predicted whole-cell time (`predicted_gpu_seconds`: setup, load, train, eval),
times a log-normal error (sigma `--noise`, one draw per cell and repeat: predictions are
not exact, and the driver orders by its prediction, not by the truth).

The driver's own code decides what is submitted when: `driver.Cell` objects, ordered
and released by `dispatch.Dispatcher` exactly as `driver.run_cells` does. Only Ray is
replaced, by a discrete-event clock that starts the submitted tasks of one GPU type in
submission order whenever a card of that type is free (what Ray does: the owner keeps one
queue per scheduling class and leases workers for it front first,
src/ray/core_worker/task_submission/normal_task_submitter.cc, Ray 2.60).

The bound: cells are pinned to their GPU type, so no schedule beats, for any type,
max(sum of its cells' times / its cards, its longest cell). Reported: makespan / bound
(median over `--repeat` error draws) for the driver's order, and for spec order (what
submission without the sort gives) as the reference. Target: <= 1.05.
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _result import report

from qlora_ray.dispatch import Dispatcher

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "fixtures" / "configs"
TARGET = 1.05
MODELS = ["TinyLlama/TinyLlama-1.1B-Chat-v1.0", "meta-llama/Llama-3.2-3B", "mistralai/Mistral-7B-v0.1",
          "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-2-13b-hf"]


def grid_spec(gpus: list[str]) -> dict[str, Any]:
    return {
        "name": "schedule-sim",
        "base": {"model": MODELS[0], "quant": {"compute_dtype": "auto"},
                 "dataset": {"path": str(ROOT / "experiments/data/fin_sentiment.jsonl"), "eval_size": 64}},
        "grid": {"model": MODELS, "lora.r": [8, 16, 32, 64], "train.batch_size": [1, 2, 4, 8],
                 "train.epochs": [1, 2, 3], "train.max_seq_len": [128, 256, 512], "gpu": gpus},
    }


def planned_cells(n: int, gpus: list[str]) -> list[Any]:
    """`n` runnable cells of the grid as the driver holds them (spec order, every GPU type kept)."""
    from qlora_ray.driver import Cell
    from qlora_ray.grid import load_spec
    from qlora_ray.planner import TIME_KEYS, plan_spec

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sim.yaml"
        path.write_text(yaml.safe_dump(grid_spec(gpus), sort_keys=False))
        plans = plan_spec(load_spec(path), model_configs=[CONFIGS])
    runnable = [p for p in plans if not p.problems and p.time is not None]
    if len(runnable) < n:
        raise SystemExit(f"the grid has only {len(runnable)} runnable cells, asked for {n}")
    # An even stride keeps the mix of models and GPU types of the whole grid.
    picked = [runnable[i * len(runnable) // n] for i in range(n)]
    cells = []
    for p in picked:
        j = p.to_json()
        cells.append(Cell(p.config, p.experiment_id, p.batch_size, p.predicted_peak_bytes, p.profile,
                          predicted={k: j[k] for k in TIME_KEYS}))
    return cells


class ClockRay:
    """Ray replaced by a clock: per GPU type, a FIFO of submitted tasks and a number of cards."""

    def __init__(self, cards: dict[str, int], truth: dict[str, float]) -> None:
        self.free = dict(cards)
        self.queues: dict[str, deque[Any]] = {g: deque() for g in cards}
        self.truth = truth  # experiment_id -> seconds the cell really holds its card
        self.now = 0.0
        self.events: list[tuple[float, int, Any]] = []
        self.seq = 0

    def submit(self, cell: Any) -> None:
        self.queues[cell.config.gpu].append(cell)
        self._start(cell.config.gpu)

    def _start(self, gpu: str) -> None:
        while self.free[gpu] and self.queues[gpu]:
            cell = self.queues[gpu].popleft()
            self.free[gpu] -= 1
            self.seq += 1
            heapq.heappush(self.events, (self.now + self.truth[cell.experiment_id], self.seq, cell))

    def wait_one(self) -> Any:
        self.now, _, cell = heapq.heappop(self.events)
        self.free[cell.config.gpu] += 1
        self._start(cell.config.gpu)
        return cell


def simulate(cells: list[Any], cards: dict[str, int], truth: dict[str, float],
             max_parallel: int | None, order: bool = True) -> float:
    """The driver's submit / wait loop (driver.run_cells) against ClockRay; the makespan."""
    ray = ClockRay(cards, truth)
    # Spec order as the reference: every cell the same prediction, so the stable sort keeps it.
    pending = (Dispatcher(cells, max_parallel=max_parallel) if order
               else Dispatcher(cells, max_parallel=max_parallel, seconds=lambda c: 0.0))
    running: set[str] = set()
    while len(pending) or running:
        for cell in pending.release(len(running)):
            ray.submit(cell)
            running.add(cell.experiment_id)
        running.discard(ray.wait_one().experiment_id)
    return ray.now


def lower_bound(cells: list[Any], cards: dict[str, int], truth: dict[str, float]) -> float:
    bound = 0.0
    for gpu, n in cards.items():
        times = [truth[c.experiment_id] for c in cells if c.config.gpu == gpu]
        if times:
            bound = max(bound, sum(times) / n, max(times))
    return bound


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=1000)
    ap.add_argument("--cluster", default="T4=8,L4=4,A100-80G=2", help="GPU type=cards, comma-separated")
    ap.add_argument("--noise", type=float, default=0.25, help="sigma of the log-normal prediction error")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    cards = {k: int(v) for k, v in (item.split("=") for item in args.cluster.split(","))}

    cells = planned_cells(args.cells, list(cards))
    runs: dict[str, list[float]] = {"driver": [], "spec_order": [], "driver_max_parallel": []}
    makespans, bounds = [], []
    for seed in range(args.repeat):
        rng = random.Random(seed)
        truth = {c.experiment_id: c.predicted["predicted_gpu_seconds"] * rng.lognormvariate(0, args.noise)
                 for c in cells}
        bound = lower_bound(cells, cards, truth)
        span = simulate(cells, cards, truth, None)
        makespans.append(span)
        bounds.append(bound)
        runs["driver"].append(span / bound)
        runs["spec_order"].append(simulate(cells, cards, truth, None, order=False) / bound)
        runs["driver_max_parallel"].append(simulate(cells, cards, truth, sum(cards.values())) / bound)
    exact = {c.experiment_id: c.predicted["predicted_gpu_seconds"] for c in cells}
    exact_ratio = simulate(cells, cards, exact, None) / lower_bound(cells, cards, exact)

    value = statistics.median(runs["driver"])
    per_gpu = {g: sum(1 for c in cells if c.config.gpu == g) for g in cards}
    return report(
        "schedule_sim", round(value, 4), "makespan / lower bound", f"<= {TARGET}", value <= TARGET,
        cells=len(cells), cluster=cards, cells_per_gpu=per_gpu, noise_sigma=args.noise, repeats=args.repeat,
        ratio_runs=[round(x, 4) for x in runs["driver"]],
        ratio_exact_predictions=round(exact_ratio, 4),
        ratio_spec_order_median=round(statistics.median(runs["spec_order"]), 4),
        ratio_max_parallel_equal_to_cards_median=round(statistics.median(runs["driver_max_parallel"]), 4),
        makespan_hours_median=round(statistics.median(makespans) / 3600, 3),
        bound_hours_median=round(statistics.median(bounds) / 3600, 3),
        cell_seconds_min_median_max=[round(f(exact.values()), 1) for f in (min, statistics.median, max)],
    )


if __name__ == "__main__":
    sys.exit(main())
