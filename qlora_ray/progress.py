"""What `run` prints: a line per finished cell, a progress line, the closing summary."""

from __future__ import annotations

import time
from typing import Any

from qlora_ray.table import table
from qlora_ray.units import GIB, hms

# What the end-of-run summary and the exit code read of each row the driver keeps.
SUMMARY_KEYS = ("experiment_id", "name", "status", "error", "train_seconds", "peak_memory_bytes",
                "memory_source", "similarity_score", "similarity_score_before", "accuracy",
                "accuracy_majority")


class Progress:
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
    print("\n" + "\n".join(table(header, lines)), file=out)
    for r in rows:
        if r["status"] != "ok" and r.get("error"):
            print(f"  {r['name']}: {r['status']}: {r['error'][:300]}", file=out)
