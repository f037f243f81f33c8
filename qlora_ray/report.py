"""`qlora-ray report RESULTS/<spec name>`: the comparison table and the plots.

    qlora-ray report results/rank-vs-gpu                      # markdown table on stdout
    qlora-ray report results/rank-vs-gpu --where "gpu == 'T4'" --sort=-tokens_per_second
    qlora-ray report results/rank-vs-gpu --format csv > grid.csv

Next to the results (or in `--out`) it writes `report.md`, a self-contained `report.html`
(the plots embedded as data URIs, so the file can be mailed or attached to an issue), and
the plots as PNGs. Every cell of the grid is a row of the table, whatever its status: an
`oom` or `unschedulable` cell shows its status and reason instead of numbers.

The published QLoRA comparisons put the *card size ratio* in their "VRAM" column. Here the
measured peak and its ratio to a baseline run are separate columns from the card size
ratio, so that the two are never confused.

pandas and matplotlib are imported inside the functions that need them: the CLI imports
this module to build `--help`.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import os
import re
import sys
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qlora_ray import report_cost

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

FORMATS = ("markdown", "csv", "html")
GIB = 1024**3
MISSING = "—"
STATUS_REASON_CHARS = 100

# Columns of `--format csv`: the table's numbers unformatted (gpu is the display label).
CSV_COLUMNS = [
    "name", "experiment_id", "approach", "gpu_label", "lora_r", "epochs", "max_steps", "train_steps",
    "batch_size", "grad_accum", "train_seconds", "train_time", "tokens_per_second",
    "similarity_score_before", "similarity_score", "accuracy", "f1", "accuracy_majority", "peak_gib",
    "memory_source", "peak_vs_baseline", "card_gib",
    "card_size_ratio", "predicted_gib", "predicted_error_pct", "pareto", "status", "error_phase", "error",
    *report_cost.CSV_COLUMNS,
]

# The default row order: smallest card first, then the 16-bit baseline before quantized cells.
DEFAULT_SORT = [
    ("card_gib", True), ("gpu_label", True), ("quant_bits", False), ("quant_type", True),
    ("lora_r", True), ("batch_size", True), ("grad_accum", True), ("name", True),
]

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


class ReportError(Exception):
    """Something about the user's input or results; `code` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", help="The spec's results folder, RESULTS/<spec name> (or its runs/).")
    parser.add_argument("--format", choices=FORMATS, default="markdown",
                        help="What to print: the markdown table (default), CSV of the table's "
                             "numbers, or the whole HTML report.")
    parser.add_argument("--sort", default=None, metavar="COLS",
                        help="Comma-separated columns to sort by, `-` for descending, e.g. "
                             "--sort=-tokens_per_second or --sort gpu,similarity_score. Any run "
                             "column or a table number (peak_gib, peak_vs_baseline, ...).")
    parser.add_argument("--where", default=None, metavar="FILTER",
                        help="Keep the rows matching comparisons of columns with values, joined by "
                             "and / or / not, e.g. \"gpu == 'T4'\", \"status == 'ok' and lora_r >= 8\", "
                             "\"gpu in ['T4', 'L4']\". Nothing else is evaluated (no calls, no attributes).")
    parser.add_argument("--baseline", default=None, metavar="NAME",
                        help="Run (name or experiment_id) that peak memory and card size are "
                             "relative to; default: the first ok 16-bit run in table order.")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="Where to write report.md, report.html and the PNGs "
                             "(default: the results folder).")


def main(args: argparse.Namespace) -> int:
    try:
        report = build_report(args.results, baseline=args.baseline, where=args.where, sort=args.sort)
    except ReportError as e:
        print(f"qlora-ray report: {e}", file=sys.stderr)
        return e.code
    plots = draw_plots(report)
    render = {"markdown": render_markdown, "csv": render_csv, "html": render_html}[args.format]
    print(render(report, plots))
    if args.format != "markdown":
        # CSV and HTML on stdout carry no notes; a skipped file must still be seen.
        for message in report.skipped:
            print(f"qlora-ray report: {message}", file=sys.stderr)
    out = args.out or report.folder
    try:
        written = write_report(report, plots, out)
    except ReportError as e:
        print(f"qlora-ray report: {e}", file=sys.stderr)
        return e.code
    except OSError as e:
        print(f"qlora-ray report: could not write the report files to {out} ({e}); "
              "choose another folder with --out DIR", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(written)}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------
