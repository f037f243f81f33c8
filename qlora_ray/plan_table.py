"""What `qlora-ray plan` prints: the table of cells, the grid's total, problems and notes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qlora_ray.table import table
from qlora_ray.units import GIB, hms

if TYPE_CHECKING:
    from qlora_ray.planner import CellPlan


def render_table(plans: list[CellPlan]) -> str:
    header = ("name", "gpu", "bs", "dtype", "train GiB", "eval GiB", "range GiB", "GPU GiB", "headroom",
              "fits", "train", "GPU h", "$", "problems")
    rows = []
    for p in plans:
        gpu_gib = p.profile.usable_bytes / GIB if p.profile and p.profile.is_gpu else None
        est, t = p.estimate, p.time
        rows.append((
            p.name, p.gpu or "-", str(p.batch_size), p.compute_dtype,
            f"{est.train_bytes / GIB:.2f}" if est else "-",
            f"{est.eval_bytes / GIB:.2f}" if est else "-",
            f"{est.peak_range[0] / GIB:.1f}-{est.peak_range[1] / GIB:.1f}" if est else "-",
            f"{gpu_gib:.1f}" if gpu_gib is not None else "-",
            f"{p.headroom:+.0%}" if p.headroom is not None else "-",
            "NO" if not p.fits else "tight" if p.tight else "yes",
            hms(t.train_seconds) if t else "-",
            _small(t.gpu_seconds / 3600) if t else "-",
            _small(t.usd) if t and t.usd is not None else "-",
            str(len(p.problems)) if p.problems else "",
        ))
    lines = table(header, rows, right=(2, 4, 5, 6, 7, 8, 10, 11, 12, 13))
    lines.append(total_line(plans))
    detail = [f"  {p.name}: {msg}" for p in plans for msg in p.problems]
    sources = sorted({p.shape.source for p in plans if p.shape})
    if detail:
        lines += ["", "problems (these cells cannot run as specified):", *detail]
    notes = _grouped((p.name, msg) for p in plans for msg in p.notes)
    if notes:
        lines += ["", "notes:", *notes]
    if sources:
        lines += ["", "memory sized for token lengths from: " + "; ".join(sources)]
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
