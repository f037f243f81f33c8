"""The report's frame: the run rows plus the numbers the table and plots show.

`build_report` loads a results folder, derives per-row columns (approach, GiB, time,
prediction error, cost), picks the baseline, applies --where/--sort, marks the Pareto
front and writes the notes that explain the derived columns.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qlora_ray import report_cost
from qlora_ray.units import GIB, hms

if TYPE_CHECKING:
    import pandas as pd

MISSING = "—"

# The default row order: smallest card first, then the 16-bit baseline before quantized cells.
DEFAULT_SORT = [
    ("card_gib", True), ("gpu_label", True), ("quant_bits", False), ("quant_type", True),
    ("lora_r", True), ("batch_size", True), ("grad_accum", True), ("name", True),
]


class ReportError(Exception):
    """Something about the user's input or results; `code` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclass
class Report:
    title: str
    folder: str  # the spec folder the report belongs next to
    frame: pd.DataFrame  # the run columns plus the derived ones, filtered and sorted
    baseline: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)
    total_rows: int = 0  # before --where
    skipped: list[str] = field(default_factory=list)  # unreadable files in the results folder


def build_report(
    path: str, *, baseline: str | None = None, where: str | None = None, sort: str | None = None
) -> Report:
    """Load RESULTS/<spec>, derive the table's numbers, apply --baseline/--where/--sort."""
    from qlora_ray import results, results_load

    try:
        runs = results_load.runs_folder(str(path))
    except FileNotFoundError as e:
        raise ReportError(str(e)) from e
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", results.ResultsWarning)
        df = results_load.load(runs)
    notes = [str(w.message) for w in caught if issubclass(w.category, results.ResultsWarning)]
    if df.empty:
        raise ReportError(f"no result rows in {runs} yet" + "".join(f"; {n}" for n in notes), code=1)

    folder = runs[: -len("/runs")] if runs.endswith("/runs") else runs
    df = _sorted(derive(df), DEFAULT_SORT)
    base = choose_baseline(df, baseline)
    df = relative_to(df, base)
    total = len(df)
    if where:
        df = _query(df, where)
    df["pareto"] = pareto_column(df)
    df["pareto_cost"] = report_cost.pareto_cost_column(df)
    if sort:
        df = _sorted(df, _parse_sort(sort, df))
    spec_names = df["spec_name"].dropna()
    title = str(spec_names.mode().iloc[0]) if len(spec_names) else folder.rstrip("/").rsplit("/", 1)[-1]
    report = Report(title, folder, df.reset_index(drop=True), base, total_rows=total, skipped=notes)
    report.notes = explain(report, where) + notes
    return report


def derive(df: pd.DataFrame) -> pd.DataFrame:
    """Add the per-row numbers that need no other row: labels, GiB, time, prediction error."""
    import pandas as pd

    df = df.copy()
    labels = [approach_label(b, t) for b, t in zip(df["quant_bits"], df["quant_type"], strict=True)]
    df["approach"] = pd.array(labels, dtype="string")
    df["gpu_label"] = pd.array([_gpu_label(r) for r in df.to_dict("records")], dtype="string")
    df["card_gib"] = pd.array([_card_gib(r) for r in df.to_dict("records")], dtype="Float64")
    df["train_time"] = pd.array([format_duration(s) for s in df["train_seconds"]], dtype="string")
    df["peak_gib"] = df["peak_memory_bytes"].astype("Float64") / GIB
    # Like with like: the predicted training peak against the measured training peak
    # (`peak_train_bytes` where the worker records it, else `peak_memory_bytes`, which is the
    # training phase's); rows from before the split carry only `predicted_peak_bytes`.
    measured = _first_present(df, "peak_train_bytes", "peak_memory_bytes") / GIB
    df["predicted_gib"] = _first_present(df, "predicted_train_bytes", "predicted_peak_bytes") / GIB
    # Positive: the planner over-predicted (safe side); negative: the run used more.
    df["predicted_error_pct"] = (df["predicted_gib"] - measured) / measured * 100
    return report_cost.derive(df)


def _first_present(df: pd.DataFrame, *columns: str) -> pd.Series:
    """Per row, the first of `columns` that the frame has and the row fills (bytes, Float64)."""
    out = None
    for column in columns:
        if column in df.columns:
            values = df[column].astype("Float64")
            out = values if out is None else out.fillna(values)
    return out


