"""Predicted peak GPU memory of one cell, training and eval, from the model's `config.json`.

Pure arithmetic (no torch, no weights): `estimate` takes the tensors `memory_terms` counts
and adds what the card holds beyond them (CUDA context, allocator slack), with a range.
How each term was found and checked is in docs/memory.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qlora_ray.architecture import Architecture, adapted_modules, architecture
from qlora_ray.config import ExperimentConfig
from qlora_ray.memory_terms import DEFAULT_RECIPE, ModelTerms, Recipe, Shape
from qlora_ray.profiles import GpuProfile

__all__ = ["Architecture", "Estimate", "Recipe", "Shape", "adapted_modules", "architecture", "estimate",
           "largest_batch"]

MiB = 1024**2

# What the card holds beyond PyTorch's tensors. The CUDA context with its loaded kernels
# (torch, cuBLAS, bitsandbytes) is 300-600 MiB with CUDA's lazy module loading; the
# caching allocator reserves more than it hands out (2 MiB segments, fragmentation): a few
# percent of the dynamic peak in short-sequence loops, and on fms-acceleration's published
# A100 runs of Mistral-7B at 4,096 tokens (nvidia-smi against max_memory_allocated, minus a
# context) 25-37%, so the high end reaches 40%. Midpoints predict; the ends make the range.
CUDA_CONTEXT_BYTES = (300 * MiB, 500 * MiB, 900 * MiB)
ALLOCATOR_SLACK = (0.0, 0.08, 0.40)
# The bound the estimate holds against the harness sweep (docs/memory.md): the range widens
# the dynamic part (what a step keeps alive beyond weights and optimizer state) by this
# much each way.
HARNESS_ERROR = 0.10


def worst_case_shape(cfg: ExperimentConfig) -> Shape:
    s = cfg.train.max_seq_len
    # Eval prompts are cut to leave room for the generated tokens (encoding.generation_prompts).
    return Shape(train_seq=s, eval_prompt=max(1, s - cfg.eval.max_new_tokens), eval_seq=s, reference=s)


@dataclass(frozen=True)
class Estimate:
    """Predicted training and eval peaks of one cell, what they are made of, and ranges.

    `*_bytes` are what the card holds (tensors + CUDA context + allocator slack; on the CPU
    profile tensors only). `breakdown` / `eval_breakdown` add up to `train_bytes` /
    `eval_bytes`. `*_range` is (low, high): the low end is what gating uses.
    """

    train_bytes: int
    eval_bytes: int
    train_range: tuple[int, int]
    eval_range: tuple[int, int]
    breakdown: dict[str, int]
    eval_breakdown: dict[str, int]
    # `forward`, `loss` or `layer`: which moment of the step is the peak.
    train_moment: str
    eval_moment: str
    problems: tuple[str, ...] = ()
    # Tensor bytes (weights included) at each moment of the training step.
    moment_tensors: dict[str, int] = field(default_factory=dict)

    @property
    def peak_bytes(self) -> int:
        """The larger of training and eval (the results contract's `predicted_peak_bytes`)."""
        return max(self.train_bytes, self.eval_bytes)

    @property
    def peak_range(self) -> tuple[int, int]:
        return (max(self.train_range[0], self.eval_range[0]), max(self.train_range[1], self.eval_range[1]))

    @property
    def allocated_bytes(self) -> int:
        """Training tensors only: what `torch.cuda.max_memory_allocated()` would see."""
        b = self.breakdown
        return self.train_bytes - b.get("cuda_context", 0) - b.get("allocator_slack", 0)


def estimate(
    model_config: dict[str, Any] | Architecture,
    cfg: ExperimentConfig,
    profile: GpuProfile | None = None,
    *,
    batch_size: int | None = None,
    shape: Shape | None = None,
    recipe: Recipe = DEFAULT_RECIPE,
    eval_batch_size: int | None = None,
    correction: float = 1.0,
    correction_spread: float | None = None,
) -> Estimate:
    """Predicted peaks of training and evaluating `cfg` on `profile`.

    `batch_size` overrides `cfg.train.batch_size` (needed when that is `auto`); `shape`
    gives the data's lengths (default: every row `max_seq_len`). `correction` scales the
    whole prediction (a `calibrate` file's factor for this family and card) and
    `correction_spread` is then its relative uncertainty (the range).
    """
    arch = model_config if isinstance(model_config, Architecture) else architecture(
        model_config, cfg.model.name)
    bs = batch_size if batch_size is not None else cfg.train.batch_size
    if not isinstance(bs, int):
        raise ValueError("train.batch_size is `auto`: pass the batch_size to estimate")
    shape = shape or worst_case_shape(cfg)
    m = ModelTerms(arch, cfg, profile, recipe)
    static = m.static()
    # A packed or padding-free micro-batch is one row of all its sequences end to end
    # (encoding.PadCollator), so its attention and mask span batch x seq tokens, not seq.
    one_row = cfg.dataset.packing or cfg.train.padding_free
    rows, seq = (1, bs * shape.train_seq) if one_row else (bs, shape.train_seq)
    moments = m.train_moments(rows, seq, shape.masked)
    train_moment, dynamic = max(moments.items(), key=lambda kv: sum(kv[1].values()))
    eval_rows = cfg.eval.batch_size if eval_batch_size is None else eval_batch_size
    evals = m.eval_moments(eval_rows, shape) if recipe.count_eval else {"none": {}}
    eval_moment, eval_dynamic = max(evals.items(), key=lambda kv: sum(kv[1].values()))
    gpu = profile is None or profile.is_gpu
    spread = correction_spread if correction_spread is not None else (
        None if correction == 1.0 else HARNESS_ERROR)
    train = _card(static, dynamic, gpu, correction, spread)
    evaluation = _card(static, eval_dynamic, gpu, correction, spread)
    return Estimate(
        train_bytes=sum(train[0].values()), eval_bytes=sum(evaluation[0].values()),
        train_range=train[1], eval_range=evaluation[1], breakdown=train[0],
        eval_breakdown=evaluation[0], train_moment=train_moment, eval_moment=eval_moment,
        problems=tuple(m.problems),
        moment_tensors={k: sum(static.values()) + sum(v.values()) for k, v in moments.items()},
    )


def _card(static: dict[str, int], dynamic: dict[str, int], gpu: bool, correction: float,
          spread: float | None) -> tuple[dict[str, int], tuple[int, int]]:
    """Parts adding up to what the card holds, and its (low, high) range.

    Without a correction the range is the harness error on the tensors plus the span of
    the GPU-only terms. With one (a `calibrate` file's factor for this family and card),
    the whole prediction is scaled, the difference is its own part, and the range is the
    spread the GPU rows showed.
    """
    parts = {k: v for k, v in {**static, **dynamic}.items() if v}
    tensors = sum(parts.values())
    dyn = sum(dynamic.values())
    lo_ctx, mid_ctx, hi_ctx = CUDA_CONTEXT_BYTES if gpu else (0, 0, 0)
    lo_slack, mid_slack, hi_slack = ALLOCATOR_SLACK if gpu else (0.0, 0.0, 0.0)
    if gpu:
        parts["allocator_slack"] = round(dyn * mid_slack)
        parts["cuda_context"] = mid_ctx
    if spread is None:
        # Weights, adapters and optimizer state are exact arithmetic (the harness matches
        # them to the byte); the error is in what a step keeps alive.
        low = tensors - dyn * HARNESS_ERROR + dyn * lo_slack + lo_ctx
        high = tensors + dyn * HARNESS_ERROR + dyn * hi_slack + hi_ctx
        return parts, (round(low), round(high))
    total = sum(parts.values())
    parts["calibration"] = round(total * (correction - 1))
    corrected = total + parts["calibration"]
    return parts, (round(corrected * (1 - spread)), round(corrected * (1 + spread)))


def largest_batch(
    model_config: dict[str, Any] | Architecture,
    cfg: ExperimentConfig,
    profile: GpuProfile,
    budget_bytes: int,
    *,
    limit: int = 1024,
    eval_batch_size: int | None = None,
    shape: Shape | None = None,
    recipe: Recipe = DEFAULT_RECIPE,
    correction: float = 1.0,
) -> int:
    """The largest micro-batch whose predicted peak is within `budget_bytes`; 0 if none.

    `eval_batch_size` overrides `cfg.eval.batch_size` (to ask "would a smaller one do?").
    The peak grows with the batch, so this bisects.
    """
    arch = model_config if isinstance(model_config, Architecture) else architecture(
        model_config, cfg.model.name)

    def fits(b: int) -> bool:
        est = estimate(arch, cfg, profile, batch_size=b, shape=shape, recipe=recipe,
                       eval_batch_size=eval_batch_size, correction=correction)
        return est.peak_bytes <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
