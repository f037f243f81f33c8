"""The report's plots: peak memory by rank, quality against time, predicted against measured."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from qlora_ray import report_cost
from qlora_ray.report_frame import Report, batch_label, format_duration

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

PLOTS = {
    "memory": ("report-memory.png",
               "Peak memory against LoRA rank and batch size, one panel per GPU profile; the dashed "
               "line is the card's capacity, a cross an out-of-memory cell."),
    "quality": ("report-quality-vs-time.png",
                "Similarity score (lower is better) against training time; ringed points are the "
                "Pareto front: no other cell is both faster and at least as good."),
    "prediction": ("report-predicted-vs-measured.png",
                   "The planner's predicted peak against the measured peak; on the diagonal the "
                   "prediction was exact, above it the run used more than predicted."),
    "cost": report_cost.PLOT,
}


def draw_plots(report: Report) -> dict[str, bytes]:
    """PNG bytes per plot key; a plot with nothing to show is left out and noted."""
    drawers = {"memory": plot_memory, "quality": plot_quality, "prediction": plot_prediction,
               "cost": report_cost.plot}
    reasons = {"memory": "no cell has a measured peak or an OOM",
               "quality": "no ok cell has both a training time and a similarity score",
               "prediction": "no ok cell has both a predicted and a measured peak",
               "cost": "no ok cell has both a cost (or held time) and a similarity score"}
    import matplotlib

    out: dict[str, bytes] = {}
    # Labels come from rows (GPU and run names): a `$` must print as a dollar sign, not
    # start matplotlib's math parser, which raises on what it cannot parse.
    with matplotlib.rc_context({"text.parse_math": False}):
        for key, draw in drawers.items():
            fig = draw(report.frame)
            if fig is None:
                report.notes.append(f"Plot not drawn ({PLOTS[key][0]}): {reasons[key]}.")
                continue
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110)
            out[key] = buf.getvalue()
    return out


def gpu_colors(df: pd.DataFrame) -> dict[str, str]:
    order = df.sort_values(["card_gib", "gpu_label"], na_position="last")["gpu_label"].unique()
    return {str(g): f"C{i % 10}" for i, g in enumerate(order)}


def approach_markers(df: pd.DataFrame) -> dict[str, str]:
    shapes = "osD^vPX*"
    return {str(a): shapes[i % len(shapes)] for i, a in enumerate(sorted(df["approach"].unique()))}


def _batch_order(label: str) -> tuple[int, ...]:
    """"2 x 2" -> (2, 2), so batch shapes sort numerically in legends."""
    return tuple(int(p) if p.isdigit() else 10**9 for p in label.split(" x "))


def _time_locator(max_seconds: float) -> Any:
    """Ticks on round durations (1 min, 5 min, 1 h...) instead of matplotlib's decimal steps."""
    from matplotlib.ticker import MaxNLocator, MultipleLocator

    for step in (1, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800, 86400):
        if max_seconds / step <= 8:
            return MultipleLocator(step)
    return MaxNLocator(8)


def flag(mask: pd.Series) -> pd.Series:
    return mask.fillna(False).astype(bool)


