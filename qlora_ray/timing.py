"""Predicted time and cost of one cell: its data's tokens through the throughput model.

    train    steps x (grad_accum micro-batches + one optimizer update), each micro-batch
             padded to the expected longest of `batch_size` random sequences
    eval     per evaluation (before training when `eval.before`, and after): prefill and
             `max_new_tokens` decode steps for every batch of prompts, the similarity
             embeddings of the generations and references, and the eval-loss pass
    setup    process start, imports and loading the weights (`SETUP_SECONDS` plus the
             checkpoint's bytes at `LOAD_BYTES_PER_SECOND`)

`predicted_seconds` is the training time (compare it with a row's `train_seconds`);
`predicted_gpu_seconds` is the whole cell, what the GPU is held for, and what dollars are
charged on. Pure: no torch, no Ray (the planner calls it for every cell).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from qlora_ray.config import ExperimentConfig
from qlora_ray.memory import Architecture
from qlora_ray.profiles import GpuProfile, resolve_compute_dtype
from qlora_ray.throughput import (
    Work,
    ceil_div,
    default_efficiency,
    forward_pass,
    hardware,
    optimizer_step,
    seconds,
    shape,
    train_microbatch,
)
from qlora_ray.workload import DataLengths

# Starting a worker process, importing torch/transformers/peft and building the trainer
# (measured ~5 s on the CPU quickstart); a GPU adds the CUDA context and kernel loading.
SETUP_SECONDS = {"cpu": 5.0, "gpu": 10.0}
# Reading a 16-bit checkpoint from local disk into the device (and quantizing it on the way).
LOAD_BYTES_PER_SECOND = 1e9


@dataclass(frozen=True)
class Factors:
    """What calibration learned for one kind of cell (defaults: nothing measured yet)."""

    # Replaces the profile's default efficiency factor for training.
    train_efficiency: float | None = None
    # Where the factors come from: `default`, or the calibration key that matched.
    source: str = "default"


@dataclass(frozen=True)
class TimePrediction:
    # Non-padding training tokens per second (what a row's `tokens_per_second` counts).
    tokens_per_second: float
    train_seconds: float
    eval_seconds: float
    setup_seconds: float
    # Non-padding tokens the optimizer will see over the whole run.
    train_tokens: int
    steps: int
    usd_per_hour: float | None
    efficiency: float
    calibration: str
    estimated_lengths: bool

    @property
    def gpu_seconds(self) -> float:
        return self.train_seconds + self.eval_seconds + self.setup_seconds

    @property
    def usd(self) -> float | None:
        return None if self.usd_per_hour is None else self.gpu_seconds / 3600 * self.usd_per_hour

    def to_json(self) -> dict[str, Any]:
        """The plan's `--json` fields and the row's columns (same names)."""
        return {
            "predicted_tokens_per_second": round(self.tokens_per_second, 1),
            "predicted_seconds": round(self.train_seconds, 3),
            "predicted_eval_seconds": round(self.eval_seconds, 3),
            "predicted_gpu_seconds": round(self.gpu_seconds, 3),
            "predicted_usd": None if self.usd is None else round(self.usd, 6),
            "usd_per_hour": self.usd_per_hour,
            "predicted_train_tokens": self.train_tokens,
            "predicted_steps": self.steps,
            "time_efficiency": round(self.efficiency, 4),
            "time_calibration": self.calibration,
        }


def train_steps(n_sequences: int, cfg: ExperimentConfig, batch_size: int) -> int:
    """Optimizer steps the Trainer will take (its own arithmetic: ceil per epoch, then epochs)."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    per_epoch = max(ceil_div(ceil_div(n_sequences, batch_size), cfg.train.grad_accum), 1)
    return math.ceil(cfg.train.epochs * per_epoch)


def predict(
    cfg: ExperimentConfig,
    arch: Architecture,
    profile: GpuProfile | None,
    lengths: DataLengths,
    *,
    batch_size: int,
    factors: Factors = Factors(),
) -> TimePrediction | None:
    """Time and cost of `cfg` at micro-batch `batch_size`; None without the profile's numbers."""
    compute = resolve_compute_dtype(cfg.quant.compute_dtype, profile)
    hw = hardware(profile, compute)
    if hw is None or not lengths.train:
        return None
    eff = factors.train_efficiency or default_efficiency(profile)
    ga = cfg.train.grad_accum
    padded = lengths.batch_max("train", batch_size, grouped=cfg.train.group_by_length)
    mean = lengths.train_tokens / len(lengths.train)
    sh = shape(arch, cfg, profile)
    # A padding-free micro-batch is its rows' real tokens end to end in one row (attention
    # over that row, as the packed rows are counted); a padded one, batch_size rows of the
    # batch's longest.
    rows, seq = (1, batch_size * mean) if cfg.train.padding_free else (batch_size, padded)
    step = train_microbatch(arch, cfg, profile, batch_size=rows, seq_len=seq, sh=sh) * ga
    step_seconds = seconds(step + optimizer_step(arch, cfg), hw, eff)
    steps = train_steps(len(lengths.train), cfg, batch_size)
    tokens_per_step = batch_size * ga * mean

    other_eff = default_efficiency(profile)
    evaluate = seconds(_eval_work(cfg, arch, profile, lengths, sh), hw, other_eff)
    passes = 2 if cfg.eval.before else 1
    setup = SETUP_SECONDS["gpu" if profile is not None and profile.is_gpu else "cpu"]
    setup += arch.total_params * 2 / LOAD_BYTES_PER_SECOND
    return TimePrediction(
        tokens_per_second=tokens_per_step / step_seconds,
        train_seconds=steps * step_seconds,
        eval_seconds=passes * evaluate,
        setup_seconds=setup,
        train_tokens=round(steps * tokens_per_step),
        steps=steps,
        usd_per_hour=profile.usd_per_hour if profile is not None else None,
        efficiency=eff,
        calibration=factors.source,
        estimated_lengths=lengths.estimated,
    )


