"""`qlora-ray report`: the comparison table's numbers, the plots, and the HTML in a browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from results_factory import GIB, failed, grid_rows, row, write_rows

from qlora_ray import report, report_frame
from qlora_ray.cli import main as cli

CHROMIUM = "/usr/bin/chromium"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOT_FILES = [f for f, _ in report.PLOTS.values()]


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    return Path(write_rows(str(tmp_path / "results"), grid_rows()))


def run_report(capsys: pytest.CaptureFixture[str], *args: str, plots: bool = False) -> tuple[int, str, str]:
    """`qlora-ray report ARGS`; without the plots (a second each) unless the test looks at them."""
    code = cli(["report", *args, *([] if plots else ["--no-plots"])])
    out, err = capsys.readouterr()
    return code, out, err


def parse_markdown(text: str) -> list[dict[str, str]]:
    """The printed markdown table -> one dict per row, keyed by header."""
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    split = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines]
    header, body = split[0], split[2:]
    return [dict(zip(header, cells, strict=True)) for cells in body]


def by_name(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {r["Name"]: r for r in rows}


# ---------------------------------------------------------------------------------------
# formatting rules


@pytest.mark.parametrize(("seconds", "shown"), [
    (1431, "0:23:51"), (3332.4, "0:55:32"), (4553, "1:15:53"), (59.6, "0:01:00"),
    (90061, "25:01:01"), (None, report_frame.MISSING), (pd.NA, report_frame.MISSING),
])
def test_training_time_is_h_mm_ss(seconds: float | None, shown: str) -> None:
    assert report_frame.format_duration(seconds) == shown


@pytest.mark.parametrize(("bits", "qtype", "label"), [
    (16, None, "LoRA 16-bit"), (8, None, "LoRA 8-bit"), (4, "nf4", "QLoRA 4-bit nf4"),
    (4, "fp4", "QLoRA 4-bit fp4"), (4, pd.NA, "QLoRA 4-bit"),
])
def test_approach_label_names_the_quantization(bits: int, qtype: str | None, label: str) -> None:
    assert report_frame.approach_label(bits, qtype) == label


def test_pareto_front_keeps_only_undominated_points() -> None:
    # (time, score): b is faster and better than c; d ties b exactly; e is slow but best
    times = [100, 50, 200, 50, 400]
    scores = [0.05, 0.04, 0.06, 0.04, 0.01]
    assert report_frame.pareto_front(times, scores) == [False, True, False, True, True]


# ---------------------------------------------------------------------------------------
# the table


def test_report_prints_every_cell_with_the_seed_tables_numbers(
    spec_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_report(capsys, str(spec_dir))
    assert code == 0, err
    rows = by_name(parse_markdown(out))

    assert len(rows) == 7  # the oom and unschedulable cells are rows too
    assert out.startswith("7 cells: 5 ok, 1 oom, 1 unschedulable")
    base = rows["lora16-r8-bs4-A100-40G"]
    assert base["Approach"] == "LoRA 16-bit" and base["Training time"] == "0:23:51"
    assert base["Peak vs baseline"] == "1.00x" and base["Card size ratio"] == "1.00x"
    assert base["Similarity (before -> after)"] == "0.412 -> 0.037"
    assert rows["qlora-r8-bs2-L4"]["Training time"] == "0:55:32"
    assert rows["qlora-r16-bs2-T4"]["Training time"] == "1:15:53"
    # measured peak relative to the 16-bit run, and the card size ratio, are separate columns
    l4 = rows["qlora-r8-bs2-L4"]
    assert (l4["Peak GiB"], l4["Peak vs baseline"], l4["Card size ratio"]) == ("3.00", "0.25x", "0.56x")
    a100 = rows["qlora-r8-bs4-A100-40G"]
    assert (a100["Peak vs baseline"], a100["Card size ratio"]) == ("0.50x", "1.00x")
    assert rows["int8-r8-bs2-T4"]["Card size ratio"] == "0.38x"  # 15360 / 40960 MiB
    assert rows["qlora-r8-bs2-L4"]["Batch x accum"] == "2 x 2"
    # accuracy beside the floor of always answering the most common label; steps beside epochs
    assert (base["Accuracy / F1"], base["Majority"]) == ("0.810 / 0.790", "0.340")
    assert base["Epochs"] == "3 (300 steps)"
    assert rows["qlora-r64-bs16-T4"]["Majority"] == "—"
    assert "Majority: the accuracy of always answering" in out
    # predicted vs measured: (predicted - measured) / measured
    assert base["Predicted GiB (error)"] == "11.40 (-5%)"
    assert a100["Predicted GiB (error)"] == "6.60 (+10%)"
    assert l4["Predicted GiB (error)"] == "2.70 (-10%)"


def test_failed_cells_show_status_and_reason(spec_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_report(capsys, str(spec_dir))
    rows = by_name(parse_markdown(out))

    oom = rows["lora16-r8-bs4-T4"]
    assert oom["Status"] == "oom (train): OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert oom["Training time"] == report_frame.MISSING and oom["Peak GiB"] == report_frame.MISSING
    assert oom["Predicted GiB (error)"] == "16.20"  # the planner's number still explains the OOM
    unsched = rows["qlora-r64-bs16-T4"]
    assert unsched["Status"].startswith("unschedulable: predicted 19.3 GiB does not fit on T4")
    assert unsched["Pareto"] == report_frame.MISSING


def test_pareto_column_marks_the_fastest_best_cells(spec_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_report(capsys, str(spec_dir))
    on_front = {name for name, r in by_name(parse_markdown(out)).items() if r["Pareto"] == "yes"}
    # the L4 and T4 cells are slower without being better than the A100 ones
    assert on_front == {"lora16-r8-bs4-A100-40G", "qlora-r8-bs4-A100-40G"}


def test_baseline_option_changes_what_memory_is_relative_to(
    spec_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_report(capsys, str(spec_dir), "--baseline", "qlora-r8-bs4-A100-40G")
    rows = by_name(parse_markdown(out))
    assert code == 0
    assert rows["lora16-r8-bs4-A100-40G"]["Peak vs baseline"] == "2.00x"
    assert rows["qlora-r8-bs2-L4"]["Peak vs baseline"] == "0.50x"
    assert "Baseline: qlora-r8-bs4-A100-40G" in out

    code, _, err = run_report(capsys, str(spec_dir), "--baseline", "no-such-run")
    assert code == 2 and "no-such-run" in err and "lora16-r8-bs4-A100-40G" in err


def test_default_baseline_is_the_first_ok_16bit_run_in_table_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = row("lora16-r8-bs4-L4", gpu="L4", quant_bits=16, quant_type=None, double_quant=None,
                peak_memory_bytes=11 * GIB)
    spec = write_rows(str(tmp_path), [*grid_rows(), extra])
    _, out, _ = run_report(capsys, spec)
    rows = by_name(parse_markdown(out))
    # the L4 is the smaller card, so its row comes first; the T4 16-bit run is an OOM
    assert "Baseline: lora16-r8-bs4-L4 (LoRA 16-bit on L4, 11.00 GiB peak)" in out
    assert rows["lora16-r8-bs4-L4"]["Peak vs baseline"] == "1.00x"
    assert rows["qlora-r8-bs2-L4"]["Card size ratio"] == "1.00x"


def test_without_a_16bit_run_relative_columns_are_empty_and_say_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_rows(str(tmp_path), [r for r in grid_rows() if r["quant_bits"] != 16])
    code, out, _ = run_report(capsys, spec)
    assert code == 0
    assert {r["Peak vs baseline"] for r in parse_markdown(out)} == {report_frame.MISSING}
    assert "--baseline NAME" in out


def test_where_filters_rows_and_pareto_is_recomputed_among_them(
    spec_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_report(capsys, str(spec_dir), "--where", "gpu == 'T4'")
    rows = by_name(parse_markdown(out))
    assert code == 0
    assert set(rows) == {"lora16-r8-bs4-T4", "int8-r8-bs2-T4", "qlora-r16-bs2-T4", "qlora-r64-bs16-T4"}
    assert [n for n, r in rows.items() if r["Pareto"] == "yes"] == ["qlora-r16-bs2-T4"]
    # the baseline is still the A100 16-bit run, outside the filter
    assert rows["qlora-r16-bs2-T4"]["Peak vs baseline"] == "0.40x"
    assert "4 of 7" in out


def test_bad_where_and_sort_are_reported_not_raised(spec_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_report(capsys, str(spec_dir), "--where", "gpuu == 'T4'")
    assert code == 2 and "--where" in err and "gpu" in err
    code, _, err = run_report(capsys, str(spec_dir), "--sort", "speed")
    assert code == 2 and "unknown column 'speed'" in err
    code, _, err = run_report(capsys, str(spec_dir), "--where", "gpu == 'H100'")
    assert code == 1 and "no rows match" in err


def test_sort_descending_puts_missing_values_last(spec_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_report(capsys, str(spec_dir), "--sort=-tokens_per_second")
    names = [r["Name"] for r in parse_markdown(out)]
    assert names[:2] == ["lora16-r8-bs4-A100-40G", "qlora-r8-bs4-A100-40G"]
    assert set(names[-2:]) == {"lora16-r8-bs4-T4", "qlora-r64-bs16-T4"}


def test_csv_has_the_tables_numbers_unformatted(spec_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_report(capsys, str(spec_dir), "--format", "csv")
    df = pd.read_csv(StringIO(out)).set_index("name")
    assert code == 0 and len(df) == 7
    assert df.loc["qlora-r8-bs2-L4", "peak_vs_baseline"] == pytest.approx(0.25)
    assert df.loc["qlora-r8-bs2-L4", "card_size_ratio"] == pytest.approx(23034 / 40960, abs=1e-3)
    assert df.loc["qlora-r8-bs4-A100-40G", "predicted_error_pct"] == pytest.approx(10.0, abs=0.1)
    assert df.loc["qlora-r16-bs2-T4", "train_time"] == "1:15:53"
    assert df.loc["qlora-r16-bs2-T4", "accuracy_majority"] == pytest.approx(0.34)
    assert df.loc["qlora-r16-bs2-T4", "train_steps"] == 300
    assert df.loc["lora16-r8-bs4-T4", "status"] == "oom"
    assert "Tried to allocate" in df.loc["lora16-r8-bs4-T4", "error"]


# ---------------------------------------------------------------------------------------
# files and plots


def test_report_writes_markdown_html_and_valid_pngs(spec_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_report(capsys, str(spec_dir), plots=True)
    assert code == 0
    md = (spec_dir / "report.md").read_text()
    assert md.startswith("# qlora-ray report: rank-vs-gpu") and "| lora16-r8-bs4-T4 " in md
    for name in PLOT_FILES:
        png = spec_dir / name
        assert png.read_bytes().startswith(PNG_MAGIC), name
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.width > 300 and im.height > 200
            # not a blank canvas: a drawn plot has many distinct colours
            assert len(im.convert("RGB").getcolors(maxcolors=1_000_000) or []) > 20
        assert f"]({name})" in md
    html_text = (spec_dir / "report.html").read_text()
    assert html_text.count('src="data:image/png;base64,') == len(PLOT_FILES)
    assert str(spec_dir / "report.html") in err


def test_no_plots_writes_the_table_and_leaves_earlier_pngs_alone(spec_dir: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    earlier = spec_dir / PLOT_FILES[0]
    earlier.write_bytes(PNG_MAGIC + b"from an earlier report")
    code, out, _ = run_report(capsys, str(spec_dir))  # run_report passes --no-plots
    assert code == 0
    assert "| lora16-r8-bs4-T4 " in out
    assert "Plots not drawn (--no-plots)" in out
    md = (spec_dir / "report.md").read_text()
    assert "| lora16-r8-bs4-T4 " in md and "![" not in md
    assert "data:image/png" not in (spec_dir / "report.html").read_text()
    assert earlier.read_bytes() == PNG_MAGIC + b"from an earlier report"
    assert not any((spec_dir / name).exists() for name in PLOT_FILES[1:])


def test_out_option_and_runs_folder_argument(spec_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "elsewhere"
    code, _, _ = run_report(capsys, str(spec_dir / "runs"), "--out", str(out_dir), plots=True)
    assert code == 0
    assert {p.name for p in out_dir.iterdir()} == {"report.md", "report.html", *PLOT_FILES}
    assert not (spec_dir / "report.md").exists()


def test_html_format_prints_the_self_contained_page(spec_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_report(capsys, str(spec_dir), "--format", "html", plots=True)
    assert code == 0 and out.startswith("<!doctype html>")
    assert "data:image/png;base64," in out and "<td" in out


def test_a_folder_of_only_failures_and_cpu_rows_reports_without_crashing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_rows(str(tmp_path), [
        failed("a", "oom", "OutOfMemoryError: CUDA out of memory.", error_phase="load"),
        failed("b", "unschedulable", "no node has a T4", lora_r=16, predicted_peak_bytes=None),
        failed("c", "failed", "RuntimeError: tokenizer | missing", gpu=None, device="cpu", quant_bits=None,
               quant_type=None, lora_r=None, batch_size=None, batch_size_requested="auto",
               grad_accum=None, epochs=None, started_at=None),
        failed("d", "skipped", None, gpu=None, predicted_peak_bytes=None, spec_name=None),
    ])
    code, out, _ = run_report(capsys, spec, plots=True)
    rows = by_name(parse_markdown(out))
    assert code == 0
    assert set(rows) == {"a", "b", "c", "d"}
    assert rows["c"]["Status"] == "failed: RuntimeError: tokenizer | missing"
    assert rows["c"]["GPU"] == "cpu" and rows["c"]["Batch x accum"] == "auto"
    assert rows["b"]["Status"] == "unschedulable: no node has a T4"
    assert "Plot not drawn (report-quality-vs-time.png)" in out
    # the OOM is drawn at the T4's capacity; the other plots have nothing to show
    assert (Path(spec) / "report-memory.png").read_bytes().startswith(PNG_MAGIC)
    assert not (Path(spec) / "report-quality-vs-time.png").exists()
    assert (Path(spec) / "report.html").read_text().count("<img") == 1


def test_cpu_runs_without_a_gpu_profile_get_a_plot_panel(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_rows(str(tmp_path), [
        row(f"cpu-r{r}", gpu=None, device="cpu", device_name="cpu", memory_source="cpu_rss",
            lora_r=r, train_seconds=40.0 + r, peak_memory_bytes=int((0.9 + r / 100) * GIB),
            predicted_peak_bytes=int(0.3 * GIB), similarity_score=0.3 - r / 100)
        for r in (4, 8)
    ])
    code, out, _ = run_report(capsys, spec, plots=True)
    rows = by_name(parse_markdown(out))
    assert code == 0
    assert rows["cpu-r4"]["Card size ratio"] == report_frame.MISSING and rows["cpu-r4"]["GPU"] == "cpu"
    assert rows["cpu-r8"]["Training time"] == "0:00:48"
    assert "cpu_rss is the whole process's resident memory" in out  # why the prediction error is off
    assert all((Path(spec) / f).stat().st_size > 0 for f in PLOT_FILES)


def test_an_empty_or_missing_folder_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    code, _, err = run_report(capsys, str(tmp_path / "empty"))
    assert code == 1 and "no result rows" in err
    code, _, err = run_report(capsys, str(tmp_path / "missing"))
    assert code == 2 and "no results at" in err


def test_a_corrupt_file_is_named_in_the_report_and_the_rest_is_reported(
    spec_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (spec_dir / "runs" / "half-copied.parquet").write_bytes(b"PAR1\x00\x01")
    pq.write_table(pa.table({"x": [1]}), spec_dir / "runs" / "notes.parquet")
    code, out, _ = run_report(capsys, str(spec_dir))
    assert code == 0 and len(parse_markdown(out)) == 7
    assert "half-copied.parquet" in out and "notes.parquet" in out
    assert "half-copied.parquet" in (spec_dir / "report.html").read_text()
    # CSV on stdout stays parseable; the skipped file is named on stderr instead
    code, out, err = run_report(capsys, str(spec_dir), "--format", "csv")
    assert code == 0 and len(pd.read_csv(StringIO(out))) == 7 and "half-copied.parquet" in err


def test_an_unwritable_output_folder_is_reported_after_the_table(
    spec_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, out, err = run_report(capsys, str(spec_dir), "--out", str(blocker / "report"))
    assert code == 1 and len(parse_markdown(out)) == 7 and "--out DIR" in err


def test_importing_the_report_module_stays_light() -> None:
    # `qlora-ray --help` imports every verb's module; pandas and matplotlib must not come along.
    code = ("import sys, qlora_ray.report; "
            "print([m for m in ('pandas', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------
# the HTML in a real browser

# Injected into a copy of report.html: records CSP violations and load errors, then on load
# writes every image's state into the DOM that --dump-dom prints.
CHECK_SCRIPT = """<script>
window.__errors = [];
document.addEventListener('securitypolicyviolation',
  e => __errors.push('blocked by CSP: ' + e.blockedURI + ' (' + e.violatedDirective + ')'));
