"""`qlora-ray plan SPEC`: every cell's predicted peak memory, time and cost, and whether it
can run, before any GPU is used; also what the `run` driver plans with (`plan_spec`, `backoff`).

Reads only each model's `config.json` (config_json.py) and imports neither torch nor Ray.
The table it prints is plan_table.py's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from qlora_ray.calibrate import Correction, Corrections
from qlora_ray.config import ExperimentConfig, problem
from qlora_ray.config_json import MODEL_CONFIGS_ENV, load_model_config
from qlora_ray.grid import DEFAULT_MAX_CELLS, Spec, load_spec
from qlora_ray.lengths import batch_shape
from qlora_ray.memory import Architecture, Estimate, Shape, architecture, estimate, largest_batch
from qlora_ray.modelcheck import model_problems
from qlora_ray.plan_table import render_table, total_line
from qlora_ray.profiles import (
    IMAGE_MIN_CAPABILITY,
    GpuProfile,
    capability_problems,
    get_profile,
    resolve_compute_dtype,
)
from qlora_ray.timing import Factors, TimePrediction, predict
from qlora_ray.units import GIB
from qlora_ray.workload import DataLengths, data_lengths

# `batch_size: auto` leaves this share of the card free: the caching allocator fragments,
# and the estimate is an estimate.
AUTO_BATCH_MARGIN = 0.10
AUTO_BATCH_LIMIT = 256
# `auto` on a cell without a GPU profile has nothing to size against: TrainConfig's default.
AUTO_BATCH_UNBOUNDED = 4
# `predicted_lengths` of a cell whose data is not a local file (a hub dataset).
UNKNOWN_LENGTHS = "max_seq_len (data not local)"
# The time and cost fields of `--json` (and of result rows), null when a cell has no prediction.
TIME_KEYS = ("predicted_tokens_per_second", "predicted_seconds", "predicted_eval_seconds",
             "predicted_gpu_seconds", "predicted_usd", "usd_per_hour", "predicted_train_tokens",
             "predicted_steps", "time_efficiency", "time_calibration")


@dataclass(frozen=True)
class CellPlan:
    """One planned cell: what `plan` prints and `run` submits (a record the planner builds)."""

    # The cell as spec'd (batch_size may still be `auto`).
    config: ExperimentConfig
    # `config.experiment_id` of the spec'd config, so resuming finds the same rows.
    experiment_id: str
    name: str
    gpu: str | None
    profile: GpuProfile | None
    # Resolved: `auto` -> the largest that fits with AUTO_BATCH_MARGIN free; else as spec'd.
    batch_size: int
    # Effective: `auto` resolved against the profile.
    compute_dtype: str
    # The larger of the training and eval peaks (the results contract's column).
    predicted_peak_bytes: int | None
    breakdown: dict[str, int]
    # False only when the cell is sure not to fit: even the low end of its range is over.
    fits: bool
    # Why the cell cannot run as specified; empty when it can.
    problems: list[str]
    # Things worth knowing that do not stop the cell (e.g. the OOM back-off it will need).
    notes: list[str] = field(default_factory=list)
    # Predicted training time, GPU time and cost (None: no data or no speed numbers).
    time: TimePrediction | None = None
    estimate: Estimate | None = None
    # Runs, but the card is inside the predicted range: it may end as an `oom` row.
    tight: bool = False
    shape: Shape | None = None
    family: str | None = None
    correction: Correction | None = None

    @property
    def headroom(self) -> float | None:
        """Share of the card left free at the predicted peak (negative: over by that much)."""
        if self.profile is None or not self.profile.is_gpu or self.predicted_peak_bytes is None:
            return None
        return 1 - self.predicted_peak_bytes / self.profile.usable_bytes

    def predictions(self) -> dict[str, Any]:
        """The prediction columns of this cell's result row."""
        est = self.estimate
        if est is None:
            return {"predicted_peak_bytes": self.predicted_peak_bytes}
        return {
            "predicted_peak_bytes": est.peak_bytes,
            "predicted_train_bytes": est.train_bytes,
            "predicted_eval_bytes": est.eval_bytes,
            "predicted_train_low_bytes": est.train_range[0],
            "predicted_train_high_bytes": est.train_range[1],
            "predicted_eval_low_bytes": est.eval_range[0],
            "predicted_eval_high_bytes": est.eval_range[1],
            "predicted_tight": self.tight,
            "predicted_train_seq": self.shape.train_seq if self.shape else None,
            "predicted_lengths": self.shape.source if self.shape else None,
            "model_family": self.family,
            "memory_correction": self.correction.factor if self.correction else 1.0,
        }

    def to_json(self) -> dict[str, Any]:
        est = self.estimate
        return {
            "experiment_id": self.experiment_id,
            "name": self.name,
            "gpu": self.gpu,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "fits": self.fits,
            "tight": self.tight,
            "problems": list(self.problems),
            "breakdown": dict(self.breakdown),
            "eval_breakdown": dict(est.eval_breakdown) if est else {},
            "train_moment": est.train_moment if est else None,
            "eval_moment": est.eval_moment if est else None,
            **{k: v for k, v in self.predictions().items() if k != "predicted_peak_bytes"},
            "predicted_low_bytes": est.peak_range[0] if est else None,
            "predicted_high_bytes": est.peak_range[1] if est else None,
            "correction_group": self.correction.key if self.correction else None,
            "batch_size": self.batch_size,
            "batch_size_requested": str(self.config.train.batch_size),
            "compute_dtype": self.compute_dtype,
            "compute_dtype_requested": self.config.quant.compute_dtype,
            "gpu_memory_bytes": self.profile.usable_bytes if self.profile and self.profile.is_gpu else None,
            "headroom": None if self.headroom is None else round(self.headroom, 4),
            "notes": list(self.notes),
            **(self.time.to_json() if self.time is not None else dict.fromkeys(TIME_KEYS)),
        }


