"""`qlora-ray plan SPEC`: every cell's predicted peak memory and whether it can run, before
any GPU is used. Also the library the `run` driver plans with (`plan_spec`, `backoff`).

Planning reads only each model's `config.json` (see `load_model_config`); the module top
imports neither torch nor Ray nor pandas, so planning 1,000 cells takes about a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_ray.config import BUILTIN_PREFIX, ConfigError, ExperimentConfig, problem
from qlora_ray.grid import DEFAULT_MAX_CELLS, Spec, load_spec
from qlora_ray.memory import Architecture, architecture, estimate, largest_batch
from qlora_ray.modelcheck import model_problems
from qlora_ray.profiles import GpuProfile, capability_problems, get_profile, resolve_compute_dtype
from qlora_ray.timing import Factors, TimePrediction, predict
from qlora_ray.workload import data_lengths

MODEL_CONFIGS_ENV = "QLORA_RAY_MODEL_CONFIGS"
# `batch_size: auto` leaves this share of the card free: the caching allocator fragments,
# and the estimate is an estimate.
AUTO_BATCH_MARGIN = 0.10
AUTO_BATCH_LIMIT = 256
# `auto` on a cell without a GPU profile has nothing to size against: TrainConfig's default.
AUTO_BATCH_UNBOUNDED = 4
GiB = 1024**3
# The time and cost fields of `--json` (and of result rows), null when a cell has no prediction.
TIME_KEYS = ("predicted_tokens_per_second", "predicted_seconds", "predicted_eval_seconds",
             "predicted_gpu_seconds", "predicted_usd", "usd_per_hour", "predicted_train_tokens",
             "predicted_steps", "time_efficiency", "time_calibration")


@dataclass(frozen=True)
class CellPlan:
    config: ExperimentConfig
    """The cell as spec'd (batch_size may still be `auto`)."""
    experiment_id: str
    """`config.experiment_id` of the spec'd config, so resuming finds the same rows."""
    name: str
    gpu: str | None
    profile: GpuProfile | None
    batch_size: int
    """Resolved: `auto` -> the largest that fits with AUTO_BATCH_MARGIN free; else as spec'd."""
    compute_dtype: str
    """Effective: `auto` resolved against the profile."""
    predicted_peak_bytes: int | None
    breakdown: dict[str, int]
    fits: bool
    problems: list[str]
    """Why the cell cannot run as specified; empty when it can."""
    notes: list[str] = field(default_factory=list)
    """Things worth knowing that do not stop the cell (e.g. the OOM back-off it will need)."""
    time: TimePrediction | None = None
    """Predicted training time, GPU time and cost (None: no data or no speed numbers)."""

    @property
    def headroom(self) -> float | None:
        """Share of the card left free at the predicted peak (negative: over by that much)."""
        if self.profile is None or not self.profile.is_gpu or self.predicted_peak_bytes is None:
            return None
        return 1 - self.predicted_peak_bytes / self.profile.usable_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "experiment_id": self.experiment_id,
            "name": self.name,
            "gpu": self.gpu,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "fits": self.fits,
            "problems": list(self.problems),
            "breakdown": dict(self.breakdown),
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
# config.json lookup


def load_model_config(
    name: str, revision: str | None = None, search: Sequence[str | Path] = ()
) -> dict[str, Any]:
    """A model's `config.json` as a dict; never its weights.

    Looked up in order: `builtin:` models (built in memory); a local folder holding
    `config.json` (nothing else is needed) or a `.json` file; `DIR/<hub id>/config.json` for
    each DIR in `search` and in $QLORA_RAY_MODEL_CONFIGS (os.pathsep-separated); the hub,
    through huggingface_hub (its cache first, so a model used before plans offline).
    """
    if name.startswith(BUILTIN_PREFIX):
        try:
            from qlora_ray.builtin import builtin_model_config
        except ImportError as e:  # the builtin module is optional while it is being written
            raise ConfigError([problem("model.name", name, f"cannot be planned ({e})",
                                       "install qlora-ray with qlora_ray/builtin.py")]) from e
        return dict(builtin_model_config(name))

    local = Path(name).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return _read_json(local / "config.json", name)
        raise ConfigError([problem("model.name", name, "is a folder without config.json",
                                   "point it at a model folder (config.json is all `plan` needs)")])
    if local.is_file():
        return _read_json(local, name)

    folders = [*search, *filter(None, os.environ.get(MODEL_CONFIGS_ENV, "").split(os.pathsep))]
    for folder in folders:
        for candidate in (Path(folder) / name / "config.json",
                          Path(folder) / name.replace("/", "--") / "config.json"):
            if candidate.is_file():
                return _read_json(candidate, name)

    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(name, "config.json", revision=revision)
    except Exception as e:  # offline, gated, missing: all mean the same to the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:160]
        # Gated repos (meta-llama/...) answer 401/403 without a token, even for config.json.
        token = "set" if os.environ.get("HF_TOKEN") else "not set here"
        raise ConfigError([problem(
            "model.name", name, f"has no readable config.json ({type(e).__name__}: {first})",
            f"a gated model needs its licence accepted on the hub and HF_TOKEN (now {token}); "
            "planning needs only that file: put it in a folder and set model.name to the folder, "
            f"or save it as DIR/{name}/config.json and pass --model-configs DIR "
            f"(or set {MODEL_CONFIGS_ENV}=DIR)",
        )]) from e
    return _read_json(Path(path), name)