def approach_label(bits: Any, quant_type: Any) -> str:
    """"LoRA 16-bit", "LoRA 8-bit", "QLoRA 4-bit nf4": what the published tables call Approach."""
    if missing(bits):
        return MISSING
    bits = int(bits)
    if bits == 16:
        return "LoRA 16-bit"
    if bits == 8:
        return "LoRA 8-bit"
    if bits == 4:
        return "QLoRA 4-bit" + ("" if missing(quant_type) else f" {quant_type}")
    return f"LoRA {bits}-bit"


def batch_label(r: dict[str, Any]) -> str:
    """"4 x 2": the batch size (the requested one if the run never settled one) by grad accumulation."""
    bs = r["batch_size"] if not missing(r["batch_size"]) else r["batch_size_requested"]
    if missing(bs):
        return MISSING
    return f"{bs}" if missing(r["grad_accum"]) else f"{bs} x {r['grad_accum']}"


def _gpu_label(row: dict[str, Any]) -> str:
    gpu, device = row.get("gpu"), row.get("device")
    if not missing(gpu):
        return f"{gpu} (ran on CPU)" if row.get("cpu_fallback") is True else str(gpu)
    if not missing(device) and str(device).startswith("cpu"):
        return "cpu"
    return MISSING if missing(row.get("device_name")) else str(row["device_name"])


def _card_gib(row: dict[str, Any]) -> float | None:
    """The card's memory from its GPU profile (what nvidia-smi reports), in GiB."""
    from qlora_ray.config import ConfigError
    from qlora_ray.profiles import get_profile

    gpu = row.get("gpu")
    if missing(gpu):
        return None
    try:
        mib = get_profile(str(gpu)).total_mib
    except ConfigError:
        # A profile defined in the spec, not built in: the device the run saw is the next best.
        total = row.get("device_total_memory_bytes")
        on_gpu = not missing(row.get("device")) and str(row["device"]).startswith("cuda")
        return total / GIB if on_gpu and not missing(total) else None
    return mib / 1024 if mib else None


def choose_baseline(df: pd.DataFrame, name: str | None) -> dict[str, Any] | None:
    """The row memory is relative to: `name` (or experiment_id), else the first ok 16-bit run."""
    if name is not None:
        match = df[(df["name"] == name) | (df["experiment_id"] == name)]
        if match.empty:
            names = ", ".join(sorted(df["name"].dropna().unique())[:20])
            raise ReportError(f"--baseline {name!r} is not a run in these results; runs: {names}")
        return match.iloc[0].to_dict()
    candidates = df[(df["quant_bits"] == 16) & (df["status"] == "ok") & df["peak_gib"].notna()]
    return None if candidates.empty else candidates.iloc[0].to_dict()


def relative_to(df: pd.DataFrame, base: dict[str, Any] | None) -> pd.DataFrame:
    import pandas as pd

    df = df.copy()
    base_peak = None if base is None else base.get("peak_gib")
    base_card = None if base is None else base.get("card_gib")
    df["peak_vs_baseline"] = df["peak_gib"] / (pd.NA if missing(base_peak) else base_peak)
    df["card_size_ratio"] = df["card_gib"] / (pd.NA if missing(base_card) else base_card)
    return df


def pareto_front(times: Sequence[float], scores: Sequence[float]) -> list[bool]:
    """True where no other point is at least as fast and as good, and better in one of them.

    Both axes are minimized (training time, similarity score). Equal points all stay on it.
    """
    points = list(zip(times, scores, strict=True))
    return [
        not any(t2 <= t and s2 <= s and (t2 < t or s2 < s) for t2, s2 in points)
        for t, s in points
    ]


def pareto_column(df: pd.DataFrame) -> pd.Series:
    """Pareto membership among the ok rows with a time and a score; NA for the others."""
    import pandas as pd

    eligible = (df["status"] == "ok") & df["train_seconds"].notna() & df["similarity_score"].notna()
    eligible = eligible.fillna(False).astype(bool)
    out = pd.Series(pd.NA, index=df.index, dtype="boolean")
    sub = df[eligible]
    if len(sub):
        out[eligible] = pareto_front(sub["train_seconds"].astype(float).tolist(),
                                     sub["similarity_score"].astype(float).tolist())
    return out


