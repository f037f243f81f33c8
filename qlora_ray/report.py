"""`qlora-ray report RESULTS/<spec name>`: the comparison table and the plots.

Prints the table and writes report.md, a self-contained report.html and the PNG plots;
every cell is a row whatever its status (README, "The report"). pandas and
matplotlib are imported inside functions: the CLI imports this module for `--help`.
"""


from __future__ import annotations

import argparse
import os
import sys
import uuid
from typing import Any

from qlora_ray.report_frame import Report, ReportError, build_report
from qlora_ray.report_plots import PLOTS, draw_plots
from qlora_ray.report_render import render_csv, render_html, render_markdown, report_markdown

FORMATS = ("markdown", "csv", "html")


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
    parser.add_argument("--no-plots", action="store_true",
                        help="Print and write the table without drawing the PNG plots (about a "
                             "second faster; matplotlib is not imported). PNGs an earlier report "
                             "wrote are left as they were.")


def main(args: argparse.Namespace) -> int:
    try:
        report = build_report(args.results, baseline=args.baseline, where=args.where, sort=args.sort)
    except ReportError as e:
        print(f"qlora-ray report: {e}", file=sys.stderr)
        return e.code
    if args.no_plots:
        plots: dict[str, bytes] = {}
        report.notes.append("Plots not drawn (--no-plots); report-*.png files in this folder, "
                            "if any, are from an earlier report.")
    else:
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





def write_report(report: Report, plots: dict[str, bytes], out: str) -> list[str]:
    """Write report.md, report.html and the PNGs into `out` (a path or URI); their paths."""
    from qlora_ray.results_io import resolve

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