def plot_memory(df: pd.DataFrame) -> Figure | None:
    """Peak GiB against rank, a line per (approach, batch), a panel per GPU, capacity dashed."""
    import pandas as pd
    from matplotlib.figure import Figure

    has_rank = flag(df["lora_r"].notna())
    measured = df[flag((df["status"] == "ok") & df["peak_gib"].notna()) & has_rank]
    ooms = df[flag(df["status"] == "oom") & has_rank]
    if measured.empty and ooms.empty:
        return None
    shown = df.loc[measured.index.union(ooms.index)]
    gpus = list(gpu_colors(shown))
    markers = approach_markers(df)
    # One colour per batch shape across all panels, so "batch 4" reads the same everywhere.
    batches = sorted({batch_label(r) for r in measured.to_dict("records")}, key=_batch_order)
    batch_colors = {b: f"C{i % 10}" for i, b in enumerate(batches)}
    fig = Figure(figsize=(max(5.0, 4.2 * len(gpus)), 4.4), layout="constrained")
    axes = fig.subplots(1, len(gpus), squeeze=False)[0]
    for ax, gpu in zip(axes, gpus, strict=True):
        on = measured[measured["gpu_label"] == gpu]
        batch_of = pd.Series([batch_label(r) for r in on.to_dict("records")], index=on.index, dtype=object)
        for (approach, batch), grp in on.groupby(["approach", batch_of], sort=True):
            line = grp.groupby("lora_r")["peak_gib"].mean()  # repeats (seeds) as one point
            ax.plot(line.index.astype(int), line.to_numpy(float), marker=markers[str(approach)],
                    color=batch_colors[batch], label=f"{approach}, batch {batch}")
        cap = shown.loc[shown["gpu_label"] == gpu, "card_gib"].dropna()
        capacity = float(cap.iloc[0]) if len(cap) else None
        if capacity:
            ax.axhline(capacity, ls="--", color="0.35", lw=1)
            ax.annotate(f"{gpu} capacity {capacity:.1f} GiB", (0.99, capacity), va="bottom", ha="right",
                        xycoords=("axes fraction", "data"), fontsize=8, color="0.35")
        oom_here = ooms[ooms["gpu_label"] == gpu]
        if len(oom_here):
            y = [capacity if capacity else p for p in oom_here["peak_gib"].astype(float).fillna(0)]
            ax.scatter(oom_here["lora_r"].astype(int), y, marker="x", s=70, color="red", zorder=3,
                       label="out of memory")
        ranks = sorted({int(r) for r in shown.loc[shown["gpu_label"] == gpu, "lora_r"]})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.set_ylim(0, max([capacity or 0, *on["peak_gib"].astype(float), 1]) * 1.15)
        ax.set_title(gpu if capacity else f"{gpu} (no card capacity)")
        ax.set_xlabel("LoRA rank")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("peak memory (GiB)")
    figure_legend(fig, axes)
    return fig


def figure_legend(fig: Figure, axes: Sequence[Any]) -> None:
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center",
                   ncols=min(3, len(seen)), fontsize=8, frameon=False)


def plot_quality(df: pd.DataFrame) -> Figure | None:
    """Similarity score against training time, coloured by GPU, Pareto front ringed and joined."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    pts = df[flag(df["pareto"].notna())]
    if pts.empty:
        return None
    colors, markers = gpu_colors(df), approach_markers(df)
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    ax = fig.subplots()
    for (gpu, approach), grp in pts.groupby(["gpu_label", "approach"], sort=True):
        ax.scatter(grp["train_seconds"].astype(float), grp["similarity_score"].astype(float),
                   color=colors[str(gpu)], marker=markers[str(approach)], s=40, zorder=2,
                   label=f"{gpu}, {approach}")
    front = pts[flag(pts["pareto"])].sort_values("train_seconds")
    x, y = front["train_seconds"].astype(float), front["similarity_score"].astype(float)
    ax.plot(x, y, drawstyle="steps-post", color="black", lw=1, zorder=1)
    ax.scatter(x, y, s=170, facecolors="none", edgecolors="black", zorder=3, label="Pareto front")
    for name, xi, yi in zip(front["name"], x, y, strict=True):
        ax.annotate(str(name), (xi, yi), xytext=(6, 4), textcoords="offset points", fontsize=7)
    ax.xaxis.set_major_locator(_time_locator(float(pts["train_seconds"].max())))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_duration(v) if v >= 0 else ""))
    ax.set_xlabel("training time (h:mm:ss)")
    ax.set_ylabel("similarity score (lower is better)")
    ax.grid(alpha=0.3)
    figure_legend(fig, [ax])
    return fig


def plot_prediction(df: pd.DataFrame) -> Figure | None:
    """Measured against predicted peak, one colour per GPU, the diagonal is a perfect plan."""
    from matplotlib.figure import Figure

    pts = df[flag((df["status"] == "ok") & df["peak_gib"].notna() & df["predicted_gib"].notna())]
    if pts.empty:
        return None
    colors = gpu_colors(df)
    fig = Figure(figsize=(5.5, 5.2), layout="constrained")
    ax = fig.subplots()
    for gpu, grp in pts.groupby("gpu_label", sort=True):
        ax.scatter(grp["predicted_gib"].astype(float), grp["peak_gib"].astype(float),
                   color=colors[str(gpu)], s=40, label=str(gpu), zorder=2)
    top = max(float(pts["predicted_gib"].max()), float(pts["peak_gib"].max())) * 1.1
    ax.plot([0, top], [0, top], color="0.4", lw=1, ls="--", zorder=1, label="prediction = measurement")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_aspect("equal")
    ax.set_xlabel("predicted peak (GiB)")
    ax.set_ylabel("measured peak (GiB)")
    ax.grid(alpha=0.3)
    figure_legend(fig, [ax])
    return fig


# ---------------------------------------------------------------------------------------
# files