def _query(df: pd.DataFrame, where: str) -> pd.DataFrame:
    from qlora_ray.where import WhereError, where_mask

    try:
        mask = where_mask(df, where)
    except (WhereError, TypeError, ValueError) as e:
        cols = ", ".join(c for c in df.columns if c.isidentifier())
        raise ReportError(f"--where {where!r} failed: {e}\ncolumns you can use: {cols}") from e
    out = df[mask]
    if out.empty:
        raise ReportError(f"no rows match --where {where!r} (of {len(df)} rows)", code=1)
    return out


def _parse_sort(sort: str, df: pd.DataFrame) -> list[tuple[str, bool]]:
    keys = []
    for raw in (k.strip() for k in sort.split(",")):
        if not raw:
            continue
        col = raw.lstrip("-")
        if col not in df.columns:
            raise ReportError(f"--sort: unknown column {col!r}; columns: {', '.join(df.columns)}")
        keys.append((col, not raw.startswith("-")))
    return keys


def _sorted(df: pd.DataFrame, keys: list[tuple[str, bool]]) -> pd.DataFrame:
    if not keys:
        return df
    cols, ascending = zip(*keys, strict=True)
    return df.sort_values(list(cols), ascending=list(ascending), na_position="last", kind="stable")


def explain(report: Report, where: str | None) -> list[str]:
    """The sentences under the table that say what each derived column means."""
    df, base = report.frame, report.baseline
    notes = []
    if where:
        notes.append(f"Rows matching `--where {where}`: {len(df)} of {report.total_rows}.")
    if base is None:
        notes.append("Peak vs baseline and card size ratio are empty: there is no ok 16-bit run "
                     "with a measured peak; pick one with `--baseline NAME`.")
    else:
        peak = base.get("peak_gib")
        measured = "no measured peak" if missing(peak) else f"{peak:.2f} GiB peak"
        notes.append(f"Baseline: {base['name']} ({base['approach']} on {base['gpu_label']}, {measured}). "
                     "Peak vs baseline divides each measured peak by the baseline's.")
    notes.append("Card size ratio: the card's memory over the baseline card's, from the GPU profiles. "
                 "It describes the hardware, not the run (the 'VRAM' column of published tables).")
    sources = sorted(df["memory_source"].dropna().unique())
    if sources:
        shown = "per cell" if len(sources) > 1 else sources[0]
        notes.append(f"Peak GiB: measured peak memory ({shown}). "
                     "Predicted: the planner's estimate of the training peak before the run, with "
                     "its error against the measured training peak, (predicted - measured) / measured.")
    if "cpu_rss" in sources:
        notes.append("cpu_rss is the whole process's resident memory (Python, torch, data), which the "
                     "planner's GPU-memory prediction does not model: expect a negative error on CPU.")
    notes.append("Similarity: 1 - cosine similarity of generated and reference answers, before -> "
                 "after training; lower is better. Pareto: on the front of training time against "
                 "similarity among the ok rows shown.")
    embedders = set(df["embedder"].dropna())
    if "self" in embedders:
        notes.append("Embedder `self`: each cell embeds with its own base model (adapter off), so its "
                     "before and after share one ruler; across quantizations the ruler differs a "
                     "little (on identical pairs the built-in model's mean score moves by about "
                     "0.01 between NF4 and fp32/bf16, single pairs by up to 0.05; "
                     "benchmarks/similarity_ruler.py), which a fixed `eval.similarity.embedder` removes.")
    if df["accuracy"].notna().any():
        notes.append("Accuracy: the label found earliest in the answer (as a whole word) against the "
                     "reference label. Majority: the accuracy of always answering the eval split's "
                     "most common label, the floor a useful model beats.")
    for note in dict.fromkeys(df["labels_note"].dropna()):
        notes.append(f"No accuracy: {note}.")
    if not df["train_steps"].dropna().empty:
        notes.append("Epochs (steps): optimizer steps taken; a packed cell takes fewer, fuller ones "
                     "than an unpacked cell over the same epochs.")
    return notes + report_cost.notes(df)


# ---------------------------------------------------------------------------------------
# formatting


def missing(x: Any) -> bool:
    import pandas as pd

    return x is None or (not isinstance(x, (str, list, tuple, dict)) and bool(pd.isna(x)))


def format_duration(seconds: Any) -> str:
    """Seconds -> h:mm:ss (hours unbounded), rounded to the second."""
    return MISSING if missing(seconds) else hms(seconds)
