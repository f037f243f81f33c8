"""Units the planner, the driver and the report share: bytes in a GiB, durations as h:mm:ss."""

from __future__ import annotations

GIB = 1024**3


def hms(seconds: float) -> str:
    """Seconds as h:mm:ss (hours unbounded), rounded to the second."""
    s = round(float(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