# the report: rows plus derived numbers


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
    from qlora_ray import results

    try:
        runs = results._runs_folder(str(path))
    except FileNotFoundError as e:
        raise ReportError(str(e)) from e
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", results.ResultsWarning)
        df = results.load(runs)
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
    if _missing(bits):
        return MISSING
    bits = int(bits)
    if bits == 16:
        return "LoRA 16-bit"
    if bits == 8:
        return "LoRA 8-bit"
    if bits == 4:
        return "QLoRA 4-bit" + ("" if _missing(quant_type) else f" {quant_type}")
    return f"LoRA {bits}-bit"


def _gpu_label(row: dict[str, Any]) -> str:
    gpu, device = row.get("gpu"), row.get("device")
    if not _missing(gpu):
        return f"{gpu} (ran on CPU)" if row.get("cpu_fallback") is True else str(gpu)
    if not _missing(device) and str(device).startswith("cpu"):
        return "cpu"
    return MISSING if _missing(row.get("device_name")) else str(row["device_name"])


def _card_gib(row: dict[str, Any]) -> float | None:
    """The card's memory from its GPU profile (what nvidia-smi reports), in GiB."""
    from qlora_ray.config import ConfigError
    from qlora_ray.profiles import get_profile

    gpu = row.get("gpu")
    if _missing(gpu):
        return None
    try:
        mib = get_profile(str(gpu)).total_mib
    except ConfigError:
        # A profile defined in the spec, not built in: the device the run saw is the next best.
        total = row.get("device_total_memory_bytes")
        on_gpu = not _missing(row.get("device")) and str(row["device"]).startswith("cuda")
        return total / GIB if on_gpu and not _missing(total) else None
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
    df["peak_vs_baseline"] = df["peak_gib"] / (pd.NA if _missing(base_peak) else base_peak)
    df["card_size_ratio"] = df["card_gib"] / (pd.NA if _missing(base_card) else base_card)
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
        measured = "no measured peak" if _missing(peak) else f"{peak:.2f} GiB peak"
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


def _missing(x: Any) -> bool:
    import pandas as pd

    return x is None or (not isinstance(x, (str, list, tuple, dict)) and bool(pd.isna(x)))