def _eval_work(cfg: ExperimentConfig, arch: Architecture, profile: GpuProfile | None,
               lengths: DataLengths, sh: Any) -> Work:
    """One evaluation: generation, similarity embeddings, eval loss."""

    def forward(**kw: Any) -> Work:
        return forward_pass(arch, cfg, profile, sh=sh, **kw)

    bs = cfg.eval.batch_size
    n = len(lengths.eval_prompts)
    if n == 0:
        return Work()
    batches = ceil_div(n, bs)
    rows = min(bs, n)
    prompt = lengths.batch_max("eval_prompts", rows)
    new = cfg.eval.max_new_tokens
    generate = forward(batch_size=rows, seq_len=prompt)
    generate += new * forward(batch_size=rows, seq_len=1, context=prompt + new / 2)
    reference = lengths.batch_max("references", rows)
    embed = forward(batch_size=rows, seq_len=new) + forward(batch_size=rows, seq_len=reference)
    loss = forward(batch_size=rows, seq_len=lengths.batch_max("eval_examples", rows))
    return (generate + embed + loss) * batches


# ---------------------------------------------------------------------------------------
# calibration: the efficiency factor measured rows imply

ANY = "*"


def row_efficiency(row: dict[str, Any]) -> float | None:
    """The efficiency factor at which this row's own prediction would have been exact.

    Predicted tokens/s are proportional to the factor (`throughput.seconds` divides by it),
    so the factor that fits is the one used times measured over predicted; taking the row's
    own factor out this way means recalibrating never compounds. None for rows that did not
    train, were not predicted, or ran on the CPU in place of the GPU they were planned for.
    """
    if row.get("status") != "ok" or row.get("cpu_fallback"):
        return None
    measured, predicted = row.get("tokens_per_second"), row.get("predicted_tokens_per_second")
    used = row.get("time_efficiency")
    if not all(isinstance(x, (int, float)) and x > 0 for x in (measured, predicted, used)):
        return None
    return float(used) * float(measured) / float(predicted)


def efficiency_keys(family: str, gpu: str | None, bits: int | None = None) -> list[str]:
    """Calibration groups a cell looks in, most specific first.

    The quantization gets its own group when rows have it: 4-bit and 16-bit runs of one
    model on one device differ by more than the model's terms explain on some machines (a
    CPU without native bf16 runs the 16-bit baseline's bf16 matmuls slowly). CPU and GPU
    factors are on different scales (the CPU profile's peak is nominal), so CPU rows only
    ever inform CPU cells.
    """
    gpu = gpu or "cpu"
    exact = [f"{family}/{gpu}/{bits}bit"] if bits else []
    if gpu == "cpu":
        return [*exact, f"{family}/cpu", f"{ANY}/cpu"]
    return [*exact, f"{family}/{gpu}", f"{family}/{ANY}", f"{ANY}/{gpu}", f"{ANY}/{ANY}"]


def fit_efficiency(rows: list[dict[str, Any]], family: Any) -> dict[str, dict[str, Any]]:
    """The `throughput` calibration section: per group, the median factor its rows imply.

    `family(row)` names the row's architecture family. `spread` is the largest relative
    deviation of a row from the median: how well one factor describes the group.
    """
    import statistics

    groups: dict[str, list[float]] = {}
    for r in rows:
        eff = row_efficiency(r)
        if eff is None:
            continue
        gpu, bits = r.get("gpu"), r.get("quant_bits")
        # Rows read through pandas carry NaN / NA for a missing gpu (a CPU cell).
        gpu = gpu if isinstance(gpu, str) and gpu else None
        bits = int(bits) if isinstance(bits, (int, float)) and bits == bits else None
        for key in efficiency_keys(family(r), gpu, bits):
            groups.setdefault(key, []).append(eff)
    out = {}
    for key, values in sorted(groups.items()):
        median = statistics.median(values)
        out[key] = {"efficiency": round(median, 4),
                    "spread": round(max(abs(v / median - 1) for v in values), 4), "rows": len(values)}
    return out
