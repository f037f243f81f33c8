"""`qlora-ray calibrate RESULTS...`: learn corrections to the planner from rows run on GPUs.

    qlora-ray calibrate results/my-grid results/other-grid -o corrections.json
    qlora-ray plan SPEC --corrections corrections.json      # and `run ... --corrections`

The memory estimate is built from the mechanism and checked against the CPU harness, but
a GPU adds what the CPU cannot show (CUDA context, allocator slack, kernels), and a card
or model family may differ in ways nothing here models. Rows measured on a GPU say by how
much. For every (architecture family, GPU profile) with rows, the file keeps:

- `factor`: the median of measured / predicted training peak over the `ok` rows (the
  measured side is `peak_train_bytes`, the card's view of the training phase; the
  predicted side is the row's `predicted_train_bytes` with the correction it was planned
  with taken out, so recalibrating never compounds);
- raised, if needed, so that every `oom` row of the group is predicted at or above the
  card it ran out of (an OOM is a lower bound: it needed more than the card);
- `spread`: the largest relative deviation of an `ok` row from `factor` (at least
  MIN_SPREAD), which becomes the prediction's range (`factor x (1 +/- spread)`).

Groups fall back from (family, gpu) to (family, any gpu) to (any, gpu) to (any, any), so
one family's runs still inform a new card. CPU rows are ignored.

The file (JSON, `FORMAT_VERSION`):

    {"format": "qlora-ray-corrections", "version": 1, "created_at": ..., "sources": [...],
     "memory": {"llama/T4": {"factor": 1.07, "spread": 0.04, "ok_rows": 12, "oom_rows": 1},
                "llama/*": {...}, "*/T4": {...}, "*/*": {...}},
     "throughput": {}}

`throughput` is reserved for the time estimate's efficiency corrections (issue 12), which
the same command will write; readers ignore sections they do not know.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_ray.config import ConfigError, problem

FORMAT = "qlora-ray-corrections"
FORMAT_VERSION = 1
# A correction is never trusted to better than this (a card's context and fragmentation
# move a few percent from run to run).
MIN_SPREAD = 0.03
ANY = "*"


@dataclass(frozen=True)
class Correction:
    factor: float
    spread: float
    ok_rows: int
    oom_rows: int
    # The group it came from, e.g. `llama/T4` or `*/*`.
    key: str


@dataclass(frozen=True)
class Corrections:
    """A loaded corrections file: `lookup(family, gpu)` finds the most specific memory group,
    `factors(cfg, arch, profile)` the time estimate's efficiency (timing.Factors)."""

    memory: dict[str, Correction]
    path: str | None = None
    throughput: dict[str, dict[str, Any]] = field(default_factory=dict)

    def lookup(self, family: str, gpu: str | None) -> Correction | None:
        gpu = gpu or ANY
        for key in (f"{family}/{gpu}", f"{family}/{ANY}", f"{ANY}/{gpu}", f"{ANY}/{ANY}"):
            if key in self.memory:
                return self.memory[key]
        return None

    def factors(self, cfg: Any, arch: Any, profile: Any) -> Any:
        from qlora_ray.timing import Factors, efficiency_keys

        gpu = None if profile is None or not profile.is_gpu else profile.name
        for key in efficiency_keys(arch.family, gpu, cfg.quant.bits):
            if key in self.throughput:
                return Factors(train_efficiency=float(self.throughput[key]["efficiency"]), source=key)
        return Factors()