# ---------------------------------------------------------------------------------------
# planning


def plan_spec(
    spec: Spec,
    *,
    model_configs: Sequence[str | Path] = (),
    worst_case: bool = False,
    corrections: Corrections | None = None,
    calibration: Any = None,
) -> list[CellPlan]:
    """One CellPlan per cell, in the spec's order. Reads each model's config.json once.

    Each cell is sized by its data's token lengths (`qlora_ray.lengths`), or with every row
    `max_seq_len` long when `worst_case` (or when the data is not a local file).
    `corrections` (from `qlora-ray calibrate`) scale each memory prediction for its family
    and card. `calibration` (anything with `factors(cfg, arch, profile) -> timing.Factors`,
    e.g. a loaded calibration file) replaces the default efficiency of the time prediction.
    """
    if calibration is None:
        calibration = corrections  # one file: memory corrections and time efficiencies
    archs: dict[tuple[str, str | None], Architecture] = {}
    plans: list[CellPlan] = []
    search = [*model_configs, *filter(None, os.environ.get(MODEL_CONFIGS_ENV, "").split(os.pathsep))]
    for cfg in spec.cells:
        key = (cfg.model.name, cfg.model.revision)
        if key not in archs:
            archs[key] = architecture(
                load_model_config(cfg.model.name, cfg.model.revision, model_configs), cfg.model.name)
        lengths = None if worst_case else data_lengths(cfg, search)
        plan = plan_cell(cfg, archs[key], spec.profiles, lengths=lengths, corrections=corrections,
                         lengths_unknown=lengths is None and not worst_case)
        time, note = plan_time(plan, archs[key], spec.profiles, search, calibration)
        plans.append(dataclasses.replace(plan, time=time, notes=[*plan.notes, *filter(None, [note])]))
    return plans


