"""The driver's side of the results folder: check it, read what is there, write rows safely.

`run` uses these so that a grid survives what happens to long runs:

* `check_writable` writes (and removes) a probe file before Ray starts, so an unwritable
  folder, a missing bucket or a full disk is one clear error instead of a grid's worth
  of lost rows.
* `existing_rows` reads the rows a previous run left, names every file it cannot use, and
  moves rows written by qlora-ray 0.1.0 (whose ids depended on spelling) to their ids.
* `RowWriter` is the only way the driver writes a row: it never replaces an `ok` row,
  replaces (or removes) the previous attempt's samples, and keeps a row it could not
  write in memory, trying again until it is written or the run ends, when it says so.
"""

from __future__ import annotations

import errno
import sys
from typing import Any

from qlora_ray.config import ConfigError, problem
from qlora_ray.identity import legacy_experiment_id
from qlora_ray.results_io import (
    move_experiment,
    probe_write,
    read_run_rows,
    read_status,
    redact,
    remove_experiment,
    write_run,
    write_samples,
)

# errno -> what to do about it, for the probe's message
_FIXES = {
    errno.EACCES: "choose a folder you can write (or fix its permissions)",
    errno.EPERM: "choose a folder you can write (or fix its permissions)",
    errno.EROFS: "it is on a read-only file system: choose another --results",
    errno.ENOSPC: "the disk is full: free space there or choose another --results",
    errno.EDQUOT: "your disk quota is used up: free space or choose another --results",
    errno.ENOTDIR: "part of the path is a file, not a folder: choose another --results",
}


def check_writable(results: str, spec_name: str) -> None:
    """Raise ConfigError naming `--results` when a row-sized file cannot be written there."""
    try:
        probe_write(results, spec_name)
    except Exception as e:  # pyarrow raises OSError subclasses and ArrowException alike
        reason = scrub(f"{type(e).__name__}: {e}".splitlines()[0], results)
        fix = _FIXES.get(getattr(e, "errno", None) or _errno_in(str(e)),
                         "check the path or URI, that the bucket exists and that your credentials "
                         "may write it")
        raise ConfigError([problem("--results", redact(results), f"cannot be written ({reason})",
                                   fix)]) from None


def _errno_in(message: str) -> int | None:
    # pyarrow's local filesystem reports "... Detail: [errno 28] No space left on device".
    for code in _FIXES:
        if f"[errno {code}]" in message.lower():
            return code
    return None


def scrub(text: str, results: str) -> str:
    """`text` with any credentials of the `results` URI taken out."""
    shown = redact(results)
    return text if shown == results else text.replace(results, shown)


def existing_rows(results: str, spec_name: str, plans: list[Any], out: Any) -> dict[str, dict[str, Any]]:
    """experiment_id -> the row already written, for every cell of `plans` that has one."""
    bad: list[str] = []
    rows = read_run_rows(results, spec_name, bad)
    for message in bad:
        print(f"warning: skipped {scrub(message, results)}; if it was a cell's row, that cell runs "
              "again", file=sys.stderr)
    moved = 0
    for plan in plans:
        legacy = legacy_experiment_id(plan.config)
        if legacy is None or legacy == plan.experiment_id or legacy not in rows:
            continue
        old = rows.pop(legacy)
        current = rows.get(plan.experiment_id)
        if current is not None and (current["status"] == "ok" or old["status"] != "ok"):
            # A copy left by an interrupted move, or a later row of the cell: ok rows are kept.
            remove_experiment(results, spec_name, legacy)
        else:
            rows[plan.experiment_id] = move_experiment(results, spec_name, old, plan.experiment_id)
            moved += 1
    if moved:
        print(f"{moved} row(s) written by qlora-ray 0.1.0 moved to their current experiment ids "
              "(0.1.0's ids depended on how the spec was spelled)", file=out)
    return rows


class RowWriter:
    """Writes rows for one spec; holds on to any it could not write yet."""

    def __init__(self, results: str, spec_name: str, out: Any):
        self.results = results
        self.spec_name = spec_name
        self.out = out
        self.unwritten: dict[str, tuple[dict[str, Any], list[dict[str, Any]], str]] = {}

    def write(self, row: dict[str, Any], samples: list[dict[str, Any]] | None = None) -> None:
        eid = row["experiment_id"]
        try:
            self._write(row, samples or [])
        except Exception as e:  # a full disk, a lost bucket, a revoked credential: keep the row
            error = scrub(f"{type(e).__name__}: {e}".splitlines()[0], self.results)[:300]
            if eid not in self.unwritten:
                print(f"  could not write the row of {row['name']} ({error}); keeping it and "
                      "trying again", file=self.out, flush=True)
            self.unwritten[eid] = (row, samples or [], error)
        else:
            if self.unwritten.pop(eid, None) is not None:
                print(f"  wrote the row of {row['name']} on a later try", file=self.out, flush=True)

    def retry(self) -> None:
        """Try every row not written yet again."""
        for row, samples, _ in list(self.unwritten.values()):
            self.write(row, samples)

    def _write(self, row: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        if read_status(self.results, self.spec_name, row["experiment_id"]) == "ok":
            # Another driver on the same grid finished this cell meanwhile: ok rows are kept.
            print(f"  kept the ok row of {row['name']} that another run wrote; this run's "
                  f"{row['status']} result is not recorded", file=self.out, flush=True)
            return
        # Samples first (or the old ones removed): once the run row exists the cell is done.
        write_samples(self.results, self.spec_name, row["experiment_id"], samples)
        write_run(self.results, self.spec_name, row)