def load(path: str | Path) -> Corrections:
    """Read a corrections file; a missing or malformed one is a ConfigError naming it."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError([problem("--corrections", str(p), f"cannot be read ({e})",
                                   "pass a file written by `qlora-ray calibrate`")]) from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError([problem("--corrections", str(p), f"is not a {FORMAT} file",
                                   "pass a file written by `qlora-ray calibrate`")])
    if int(data.get("version", 0)) > FORMAT_VERSION:
        raise ConfigError([problem("--corrections", str(p), f"has version {data.get('version')}, newer "
                                   f"than this qlora-ray reads ({FORMAT_VERSION})", "upgrade qlora-ray")])
    memory = {}
    for key, v in (data.get("memory") or {}).items():
        try:
            memory[key] = Correction(float(v["factor"]), float(v["spread"]), int(v.get("ok_rows", 0)),
                                     int(v.get("oom_rows", 0)), key)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError([problem(f"--corrections memory.{key}", v, f"is malformed ({e})",
                                       "rewrite the file with `qlora-ray calibrate`")]) from e
    throughput = data.get("throughput") if isinstance(data.get("throughput"), dict) else {}
    return Corrections(memory, str(p), throughput)


# ---------------------------------------------------------------------------------------
# learning from rows


GPU_SOURCES = ("cuda_reserved", "cuda_allocated", "nvml")


def _gpu_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r.get("status") not in ("ok", "oom") or not r.get("gpu") or r.get("gpu") == "cpu":
            continue
        if r.get("memory_source") not in GPU_SOURCES and r.get("status") == "ok":
            continue  # measured on a CPU (fallback): says nothing about the card
        if _raw_prediction(r) is None:
            continue
        out.append(r)
    return out


def _raw_prediction(r: dict[str, Any]) -> float | None:
    pred = r.get("predicted_train_bytes") or r.get("predicted_peak_bytes")
    if not pred:
        return None
    return float(pred) / float(r.get("memory_correction") or 1.0)


def _measured(r: dict[str, Any]) -> float | None:
    value = r.get("peak_train_bytes") or r.get("peak_memory_bytes")
    return float(value) if value else None


def fit(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The `memory` section for these rows (see the module docstring)."""
    rows = _gpu_rows(rows)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        family, gpu = r.get("model_family") or _family(r), r["gpu"]
        for key in (f"{family}/{gpu}", f"{family}/{ANY}", f"{ANY}/{gpu}", f"{ANY}/{ANY}"):
            groups.setdefault(key, []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for key, members in sorted(groups.items()):
        ok = [(m, p) for r in members if r["status"] == "ok"
              and (m := _measured(r)) and (p := _raw_prediction(r))]
        ooms = [(float(r["device_total_memory_bytes"] or 0) or _card_bytes(r["gpu"]), _raw_prediction(r))
                for r in members if r["status"] == "oom"]
        ratios = [m / p for m, p in ok]
        factor = statistics.median(ratios) if ratios else 1.0
        # An OOM needed more than the card: the corrected prediction must reach it.
        for card, pred in ooms:
            if card and pred:
                factor = max(factor, card / pred)
        spread = max([abs(x / factor - 1) for x in ratios] + [MIN_SPREAD])
        out[key] = {"factor": round(factor, 4), "spread": round(spread, 4), "ok_rows": len(ok),
                    "oom_rows": len(ooms)}
    return out


def _family(r: dict[str, Any]) -> str:
    """The row's architecture family, from its model's config.json when plan can find it."""
    from qlora_ray.config_json import load_model_config
    from qlora_ray.memory import architecture

    try:
        return architecture(load_model_config(str(r.get("model")), r.get("model_revision"))).family
    except Exception:
        return ANY


def _card_bytes(gpu: str) -> float:
    from qlora_ray.profiles import get_profile

    try:
        return float(get_profile(gpu).usable_bytes)
    except ConfigError:
        return 0.0


def write(sections: dict[str, dict[str, Any]], sources: list[str], path: str | Path) -> Path:
    """Write the file; sections learned now replace their old selves, other sections stay."""
    p = Path(path)
    data: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION, "memory": {}, "throughput": {}}
    if p.is_file():
        try:
            old = json.loads(p.read_text())
            if isinstance(old, dict) and old.get("format") == FORMAT:
                data.update(old)
        except ValueError:
            pass
    data.update(created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                sources=sources, **{k: v for k, v in sections.items() if v})
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(p)
    return p


# ---------------------------------------------------------------------------------------
# the `calibrate` verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", metavar="RESULTS",
                        help="results folders (RESULTS/<spec name>, or its runs/) with rows run on GPUs")
    parser.add_argument("-o", "--output", default="corrections.json",
                        help="corrections file to write (default corrections.json); "
                             "pass it to `plan`/`run` with --corrections")
    from qlora_ray.planner import add_model_configs_argument

    add_model_configs_argument(parser)  # to tell each row's architecture family


def main(args: argparse.Namespace) -> int:
    import os

    from qlora_ray.config_json import MODEL_CONFIGS_ENV
    from qlora_ray.results_load import load

    if args.model_configs:
        os.environ[MODEL_CONFIGS_ENV] = os.pathsep.join(
            [*args.model_configs, *filter(None, [os.environ.get(MODEL_CONFIGS_ENV)])])
    rows: list[dict[str, Any]] = []
    for folder in args.results:
        try:
            df = load(folder)
        except FileNotFoundError as e:
            raise ConfigError([problem("RESULTS", folder, "has no results", str(e))]) from e
        rows += df.astype(object).where(df.notna(), None).to_dict("records")
    from qlora_ray.timing import fit_efficiency

    memory = fit(rows)
    throughput = fit_efficiency(rows, lambda r: r.get("model_family") or _family(r))
    if not memory and not throughput:
        print("qlora-ray calibrate: no ok or oom rows with a prediction to compare in "
              f"{', '.join(args.results)}; nothing to learn", file=sys.stderr)
        return 1
    path = write({"memory": memory, "throughput": throughput}, list(args.results), args.output)
    print(f"{path}: memory corrections from {len(_gpu_rows(rows))} GPU rows, "
          f"time efficiencies from {max([v['rows'] for v in throughput.values()] + [0])} rows")
    for key, v in memory.items():
        print(f"  memory {key:24s} x{v['factor']:.3f} +/- {v['spread']:.1%}  "
              f"({v['ok_rows']} ok, {v['oom_rows']} oom)")
    for key, v in throughput.items():
        print(f"  time   {key:24s} efficiency {v['efficiency']:.3f} +/- {v['spread']:.1%}  "
              f"({v['rows']} rows)")
    return 0
