"""How long `qlora-ray plan` takes for a 1,000-cell grid (issue 5: about a second).

    .venv/bin/python benchmarks/plan_speed.py [--cells-per-gpu 100] [--repeat 5]

Plans a Llama-3.1-8B grid (10 ranks x 5 micro-batches x 2 dtypes x 10 GPU profiles, or
`auto` batches) from the config.json fixture, and reports:
  - cli: the whole `qlora-ray plan SPEC --json` in a fresh interpreter (imports included),
  - in-process: `load_spec` (expand + validate) and `plan_spec` separately,
and checks that neither torch nor Ray was imported. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "fixtures" / "configs"
GPUS = ["T4", "V100-32G", "A10G", "L4", "RTX-A6000", "L40S", "A100-40G", "A100-80G", "H100", "H200"]


def spec(batch_auto: bool) -> dict:
    grid = {
        "lora.r": [4, 8, 16, 24, 32, 48, 64, 96, 128, 256],
        "train.batch_size": ["auto"] if batch_auto else [1, 2, 4, 8, 16],
        "quant.compute_dtype": ["auto", "float16"],
        "gpu": GPUS,
    }
    if batch_auto:
        grid["train.max_seq_len"] = [256, 512, 1024, 2048, 4096]
    return {
        "name": "plan-speed",
        "base": {"model": "meta-llama/Llama-3.1-8B-Instruct", "eval": {"batch_size": 4},
                 "train": {"oom_backoff": True}},
        "grid": grid,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    from qlora_ray.grid import load_spec
    from qlora_ray.planner import plan_spec

    report: dict[str, object] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        for label, auto in (("fixed_batch", False), ("auto_batch", True)):
            path = Path(tmp) / f"{label}.yaml"
            path.write_text(yaml.safe_dump(spec(auto), sort_keys=False))
            expand_s, plan_s = [], []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                loaded = load_spec(path)
                t1 = time.perf_counter()
                plans = plan_spec(loaded, model_configs=[CONFIGS])
                t2 = time.perf_counter()
                expand_s.append(t1 - t0)
                plan_s.append(t2 - t1)
            cli_s = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                proc = subprocess.run(
                    [sys.executable, "-c",
                     "import sys, json; from qlora_ray.cli import main; rc = main(sys.argv[1:]); "
                     "print(json.dumps(sorted(m for m in ('torch', 'ray') if m in sys.modules)), "
                     "file=sys.stderr); sys.exit(rc)",
                     "plan", str(path), "--json", "--skip-unfit", "--model-configs", str(CONFIGS)],
                    capture_output=True, text=True, cwd=ROOT)
                cli_s.append(time.perf_counter() - t0)
                if proc.returncode != 0:
                    print(proc.stderr, file=sys.stderr)
                    return 1
            heavy = json.loads(proc.stderr.strip().splitlines()[-1])
            report[label] = {
                "cells": len(plans),
                "fit": sum(p.fits for p in plans),
                "expand_s_median": round(statistics.median(expand_s), 3),
                "plan_s_median": round(statistics.median(plan_s), 3),
                "cli_s_median": round(statistics.median(cli_s), 3),
                "cli_s_min": round(min(cli_s), 3),
                "heavy_modules_imported": heavy,
            }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