window.addEventListener('error',
  e => __errors.push('error: ' + (e.message || (e.target && (e.target.src || e.target.href)))), true);
window.addEventListener('load', () => {
  const images = Array.from(document.images).map(
    i => ({loaded: i.complete && i.naturalWidth > 0, width: i.naturalWidth, alt: i.alt}));
  const pre = document.createElement('pre');
  pre.id = 'qlora-check';
  pre.textContent = JSON.stringify(
    {images: images, errors: __errors, rows: document.querySelectorAll('tbody tr').length});
  document.body.appendChild(pre);
});
</script>"""


def open_in_chromium(page: Path, tmp_path: Path) -> dict:
    """Load `page` in headless Chromium, return what CHECK_SCRIPT recorded."""
    html_text = page.read_text()
    # Let only our inline checker run; the report's own policy (no external anything) stays.
    html_text = html_text.replace("img-src data:;", "img-src data:; script-src 'unsafe-inline';", 1)
    html_text = html_text.replace("</head>", CHECK_SCRIPT + "</head>", 1)
    checked = page.with_name("checked-" + page.name)
    checked.write_text(html_text)
    profile = tmp_path / "chromium-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", checked.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "HOME": str(tmp_path)})
    found = re.search(r'<pre id="qlora-check">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"chromium printed no check result (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)",
)


@pytest.mark.slow  # starts a browser
@needs_chromium
def test_report_html_opens_in_chromium_with_every_image_loaded(
    spec_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_report(capsys, str(spec_dir), plots=True)[0] == 0
    # Alone in an empty folder: a self-contained page needs none of the files written beside it.
    alone = tmp_path / "mailed"
    alone.mkdir()
    shutil.copy(spec_dir / "report.html", alone / "report.html")

    result = open_in_chromium(alone / "report.html", tmp_path)

    assert result["errors"] == []
    assert result["rows"] == 7
    assert len(result["images"]) == len(PLOT_FILES)
    assert all(img["loaded"] and img["width"] > 300 for img in result["images"]), result["images"]


@pytest.mark.slow  # starts a browser
@needs_chromium
def test_the_chromium_check_catches_an_image_that_does_not_load(
    spec_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The control for the test above: a report pointing at a PNG file instead of embedding it.
    assert run_report(capsys, str(spec_dir), plots=True)[0] == 0
    page = spec_dir / "report.html"
    page.write_text(re.sub(r'src="data:image/png;base64,[^"]*"', 'src="report-memory.png"',
                           page.read_text(), count=1))

    result = open_in_chromium(page, tmp_path)

    assert [img["loaded"] for img in result["images"]] == [False] + [True] * (len(PLOT_FILES) - 1)
    assert any("report-memory.png" in e for e in result["errors"])


def test_the_prediction_error_compares_training_with_training(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 9: a cell whose eval pass is its predicted peak is judged on its training prediction."""
    spec = write_rows(str(tmp_path / "results"), [
        row("eval-heavy", peak_memory_bytes=5 * GIB, predicted_train_bytes=int(5.5 * GIB),
            predicted_eval_bytes=9 * GIB, predicted_peak_bytes=9 * GIB),
        row("old-row", peak_memory_bytes=5 * GIB, predicted_peak_bytes=6 * GIB),
    ])
    code, out, _ = run_report(capsys, spec, "--format", "csv")
    df = pd.read_csv(StringIO(out)).set_index("name")
    assert code == 0
    assert df.loc["eval-heavy", "predicted_error_pct"] == pytest.approx(10.0, abs=0.1)
    assert df.loc["old-row", "predicted_error_pct"] == pytest.approx(20.0, abs=0.1)


