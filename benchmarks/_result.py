"""The one results format every benchmark writes (issue 11).

`benchmarks/results/<name>.json` holds a benchmark's last figures: `name`, `value`,
`unit`, `target`, `met`, `command`, `measured_at`, `cpus`, the machine's load average
when it started and ended (the development machine is shared: a figure measured under
load says so), plus whatever else the benchmark needs to be read.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
LOAD_AT_START = os.getloadavg()


def command() -> str:
    """How this benchmark was started, as a line to paste (relative to the repository)."""
    script = os.path.relpath(sys.argv[0], RESULTS.parents[1])
    return " ".join([".venv/bin/python", shlex.quote(script), *map(shlex.quote, sys.argv[1:])])


def report(name: str, value: float, unit: str, target: str, met: bool, **extra: Any) -> int:
    """Print the figures as JSON, write them to results/<name>.json; the exit code (1: missed)."""
    out = {
        "name": name, "value": value, "unit": unit, "target": target, "met": bool(met),
        "command": command(),
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in LOAD_AT_START],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        **extra,
    }
    text = json.dumps(out, indent=1, default=str)
    print(text)
    # Smoke tests point this elsewhere, so they never overwrite the quoted figures.
    folder = Path(os.environ.get("QLORA_RAY_BENCH_RESULTS") or RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.json.tmp"
    tmp.write_text(text + "\n")
    tmp.replace(folder / f"{name}.json")
    return 0 if met else 1