def plan_time(
    plan: CellPlan, arch: Architecture, profiles: dict[str, GpuProfile] | None,
    search: Sequence[str | Path], calibration: Any = None,
) -> tuple[TimePrediction | None, str | None]:
    """The cell's predicted time and cost, or why there is none."""
    profile = plan.profile or get_profile("cpu", profiles)
    lengths = data_lengths(plan.config, search)
    if lengths is None:
        return None, (f"no time prediction: dataset.path {plan.config.dataset.path!r} is not a local "
                      "file to count tokens in")
    factors = calibration.factors(plan.config, arch, profile) if calibration is not None else Factors()
    time = predict(plan.config, arch, profile, lengths, batch_size=plan.batch_size, factors=factors)
    if time is None:
        return None, (f"no time prediction: profile {profile.name} has no peak_tflops / "
                      "memory_bandwidth_gbs; set them under `profiles:`")
    if lengths.estimated:
        return time, (f"token counts estimated at 4 bytes of text per token: no tokenizer.json for "
                      f"{plan.config.model.name} found locally (put it next to its config.json)")
    return time, None


def plan_cell(
    cfg: ExperimentConfig,
    arch: Architecture,
    profiles: dict[str, GpuProfile] | None = None,
    *,
    lengths: DataLengths | None = None,
    corrections: Corrections | None = None,
    lengths_unknown: bool = False,
) -> CellPlan:
    """Plan one cell: its batch, predicted peaks with ranges, and whether it may run.

    Memory gates only on certainty: a cell is refused when even the low end of its range is
    above the card. Inside the range it runs and is `tight`. `lengths_unknown` (the data is
    not a local file and no worst case was asked for): the prediction is for rows of
    `max_seq_len`, but nothing says the rows are that long, so the low end is for rows of one
    token (only what does not depend on the data can refuse the cell).
    """
    profile = get_profile(cfg.gpu, profiles) if cfg.gpu is not None else None
    compute = resolve_compute_dtype(cfg.quant.compute_dtype, profile)
    min_cc, flash_attn = runtime_support()
    problems = capability_problems(profile, cfg.quant.compute_dtype, cfg.model.attn_implementation,
                                   min_capability=min_cc, flash_attn_installed=flash_attn)
    notes: list[str] = []
    if cfg.emulate_profile and (profile is None or not profile.is_gpu):
        problems.append(problem("emulate_profile", True, "needs a GPU profile to emulate",
                                "set gpu, or drop emulate_profile"))
    limit = profile.usable_bytes if profile is not None and profile.is_gpu else None
    budget = None if limit is None else int(limit * (1 - AUTO_BATCH_MARGIN))
    corr = corrections.lookup(arch.family, profile.name if profile else None) if corrections else None
    scale = {"correction": corr.factor, "correction_spread": corr.spread} if corr else {}

    def shape_at(b: int) -> Shape:
        s = batch_shape(cfg, lengths, b)
        return Shape(train_seq=s.train_seq, eval_prompt=s.eval_prompt, eval_seq=s.eval_seq,
                     reference=s.reference, source=s.source)

    if isinstance(cfg.train.batch_size, int):
        bs = cfg.train.batch_size
    elif budget is None:
        bs = AUTO_BATCH_UNBOUNDED
    else:
        bs = max(1, largest_batch(arch, cfg, profile, budget, limit=AUTO_BATCH_LIMIT, shape=shape_at(1),
                                  correction=corr.factor if corr else 1.0))
    shape = shape_at(bs)
    est = estimate(arch, cfg, profile, batch_size=bs, shape=shape, **scale)
    if lengths_unknown:
        shape = dataclasses.replace(shape, source=UNKNOWN_LENGTHS)
        floor = estimate(arch, cfg, profile, batch_size=bs, shape=Shape(1, 1, 1, 1, source="one token"),
                         **scale)
        est = dataclasses.replace(est, train_range=(floor.train_range[0], est.train_range[1]),
                                  eval_range=(floor.eval_range[0], est.eval_range[1]))
    problems.extend(est.problems)
    problems.extend(model_problems(cfg, arch))  # an attention kernel or rank the model cannot take
    low, high = est.peak_range
    fits = limit is None or low <= limit
    tight = limit is not None and fits and high > limit

    if limit is not None and profile is not None:
        need = (f"predicted peak {est.peak_bytes / GIB:.1f} GiB (range {low / GIB:.1f}-{high / GIB:.1f}) "
                f"against {profile.name}'s {limit / GIB:.1f} GiB")
        if not fits:
            step = _backoff_until_fits(cfg, arch, profile, bs, limit, shape_at, scale) \
                if cfg.train.oom_backoff else None
            if step is not None:
                notes.append(f"{need} at batch_size {bs}; train.oom_backoff will retry at batch_size "
                             f"{step[0]} x grad_accum {step[1]}")
            else:
                problems.append(f"does not fit: {need} at train.batch_size {bs}, even the low end is over; "
                                + _fit_hint(cfg, arch, profile, budget or limit, shape, scale)
                                + " (or run it anyway with `run --force`)")
        elif tight:
            notes.append(f"tight: {need}; it may run out of memory, which records an `oom` row")
        if lengths_unknown and high > limit:
            notes.append(f"sized for rows of max_seq_len {cfg.train.max_seq_len}: {cfg.dataset.path} is "
                         "not a local file, so its token lengths are unknown and the range starts at "
                         "one-token rows")
    return CellPlan(
        config=cfg, experiment_id=cfg.experiment_id, name=cfg.name, gpu=cfg.gpu, profile=profile,
        batch_size=bs, compute_dtype=compute, predicted_peak_bytes=est.peak_bytes,
        breakdown=est.breakdown, fits=fits, problems=problems, notes=notes, estimate=est,
        tight=tight, shape=shape, family=arch.family, correction=corr,
    )