def test_the_prediction_error_uses_the_measured_training_window(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 9 item 4: a row whose eval pass measured higher than training (peak_memory_bytes is
    the whole run) is judged by its training window's peak against the training prediction."""
    spec = write_rows(str(tmp_path / "results"), [
        row("split", peak_memory_bytes=9 * GIB, peak_train_bytes=5 * GIB, peak_eval_bytes=9 * GIB,
            predicted_train_bytes=int(5.5 * GIB), predicted_eval_bytes=9 * GIB, predicted_peak_bytes=9 * GIB),
    ])
    code, out, _ = run_report(capsys, spec, "--format", "csv")
    df = pd.read_csv(StringIO(out)).set_index("name")
    assert code == 0
    assert df.loc["split", "predicted_error_pct"] == pytest.approx(10.0, abs=0.1)


def test_run_summary_shows_accuracy_beside_the_majority_baseline() -> None:
    """The table `qlora-ray run` ends with: accuracy next to always answering the top label."""
    from qlora_ray.progress import print_summary

    out = StringIO()
    print_summary([row("a", accuracy=0.8, accuracy_majority=0.35), row("b", accuracy=None, accuracy_majority=None)],
                  out)
    lines = out.getvalue().strip().splitlines()
    assert lines[0].split()[-2:] == ["accuracy", "majority"]
    assert lines[2].split()[-2:] == ["0.80", "0.35"] and lines[3].split()[-2:] == ["-", "-"]


def test_the_run_summary_from_the_rows_the_driver_keeps_shows_the_majority_baseline() -> None:
    """The driver keeps only SUMMARY_KEYS of each row; the table it prints from them is the
    table of the full rows (the majority column was '-' in every run when it was not kept)."""
    from qlora_ray.progress import SUMMARY_KEYS, print_summary

    full = [row("a", accuracy=0.8, accuracy_majority=0.35, similarity_score_before=0.8)]
    kept = [{k: r.get(k) for k in SUMMARY_KEYS} for r in full]
    out_full, out_kept = StringIO(), StringIO()
    print_summary(full, out_full)
    print_summary(kept, out_kept)
    assert out_kept.getvalue() == out_full.getvalue()
    assert out_kept.getvalue().strip().splitlines()[2].split()[-2:] == ["0.80", "0.35"]


def test_report_notes_say_what_the_ruler_and_the_floor_are(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16 items 1, 3, 5: under the table, the report says that `embedder: self` is each
    cell's own base model (one ruler before and after, differing a little across
    quantizations), what `Majority` is, and why a cell has no accuracy."""
    note = ("eval.labels auto: no label set (fewer than two short answers repeat 3+ times); "
            "set `eval.labels` to the list of labels to score accuracy/F1")
    spec = write_rows(str(tmp_path / "results"), [
        row("labelled"),
        row("free-text", accuracy=None, f1=None, accuracy_majority=None, labels=None, labels_note=note),
    ])
    code, out, _ = run_report(capsys, spec)
    assert code == 0
    assert "Embedder `self`: each cell embeds with its own base model (adapter off)" in out
    assert "across quantizations the ruler differs" in out
    assert "Majority: the accuracy of always answering" in out
    assert f"No accuracy: {note}." in out
    fixed = write_rows(str(tmp_path / "fixed"), [row("fixed", embedder="/models/e5-small")])
    code, out, _ = run_report(capsys, fixed)
    assert code == 0 and "Embedder `self`" not in out