def format_duration(seconds: Any) -> str:
    """Seconds -> h:mm:ss (hours unbounded), rounded to the second."""
    if _missing(seconds):
        return MISSING
    h, rest = divmod(round(float(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def format_ratio(x: Any) -> str:
    return MISSING if _missing(x) else f"{x:.2f}x"


def _num(x: Any, fmt: str) -> str:
    return MISSING if _missing(x) else format(x, fmt)


def _tokens(x: Any) -> str:
    return MISSING if _missing(x) else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}")


def _epochs(r: dict[str, Any]) -> str:
    if not _missing(r["max_steps"]):
        return f"{r['max_steps']} steps"
    steps = "" if _missing(r["train_steps"]) else f" ({r['train_steps']} steps)"
    return _num(r["epochs"], "g") + steps


def _batch(r: dict[str, Any]) -> str:
    bs = r["batch_size"] if not _missing(r["batch_size"]) else r["batch_size_requested"]
    if _missing(bs):
        return MISSING
    return f"{bs}" if _missing(r["grad_accum"]) else f"{bs} x {r['grad_accum']}"


def _similarity(r: dict[str, Any]) -> str:
    after, before = r["similarity_score"], r["similarity_score_before"]
    if _missing(after):
        return MISSING
    return f"{after:.3f}" if _missing(before) else f"{before:.3f} -> {after:.3f}"


def _peak(r: dict[str, Any], show_source: bool) -> str:
    if _missing(r["peak_gib"]):
        return MISSING
    return f"{r['peak_gib']:.2f}" + (f" ({r['memory_source']})" if show_source else "")


def _predicted(r: dict[str, Any]) -> str:
    if _missing(r["predicted_gib"]):
        return MISSING
    err = r["predicted_error_pct"]
    return f"{r['predicted_gib']:.2f}" + ("" if _missing(err) else f" ({err:+.0f}%)")


def _accuracy_f1(r: dict[str, Any]) -> str:
    if _missing(r["accuracy"]) and _missing(r["f1"]):
        return MISSING
    return f"{_num(r['accuracy'], '.3f')} / {_num(r['f1'], '.3f')}"


def _pareto(x: Any) -> str:
    return MISSING if _missing(x) else ("yes" if x else "no")


def status_text(r: dict[str, Any], limit: int | None = STATUS_REASON_CHARS) -> str:
    """`ok`, or `oom (train): CUDA out of memory...`: the status with its reason."""
    text = str(r["status"]) if not _missing(r["status"]) else MISSING
    if not _missing(r.get("error_phase")):
        text += f" ({r['error_phase']})"
    if not _missing(r.get("error")):
        reason = " ".join(str(r["error"]).split())
        if limit is not None:
            # The worker appends where the exception was raised; the table has no room for it.
            reason = re.sub(r" \(at [^()]*:\d+ in [^()]*\)$", "", reason)
        if limit is not None and len(reason) > limit:
            reason = reason[: limit - 1] + "…"
        text += f": {reason}"
    return text


@dataclass
class Column:
    header: str
    cells: list[str]
    numeric: bool = False


def table_columns(report: Report) -> list[Column]:
    """The comparison table as display strings, one Column per table column."""
    rows = report.frame.to_dict("records")
    show_source = report.frame["memory_source"].dropna().nunique() > 1

    def col(header: str, fn: Any, numeric: bool = False) -> Column:
        return Column(header, [fn(r) for r in rows], numeric)

    columns = [
        col("Name", lambda r: str(r["name"])),
        col("Approach", lambda r: str(r["approach"])),
        col("GPU", lambda r: str(r["gpu_label"])),
        col("Rank", lambda r: _num(r["lora_r"], "d"), True),
        col("Epochs", _epochs, True),
        col("Batch x accum", _batch, True),
        col("Training time", lambda r: str(r["train_time"]), True),
        col("Predicted time (error)", report_cost.predicted_time, True),
        col("Tokens/s", lambda r: _tokens(r["tokens_per_second"]), True),
        col("Similarity (before -> after)", _similarity, True),
    ]
    if report.frame[["accuracy", "f1"]].notna().any().any():
        columns.append(col("Accuracy / F1", _accuracy_f1, True))
        columns.append(col("Majority", lambda r: _num(r["accuracy_majority"], ".3f"), True))
    if report_cost.has_prices(report.frame):
        columns += [col("Cost", lambda r: report_cost.money(r["cost_usd"]), True),
                    col("$ per quality point", lambda r: report_cost.money(r["usd_per_quality_point"]), True)]
    columns += [
        col("Peak GiB", lambda r: _peak(r, show_source), True),
        col("Peak vs baseline", lambda r: format_ratio(r["peak_vs_baseline"]), True),
        col("Card size ratio", lambda r: format_ratio(r["card_size_ratio"]), True),
        col("Predicted GiB (error)", _predicted, True),
        col("Pareto", lambda r: _pareto(r["pareto"])),
        col("Status", status_text),
    ]
    return columns


def summary(report: Report) -> str:
    counts = report.frame["status"].value_counts()
    parts = [f"{int(n)} {s}" for s, n in counts.items() if n]
    n = len(report.frame)
    return f"{n} cell{'s' if n != 1 else ''}: {', '.join(parts)}"


# Markdown renders inline HTML and links, so text from rows (names, errors: anything a
# results folder holds) is made inert: one line, and a backslash before every character
# that could open a tag, a link or an image, or end a table cell (CommonMark shows `\<`
# as `<`). Backslashes are escaped too, so text cannot cancel an escape.
_MD_SPECIAL = re.compile(r"([\\<\[\]|])")


def md_text(text: Any) -> str:
    """Text for a markdown table cell or line: newlines folded, markup characters escaped."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def markdown_table(columns: list[Column]) -> str:
    cells = [[md_text(c.header)] + [md_text(x) for x in c.cells] for c in columns]
    widths = [max(len(x) for x in col) for col in cells]
    lines = []
    for i in range(len(cells[0])):
        parts = [
            col[i].rjust(w) if c.numeric and i else col[i].ljust(w)
            for col, w, c in zip(cells, widths, columns, strict=True)
        ]
        lines.append("| " + " | ".join(parts) + " |")
        if i == 0:
            rule = [("-" * (w - 1) + ":") if c.numeric else "-" * w
                    for w, c in zip(widths, columns, strict=True)]
            lines.append("| " + " | ".join(rule) + " |")
    return "\n".join(lines)


def render_markdown(report: Report, plots: dict[str, bytes] | None = None) -> str:
    """What the CLI prints: summary, table, and what the columns mean."""
    notes = "\n".join(f"- {md_text(n)}" for n in report.notes)
    return f"{md_text(summary(report))}\n\n{markdown_table(table_columns(report))}\n\n{notes}"


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP "CSV
# injection"); a leading apostrophe makes it text. Only text columns are touched.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def render_csv(report: Report, plots: dict[str, bytes] | None = None) -> str:
    import pandas as pd

    out = report.frame[CSV_COLUMNS].rename(columns={"gpu_label": "gpu"}).copy()
    for col in out.columns:
        if not pd.api.types.is_numeric_dtype(out[col]) and not pd.api.types.is_bool_dtype(out[col]):
            out[col] = out[col].astype(object).map(csv_safe)
    for col, digits in [("peak_gib", 3), ("predicted_gib", 3), ("card_gib", 3),
                        ("peak_vs_baseline", 3), ("card_size_ratio", 3), ("predicted_error_pct", 1),
                        ("tokens_per_second", 1), ("predicted_seconds", 1),
                        ("predicted_time_error_pct", 1), ("cell_seconds", 1), ("cost_usd", 4),
                        ("usd_per_quality_point", 4)]:
        out[col] = out[col].round(digits)
    return out.to_csv(index=False).rstrip("\n")


def report_markdown(report: Report, plots: dict[str, bytes]) -> str:
    """report.md: the table plus the plots, linked as the PNGs written next to it."""
    parts = [f"# qlora-ray report: {md_text(report.title)}", render_markdown(report)]
    for key, png in plots.items():
        if png:
            filename, caption = PLOTS[key]
            parts.append(f"![{caption}]({filename})\n\n{caption}")
    return "\n\n".join(parts) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td:nth-child(-n+3) { white-space: nowrap; }
td.status-oom, td.status-failed, td.status-unschedulable { background: #fde8e8; }
td.status-skipped { background: #f4f4f4; }
figure { margin: 2em 0; } img { max-width: 100%; }
figcaption, li { color: #555; font-size: 14px; }
"""


def render_html(report: Report, plots: dict[str, bytes]) -> str:
    """A self-contained page: no external file, script, font or style, so it opens anywhere."""
    columns = table_columns(report)
    statuses = [str(s) for s in report.frame["status"]]
    full_status = [status_text(r, limit=None) for r in report.frame.to_dict("records")]
    head = "".join(f"<th>{html.escape(c.header)}</th>" for c in columns)
    body = []
    for i, status in enumerate(statuses):
        cells = []
        for c in columns:
            attrs = ' class="num"' if c.numeric else ""
            if c.header == "Status":
                attrs = f' class="status-{html.escape(status)}" title="{html.escape(full_status[i])}"'
            cells.append(f"<td{attrs}>{html.escape(c.cells[i])}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    figures = []
    for key, png in plots.items():
        if png:
            _, caption = PLOTS[key]
            data = base64.b64encode(png).decode("ascii")
            figures.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
    title = html.escape(f"qlora-ray report: {report.title}")
    # The CSP makes "self-contained" checkable: a browser refuses anything not inline.
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "img-src data:; style-src 'unsafe-inline'\">"
        f"<title>{title}</title><style>{_CSS}</style></head>\n<body>\n<h1>{title}</h1>\n"
        f"<p>{html.escape(summary(report))}</p>\n<table><thead><tr>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(body) + f"\n</tbody></table>\n<ul>{notes}</ul>\n" + "\n".join(figures)
        + "\n</body></html>\n"
    )


# ---------------------------------------------------------------------------------------
# plots


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


def _gpu_colors(df: pd.DataFrame) -> dict[str, str]:
    order = df.sort_values(["card_gib", "gpu_label"], na_position="last")["gpu_label"].unique()
    return {str(g): f"C{i % 10}" for i, g in enumerate(order)}


def _markers(df: pd.DataFrame) -> dict[str, str]:
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


def _flag(mask: pd.Series) -> pd.Series:
    return mask.fillna(False).astype(bool)


def plot_memory(df: pd.DataFrame) -> Figure | None:
    """Peak GiB against rank, a line per (approach, batch), a panel per GPU, capacity dashed."""
    import pandas as pd
    from matplotlib.figure import Figure

    has_rank = _flag(df["lora_r"].notna())
    measured = df[_flag((df["status"] == "ok") & df["peak_gib"].notna()) & has_rank]
    ooms = df[_flag(df["status"] == "oom") & has_rank]
    if measured.empty and ooms.empty:
        return None
    shown = df.loc[measured.index.union(ooms.index)]
    gpus = list(_gpu_colors(shown))
    markers = _markers(df)
    # One colour per batch shape across all panels, so "batch 4" reads the same everywhere.
    batches = sorted({_batch(r) for r in measured.to_dict("records")}, key=_batch_order)
    batch_colors = {b: f"C{i % 10}" for i, b in enumerate(batches)}
    fig = Figure(figsize=(max(5.0, 4.2 * len(gpus)), 4.4), layout="constrained")
    axes = fig.subplots(1, len(gpus), squeeze=False)[0]
    for ax, gpu in zip(axes, gpus, strict=True):
        on = measured[measured["gpu_label"] == gpu]
        batch_of = pd.Series([_batch(r) for r in on.to_dict("records")], index=on.index, dtype=object)
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
    _legend(fig, axes)
    return fig


def _legend(fig: Figure, axes: Sequence[Any]) -> None:
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

    pts = df[_flag(df["pareto"].notna())]
    if pts.empty:
        return None
    colors, markers = _gpu_colors(df), _markers(df)
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    ax = fig.subplots()
    for (gpu, approach), grp in pts.groupby(["gpu_label", "approach"], sort=True):
        ax.scatter(grp["train_seconds"].astype(float), grp["similarity_score"].astype(float),
                   color=colors[str(gpu)], marker=markers[str(approach)], s=40, zorder=2,
                   label=f"{gpu}, {approach}")
    front = pts[_flag(pts["pareto"])].sort_values("train_seconds")
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
    _legend(fig, [ax])
    return fig


def plot_prediction(df: pd.DataFrame) -> Figure | None:
    """Measured against predicted peak, one colour per GPU, the diagonal is a perfect plan."""
    from matplotlib.figure import Figure

    pts = df[_flag((df["status"] == "ok") & df["peak_gib"].notna() & df["predicted_gib"].notna())]
    if pts.empty:
        return None
    colors = _gpu_colors(df)
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
    _legend(fig, [ax])
    return fig


# ---------------------------------------------------------------------------------------
# files


def write_report(report: Report, plots: dict[str, bytes], out: str) -> list[str]:
    """Write report.md, report.html and the PNGs into `out` (a path or URI); their paths."""
    from qlora_ray.results import resolve

    fs, base = resolve(out)
    fs.create_dir(base, recursive=True)
    files = {"report.md": report_markdown(report, plots).encode(),
             "report.html": render_html(report, plots).encode()}
    files.update({PLOTS[key][0]: png for key, png in plots.items()})
    written = []
    for filename, data in files.items():
        _write_file(fs, f"{base}/{filename}", data)
        written.append(f"{out.rstrip('/')}/{filename}")
    return written


def _write_file(fs: Any, path: str, data: bytes) -> None:
    """Write a whole file atomically; on a local disk, never through a symbolic link.

    A results folder is often shared: a link planted at `report.md` must not make the
    report overwrite whatever it points to. The data goes to a new temporary file beside
    the target (O_EXCL | O_NOFOLLOW, mode from the umask as for any new file) and is renamed
    over it, which replaces a link rather than following it; an existing link is refused
    with a message. Object stores have no links and show an object only when it is whole.
    """
    import pyarrow.fs as pafs

    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    if os.path.islink(path):
        raise ReportError(f"{path} is a symbolic link (to {os.readlink(path)}); refusing to write "
                          "through it: remove the link, or choose another folder with --out DIR", code=1)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