@functools.cache
def runtime_support() -> tuple[tuple[int, int], bool]:
    """(lowest compute capability the installed torch serves, flash-attn installed).

    Read without importing either: planning stays fast, and in the image (or on the
    cluster's nodes) the installed torch is the one the cells will run. torch's version tag
    names its CUDA build (`2.13.0+cu126`); a build without one (PyPI's default, CUDA 13 on
    Linux) or a CPU build is taken as the image's.
    """
    try:
        tag = metadata.version("torch").partition("+")[2]
    except metadata.PackageNotFoundError:
        tag = ""
    old_cuda = tag.startswith("cu") and tag[2:].isdigit() and int(tag[2:]) <= 126
    min_cc = (5, 0) if old_cuda else IMAGE_MIN_CAPABILITY
    return min_cc, importlib.util.find_spec("flash_attn") is not None


def _fit_hint(cfg: ExperimentConfig, arch: Architecture, profile: GpuProfile, budget: int,
              shape: Shape, scale: dict[str, float]) -> str:
    factor = scale.get("correction", 1.0)
    n = largest_batch(arch, cfg, profile, budget, shape=shape, correction=factor)
    if n >= 1:
        return (f"use train.batch_size {n} or auto (raise train.grad_accum to keep the effective "
                "batch), or set train.oom_backoff")
    if largest_batch(arch, cfg, profile, budget, eval_batch_size=1, shape=shape, correction=factor) >= 1:
        return f"the eval pass is the peak: lower eval.batch_size (now {cfg.eval.batch_size})"
    return ("even batch_size 1 does not fit: use fewer quant.bits, a shorter train.max_seq_len, "
            "train.gradient_checkpointing, or a bigger gpu")


def _backoff_until_fits(cfg: ExperimentConfig, arch: Architecture, profile: GpuProfile, bs: int,
                        limit: int, shape_at: Any, scale: dict[str, float]) -> tuple[int, int] | None:
    """(batch_size, grad_accum) the run's OOM back-off would settle on, if any may fit."""
    step: tuple[int, int] | None = (bs, cfg.train.grad_accum)
    while (step := _backoff_step(*step)) is not None:
        est = estimate(arch, cfg, profile, batch_size=step[0], shape=shape_at(step[0]), **scale)
        if est.peak_range[0] <= limit:
            return step
    return None