def _read_json(path: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError([problem("model.name", name, f"has an unreadable {path} ({e})",
                                   "give a valid config.json")]) from e
    if not isinstance(data, dict):
        raise ConfigError([problem("model.name", name, f"has a {path} that is not an object",
                                   "give a model's config.json")])
    return data


# ---------------------------------------------------------------------------------------
# planning


def plan_spec(
    spec: Spec, *, model_configs: Sequence[str | Path] = (), calibration: Any = None,
) -> list[CellPlan]:
    """One CellPlan per cell, in the spec's order. Reads each model's config.json once.

    `calibration` (anything with `factors(cfg, arch, profile) -> timing.Factors`, e.g. a
    loaded calibration file) replaces the default efficiency of the time prediction.
    """
    archs: dict[tuple[str, str | None], Architecture] = {}
    plans: list[CellPlan] = []
    search = [*model_configs, *filter(None, os.environ.get(MODEL_CONFIGS_ENV, "").split(os.pathsep))]
    for cfg in spec.cells:
        key = (cfg.model.name, cfg.model.revision)
        if key not in archs:
            archs[key] = architecture(
                load_model_config(cfg.model.name, cfg.model.revision, model_configs), cfg.model.name)
        plan = plan_cell(cfg, archs[key], spec.profiles)
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
    cfg: ExperimentConfig, arch: Architecture, profiles: dict[str, GpuProfile] | None = None
) -> CellPlan:
    profile = get_profile(cfg.gpu, profiles) if cfg.gpu is not None else None
    compute = resolve_compute_dtype(cfg.quant.compute_dtype, profile)
    problems = capability_problems(profile, cfg.quant.compute_dtype, cfg.model.attn_implementation)
    notes: list[str] = []
    if cfg.emulate_profile and (profile is None or not profile.is_gpu):
        problems.append(problem("emulate_profile", True, "needs a GPU profile to emulate",
                                "set gpu, or drop emulate_profile"))
    limit = profile.usable_bytes if profile is not None and profile.is_gpu else None
    budget = None if limit is None else int(limit * (1 - AUTO_BATCH_MARGIN))

    if isinstance(cfg.train.batch_size, int):
        bs = cfg.train.batch_size
    elif budget is None:
        bs = AUTO_BATCH_UNBOUNDED
    else:
        bs = max(1, largest_batch(arch, cfg, profile, budget, limit=AUTO_BATCH_LIMIT))
    est = estimate(arch, cfg, profile, batch_size=bs)
    problems.extend(est.problems)
    problems.extend(model_problems(cfg, arch))  # an attention kernel or rank the model cannot take
    fits = limit is None or est.peak_bytes <= limit

    if not fits and profile is not None and limit is not None:
        need = f"predicted peak {est.peak_bytes / GiB:.1f} GiB exceeds {profile.name}'s {limit / GiB:.1f} GiB"
        step = _backoff_until_fits(cfg, arch, profile, bs, limit) if cfg.train.oom_backoff else None
        if step is not None:
            notes.append(f"{need} at batch_size {bs}; train.oom_backoff will retry at batch_size "
                         f"{step[0]} x grad_accum {step[1]}")
        else:
            problems.append(f"does not fit: {need} at train.batch_size {bs}; "
                            + _fit_hint(cfg, arch, profile, budget or limit))
    return CellPlan(
        config=cfg, experiment_id=cfg.experiment_id, name=cfg.name, gpu=cfg.gpu, profile=profile,
        batch_size=bs, compute_dtype=compute, predicted_peak_bytes=est.peak_bytes,
        breakdown=est.breakdown, fits=fits, problems=problems, notes=notes,
    )


