"""Which cell the `run` driver submits next: the order and the `--max-parallel` gate.

Pure (no Ray, no clock), so the driver (`driver.run_cells`) and the scheduling
simulation (`benchmarks/schedule_sim.py`, which replaces Ray with a discrete-event clock)
run the same code.

Order: the longest predicted cell first. Ray starts the tasks of one resource shape
(one GPU type) in the order they were submitted, so submitting longest-first is the
classic LPT rule per GPU type: the long cells start at once and the short ones fill in
around them, instead of the grid ending on one long cell started last. The sort is
stable, so equal predictions keep the spec's order, and cells without a prediction go
last (they are usually CPU cells or models the time model does not know).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


def _predicted(cell: object) -> float | None:
    return getattr(cell, "predicted_seconds", None)


def submission_order(cells: Iterable[T], seconds: Callable[[T], float | None] = _predicted) -> list[T]:
    """`cells` longest predicted first; stable; cells without a prediction (None, 0) last."""
    return sorted(cells, key=lambda c: -(seconds(c) or 0.0))


class Dispatcher(Generic[T]):
    """The driver's queue of cells not yet handed to Ray.

    `release(running)` returns the cells to submit now, in submission order: all of them
    when there is no `--max-parallel`, else as many as keep `running` at or under it.
    """

    def __init__(self, cells: Iterable[T], *, max_parallel: int | None = None,
                 seconds: Callable[[T], float | None] = _predicted) -> None:
        if max_parallel is not None and max_parallel < 1:
            raise ValueError(f"max_parallel must be >= 1 or None, got {max_parallel}")
        self.max_parallel = max_parallel
        self._queue: deque[T] = deque(submission_order(cells, seconds))

    def __len__(self) -> int:
        return len(self._queue)

    def requeue(self, cell: T) -> None:
        """Submit `cell` again, before the rest (an OOM back-off retried in a fresh process)."""
        self._queue.appendleft(cell)

    def release(self, running: int) -> list[T]:
        free = len(self._queue) if self.max_parallel is None else max(self.max_parallel - running, 0)
        return [self._queue.popleft() for _ in range(min(free, len(self._queue)))]
