"""The report's time and money: predicted vs measured time, cost per run and per quality
point, quality against cost with its Pareto front (docs/time.md defines each)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

PLOT = ("report-quality-vs-cost.png",
        "Similarity score (lower is better) against the cost of each run (dollars, or hours held "
        "when no price is known); ringed points are the Pareto front: no other run is both "
        "cheaper and at least as good.")
CSV_COLUMNS = ["predicted_seconds", "predicted_time_error_pct", "cell_seconds", "cost_usd",
               "usd_per_quality_point"]


def derive(df: pd.DataFrame) -> pd.DataFrame:
    """Add cell_seconds, cost_usd, predicted_time_error_pct, quality_points, usd_per_quality_point."""
    import pandas as pd

    df = df.copy()
    held = (df["finished_at"] - df["started_at"]).dt.total_seconds()
    df["cell_seconds"] = pd.array(held, dtype="Float64")
    df["cost_usd"] = df["cell_seconds"] / 3600 * df["usd_per_hour"].astype("Float64")
    measured = df["train_seconds"].astype("Float64")
    # Positive: the planner over-predicted (the run was faster than planned).
    df["predicted_time_error_pct"] = (df["predicted_seconds"].astype("Float64") - measured) / measured * 100
    gain = (df["similarity_score_before"].astype("Float64") - df["similarity_score"].astype("Float64")) * 100
    df["quality_points"] = gain
    df["usd_per_quality_point"] = df["cost_usd"] / gain.where(gain > 0)
    return df


def pareto_cost_column(df: pd.DataFrame) -> pd.Series:
    """Front membership of (cost, similarity) among ok rows that have both; NA for the others."""
    import pandas as pd

    from qlora_ray.report_frame import pareto_front

    cost = _cost_axis(df)[0]
    eligible = (df["status"] == "ok") & cost.notna() & df["similarity_score"].notna()
    eligible = eligible.fillna(False).astype(bool)
    out = pd.Series(pd.NA, index=df.index, dtype="boolean")
    if eligible.any():
        out[eligible] = pareto_front(cost[eligible].astype(float).tolist(),
                                     df.loc[eligible, "similarity_score"].astype(float).tolist())
    return out


def _cost_axis(df: pd.DataFrame) -> tuple[pd.Series, str]:
    """Dollars when every ok row has a price, else hours held (one unit for the whole plot)."""
    ok = (df["status"] == "ok").fillna(False).astype(bool)
    if ok.any() and df.loc[ok, "cost_usd"].notna().all():
        return df["cost_usd"], "cost of the run (US dollars)"
    return df["cell_seconds"] / 3600, "time the run held its device (hours)"


def has_prices(df: pd.DataFrame) -> bool:
    return bool(df["cost_usd"].notna().any())


def predicted_time(r: dict[str, Any]) -> str:
    from qlora_ray.report_frame import MISSING, format_duration, missing

    if missing(r.get("predicted_seconds")):
        return MISSING
    err = r.get("predicted_time_error_pct")
    return format_duration(r["predicted_seconds"]) + ("" if missing(err) else f" ({err:+.0f}%)")


def money(x: Any) -> str:
    from qlora_ray.report_frame import MISSING, missing

    if missing(x):
        return MISSING
    return f"${x:,.2f}" if x >= 0.995 else f"${x:.3f}"


def notes(df: pd.DataFrame) -> list[str]:
    out = ["Predicted time: the planner's training time before the run, with its error "
           "(predicted - measured) / measured against the measured training time."]
    if has_prices(df):
        out.append("Cost: the run's wall time on its card (finished - started) times the price per "
                   "GPU-hour it was planned with. $ per quality point: that cost over the "
                   "similarity gained, in hundredths (before - after); empty when training did not "
                   "improve the score.")
    return out


def plot(df: pd.DataFrame) -> Figure | None:
    """Similarity against cost, coloured by GPU, the Pareto front ringed and joined."""
    from matplotlib.figure import Figure

    from qlora_ray.report_plots import approach_markers, figure_legend, flag, gpu_colors

    front_of = df["pareto_cost"] if "pareto_cost" in df else pareto_cost_column(df)
    pts = df[flag(front_of.notna())]
    if pts.empty:
        return None
    cost, label = _cost_axis(df)
    colors, markers = gpu_colors(df), approach_markers(df)
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    ax = fig.subplots()
    for (gpu, approach), grp in pts.groupby(["gpu_label", "approach"], sort=True):
        ax.scatter(cost[grp.index].astype(float), grp["similarity_score"].astype(float),
                   color=colors[str(gpu)], marker=markers[str(approach)], s=40, zorder=2,
                   label=f"{gpu}, {approach}")
    front = pts[flag(front_of[pts.index])]
    order = cost[front.index].astype(float).sort_values().index
    x, y = cost[order].astype(float), front.loc[order, "similarity_score"].astype(float)
    ax.plot(x, y, drawstyle="steps-post", color="black", lw=1, zorder=1)
    ax.scatter(x, y, s=170, facecolors="none", edgecolors="black", zorder=3, label="Pareto front")
    for name, xi, yi in zip(front.loc[order, "name"], x, y, strict=True):
        ax.annotate(str(name), (xi, yi), xytext=(6, 4), textcoords="offset points", fontsize=7)
    ax.set_xlabel(label)
    ax.set_ylabel("similarity score (lower is better)")
    ax.grid(alpha=0.3)
    figure_legend(fig, [ax])
    return fig