def _fit_hint(cfg: ExperimentConfig, arch: Architecture, profile: GpuProfile, budget: int) -> str:
    n = largest_batch(arch, cfg, profile, budget)
    if n >= 1:
        return (f"use train.batch_size {n} or auto (raise train.grad_accum to keep the effective "
                "batch), or set train.oom_backoff")
    if largest_batch(arch, cfg, profile, budget, eval_batch_size=1) >= 1:
        return f"the eval pass is the peak: lower eval.batch_size (now {cfg.eval.batch_size})"
    return ("even batch_size 1 does not fit: use fewer quant.bits, a shorter train.max_seq_len, "
            "train.gradient_checkpointing, or a bigger gpu")


def _backoff_until_fits(cfg: ExperimentConfig, arch: Architecture, profile: GpuProfile, bs: int,
                        limit: int) -> tuple[int, int] | None:
    """(batch_size, grad_accum) the run's OOM back-off would settle on, if any fits."""
    step: tuple[int, int] | None = (bs, cfg.train.grad_accum)
    while (step := _backoff_step(*step)) is not None:
        if estimate(arch, cfg, profile, batch_size=step[0]).peak_bytes <= limit:
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
    parser.add_argument("--model-configs", action="append", default=[], metavar="DIR",
                        help=f"folder of config.json files laid out as DIR/<hub id>/config.json, "
                             f"searched before the hub (repeatable; also ${MODEL_CONFIGS_ENV})")


def main(args: argparse.Namespace) -> int:
    from qlora_ray.datacheck import check_spec_datasets

    spec = load_spec(args.spec, max_cells=args.max_cells)
    data_notes = check_spec_datasets(spec)  # bad data is one error here, not a failed row per cell
    plans = plan_spec(spec, model_configs=args.model_configs)
    blocked = [p for p in plans if p.problems]
    if args.json:
        print(json.dumps([p.to_json() for p in plans], indent=1))
    else:
        print(render_table(plans))
    summary = (f"{spec.name}: {len(plans)} cells, {sum(p.fits for p in plans)} fit, "
               f"{len(blocked)} cannot run as specified")
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
    return 1 if blocked else 0


def render_table(plans: list[CellPlan]) -> str:
    header = ("name", "gpu", "bs", "dtype", "pred GiB", "GPU GiB", "headroom", "fits", "train",
              "GPU h", "$", "problems")
    rows = [header]
    for p in plans:
        gpu_gib = p.profile.usable_bytes / GiB if p.profile and p.profile.is_gpu else None
        t = p.time
        rows.append((
            p.name, p.gpu or "-", str(p.batch_size), p.compute_dtype,
            f"{p.predicted_peak_bytes / GiB:.2f}" if p.predicted_peak_bytes is not None else "-",
            f"{gpu_gib:.1f}" if gpu_gib is not None else "-",
            f"{p.headroom:+.0%}" if p.headroom is not None else "-",
            "yes" if p.fits else "NO",
            hms(t.train_seconds) if t else "-",
            _small(t.gpu_seconds / 3600) if t else "-",
            _small(t.usd) if t and t.usd is not None else "-",
            str(len(p.problems)) if p.problems else "",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i in (0, 1, 3) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(total_line(plans))
    detail = [f"  {p.name}: {msg}" for p in plans for msg in p.problems]
    if detail:
        lines += ["", "problems (these cells cannot run as specified):", *detail]
    notes = _grouped((p.name, msg) for p in plans for msg in p.notes)
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


def total_line(plans: list[CellPlan]) -> str:
    """The grid's predicted GPU-hours and dollars (cells without a price or time are named)."""
    timed = [p.time for p in plans if p.time is not None]
    hours = sum(t.gpu_seconds for t in timed) / 3600
    priced = [t.usd for t in timed if t.usd is not None]
    text = f"total: {hours:.2f} GPU-hours"
    text += f" (training {sum(t.train_seconds for t in timed) / 3600:.2f})"
    if priced:
        text += f", ${sum(priced):,.2f}"
    unpriced = sum(1 for p in plans if p.time is not None and p.time.usd is None
                   and p.profile is not None and p.profile.is_gpu)
    if unpriced:
        text += f"; {unpriced} cell(s) have no price (set usd_per_hour under `profiles:`)"
    if len(timed) < len(plans):
        text += f"; {len(plans) - len(timed)} cell(s) have no time prediction (see notes)"
    return text


def _grouped(pairs: Any) -> list[str]:
    """One line per distinct note; a note many cells share names the first and counts the rest."""
    by_message: dict[str, list[str]] = {}
    for name, message in pairs:
        by_message.setdefault(message, []).append(name)
    return [f"  {names[0]}: {msg}" if len(names) == 1 else f"  {names[0]} and {len(names) - 1} more: {msg}"
            for msg, names in by_message.items()]


def _small(x: float) -> str:
    return "<0.01" if 0 < x < 0.005 else f"{x:,.2f}"


def hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
