"""Which cell the `run` driver submits next: longest predicted first, under `--max-parallel`
and a window per resource shape.

Pure (no Ray, no clock), so the driver and benchmarks/schedule_sim.py run the same code;
docs/time.md ("In the run and the report") says why longest first.

At most `window` cells of one resource shape (a GPU type, or CPU) are out at Ray at once:
the driver's memory grows with every task it has submitted (docs/performance.md, item 6),
and a window per shape keeps one type's long queue from holding back another type.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable
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
    when there is no `--max-parallel` and no `window`, else as many as keep `running` at or
    under `max_parallel` and each shape's cells out (released, not yet `finished`) at or
    under `window`.
    """

    def __init__(self, cells: Iterable[T], *, max_parallel: int | None = None, window: int | None = None,
                 shape: Callable[[T], Hashable] = lambda cell: None,
                 seconds: Callable[[T], float | None] = _predicted) -> None:
        for name, value in (("max_parallel", max_parallel), ("window", window)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        self.max_parallel = max_parallel
        self.window = window
        self._shape = shape
        # One queue per shape, each in submission order; a cell's place in the whole order
        # decides which shape's head goes next.
        self._queues: dict[Hashable, deque[tuple[int, T]]] = {}
        for place, cell in enumerate(submission_order(cells, seconds)):
            self._queues.setdefault(shape(cell), deque()).append((place, cell))
        self._out: Counter[Hashable] = Counter()
        self._len = sum(len(q) for q in self._queues.values())

    def __len__(self) -> int:
        return self._len

    def finished(self, cell: T) -> None:
        """`cell` came back from Ray (a row, or given up on): its shape has room for one more."""
        self._out[self._shape(cell)] -= 1

    def requeue(self, cell: T) -> None:
        """Submit `cell` again, before the rest (an OOM back-off retried in a fresh process)."""
        self.finished(cell)
        self._queues.setdefault(self._shape(cell), deque()).appendleft((-1, cell))
        self._len += 1

    def release(self, running: int) -> list[T]:
        free = self._len if self.max_parallel is None else max(self.max_parallel - running, 0)
        out: list[T] = []
        while len(out) < free:
            heads = [(queue[0][0], n, key) for n, (key, queue) in enumerate(self._queues.items())
                     if queue and (self.window is None or self._out[key] < self.window)]
            if not heads:
                break
            key = min(heads)[2]  # (place, n) are unique: shapes themselves are never compared
            out.append(self._queues[key].popleft()[1])
            self._out[key] += 1
            self._len -= 1
        return out