def _backoff_step(bs: int, grad_accum: int) -> tuple[int, int] | None:
    if bs <= 1:
        return None
    factor = next(p for p in range(2, bs + 1) if bs % p == 0)
    return bs // factor, grad_accum * factor


def backoff(cfg: ExperimentConfig) -> ExperimentConfig | None:
    """The OOM back-off step: a smaller micro-batch, more accumulation, same effective batch.

    Halves an even batch_size and doubles grad_accum; an odd one is divided by its smallest
    prime factor (9 -> 3, grad_accum x 3), so batch_size x grad_accum never changes. None
    when batch_size is already 1. The result has a new experiment_id: callers keep the
    original one for the row.
    """
    bs = cfg.train.batch_size
    if not isinstance(bs, int):
        raise ValueError("backoff needs a resolved train.batch_size, got `auto`")
    step = _backoff_step(bs, cfg.train.grad_accum)
    if step is None:
        return None
    return cfg.replace(**{"train.batch_size": step[0], "train.grad_accum": step[1]})


# ---------------------------------------------------------------------------------------
# the `plan` verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="YAML grid spec, e.g. experiments/example.yaml")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list, one object per cell, instead of the table")
    parser.add_argument("--skip-unfit", action="store_true",
                        help="exit 0 even when cells cannot run; `run --skip-unfit` records them "
                             "as `skipped` rows")
    parser.add_argument("--max-cells", type=int, default=DEFAULT_MAX_CELLS, metavar="N",
                        help=f"refuse a spec that expands to more cells (default {DEFAULT_MAX_CELLS:,})")
    add_planning_arguments(parser)


def add_model_configs_argument(parser: argparse.ArgumentParser) -> None:
    """`--model-configs DIR`, for every verb that reads a model's config.json."""
    parser.add_argument("--model-configs", action="append", default=[], metavar="DIR",
                        help=f"folder of config.json files laid out as DIR/<hub id>/config.json, "
                             f"searched before the hub (repeatable; also ${MODEL_CONFIGS_ENV})")


def add_planning_arguments(parser: argparse.ArgumentParser) -> None:
    """Options `plan` and `run` share: where config.json files are, how to size cells."""
    add_model_configs_argument(parser)
    parser.add_argument("--worst-case", action="store_true",
                        help="size every cell as if every row were train.max_seq_len tokens long "
                             "(default: the token lengths of the cell's own local dataset)")
    parser.add_argument("--corrections", default=None, metavar="FILE",
                        help="scale predictions by a file written by `qlora-ray calibrate`")


def load_corrections(path: str | None) -> Corrections | None:
    if not path:
        return None
    from qlora_ray.calibrate import load

    return load(path)


def main(args: argparse.Namespace) -> int:
    from qlora_ray.datacheck import check_spec_datasets

    spec = load_spec(args.spec, max_cells=args.max_cells)
    data_notes = check_spec_datasets(spec)  # bad data is one error here, not a failed row per cell
    plans = plan_spec(spec, model_configs=args.model_configs, worst_case=args.worst_case,
                      corrections=load_corrections(args.corrections))
    blocked = [p for p in plans if p.problems]
    if args.json:
        print(json.dumps([p.to_json() for p in plans], indent=1))
    else:
        print(render_table(plans))
    tight = sum(p.tight for p in plans)
    summary = (f"{spec.name}: {len(plans)} cells, {sum(p.fits for p in plans)} fit"
               + (f" ({tight} tight)" if tight else "") + f", {len(blocked)} cannot run as specified")
    out = sys.stderr if args.json else sys.stdout
    if args.json:
        print(total_line(plans), file=out)
    for note in data_notes:
        print(f"note: {note}", file=out)
    print(summary, file=out)
    if blocked and args.skip_unfit:
        print(f"--skip-unfit: `qlora-ray run --skip-unfit` will record those {len(blocked)} cells "
              "as `skipped` rows with the reasons above", file=out)
        return 0
    if blocked:
        print("`qlora-ray run --force` runs them anyway (an out-of-memory run ends as an `oom` row)",
              file=out)
    return 1 if blocked else 0
