"""Which cell the `run` driver submits next: longest predicted first, under `--max-parallel`.

Pure (no Ray, no clock), so the driver and benchmarks/schedule_sim.py run the same code;
docs/time.md ("In the run and the report") says why longest first.
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
