"""The report's renderers: the comparison table as markdown, CSV and a self-contained HTML page."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from typing import Any

from qlora_ray import report_cost
from qlora_ray.report_frame import MISSING, Report, batch_label, missing
from qlora_ray.report_plots import PLOTS

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


def format_ratio(x: Any) -> str:
    return MISSING if missing(x) else f"{x:.2f}x"


def _num(x: Any, fmt: str) -> str:
    return MISSING if missing(x) else format(x, fmt)


def _tokens(x: Any) -> str:
    return MISSING if missing(x) else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}")


def _epochs(r: dict[str, Any]) -> str:
    if not missing(r["max_steps"]):
        return f"{r['max_steps']} steps"
    steps = "" if missing(r["train_steps"]) else f" ({r['train_steps']} steps)"
    return _num(r["epochs"], "g") + steps


def _similarity(r: dict[str, Any]) -> str:
    after, before = r["similarity_score"], r["similarity_score_before"]
    if missing(after):
        return MISSING
    return f"{after:.3f}" if missing(before) else f"{before:.3f} -> {after:.3f}"


def _peak(r: dict[str, Any], show_source: bool) -> str:
    if missing(r["peak_gib"]):
        return MISSING
    return f"{r['peak_gib']:.2f}" + (f" ({r['memory_source']})" if show_source else "")


def _predicted(r: dict[str, Any]) -> str:
    if missing(r["predicted_gib"]):
        return MISSING
    err = r["predicted_error_pct"]
    return f"{r['predicted_gib']:.2f}" + ("" if missing(err) else f" ({err:+.0f}%)")


def _accuracy_f1(r: dict[str, Any]) -> str:
    if missing(r["accuracy"]) and missing(r["f1"]):
        return MISSING
    return f"{_num(r['accuracy'], '.3f')} / {_num(r['f1'], '.3f')}"


def _pareto(x: Any) -> str:
    return MISSING if missing(x) else ("yes" if x else "no")


def status_text(r: dict[str, Any], limit: int | None = STATUS_REASON_CHARS) -> str:
    """`ok`, or `oom (train): CUDA out of memory...`: the status with its reason."""
    text = str(r["status"]) if not missing(r["status"]) else MISSING
    if not missing(r.get("error_phase")):
        text += f" ({r['error_phase']})"
    if not missing(r.get("error")):
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
        col("Batch x accum", batch_label, True),
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


