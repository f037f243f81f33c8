"""`qlora-ray report` on time and money: predicted vs measured time, cost per run, cost per
quality point, and the quality-against-cost plot with its Pareto front."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from results_factory import START, failed, row, write_rows

from qlora_ray.cli import main as cli

COST_PNG = "report-quality-vs-cost.png"


def markdown_rows(text: str) -> dict[str, dict[str, str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    cells = [[c.strip() for c in ln.split("|")[1:-1]] for ln in lines]
    header = cells[0]
    return {r[0]: dict(zip(header, r, strict=True)) for r in cells[2:]}


def priced(name: str, gpu: str, price: float, held: float, train: float, predicted: float,
           before: float, after: float) -> dict:
    return row(name, gpu=gpu, usd_per_hour=price, train_seconds=train, predicted_seconds=predicted,
               similarity_score_before=before, similarity_score=after,
               started_at=START, finished_at=START + dt.timedelta(seconds=held))


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    rows = [
        # cheap card, slow, good: 2 h at $0.75 = $1.50 for 30 points -> $0.05 a point
        priced("cheap-T4", "T4", 0.75, 7200, 6900, 7590, 0.40, 0.10),
        # fast card, expensive, as good: 0.5 h at $4.10 = $2.05 for 30 points
        priced("fast-A100", "A100-40G", 4.10, 1800, 1600, 1440, 0.40, 0.10),
        # dominated: costs more than the T4 and is worse
        priced("meh-L4", "L4", 0.98, 3600 * 2, 7000, 7000, 0.40, 0.20),
        # training made it worse: no cost per point
        priced("worse-L4", "L4", 0.98, 600, 500, 500, 0.30, 0.35),
        failed("oom-T4", "oom", "OutOfMemoryError: CUDA out of memory", usd_per_hour=0.75),
    ]
    return Path(write_rows(str(tmp_path / "results"), rows))


def report(capsys: pytest.CaptureFixture[str], *args: str, plots: bool = False) -> str:
    """`qlora-ray report ARGS`'s stdout; without the plots unless the test looks at them."""
    assert cli(["report", *args, *([] if plots else ["--no-plots"])]) == 0
    return capsys.readouterr().out


def test_cost_per_run_and_per_quality_point(spec_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = markdown_rows(report(capsys, str(spec_dir)))
    assert table["cheap-T4"]["Cost"] == "$1.50"
    assert table["fast-A100"]["Cost"] == "$2.05"
    assert table["cheap-T4"]["$ per quality point"] == "$0.050"  # 1.50 / 30
    assert table["fast-A100"]["$ per quality point"] == "$0.068"  # 2.05 / 30
    assert table["worse-L4"]["$ per quality point"] == "—"  # did not improve
    assert table["oom-T4"]["Cost"] == "—"


def test_predicted_time_beside_measured_with_its_error(spec_dir: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    table = markdown_rows(report(capsys, str(spec_dir)))
    assert table["cheap-T4"]["Training time"] == "1:55:00"
    assert table["cheap-T4"]["Predicted time (error)"] == "2:06:30 (+10%)"  # 7590 vs 6900
    assert table["fast-A100"]["Predicted time (error)"] == "0:24:00 (-10%)"  # 1440 vs 1600


def test_csv_carries_the_cost_numbers(spec_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    df = pd.read_csv(io.StringIO(report(capsys, str(spec_dir), "--format", "csv"))).set_index("name")
    assert df.loc["cheap-T4", "cost_usd"] == pytest.approx(1.5)
    assert df.loc["cheap-T4", "usd_per_quality_point"] == pytest.approx(0.05)
    assert df.loc["fast-A100", "predicted_time_error_pct"] == pytest.approx(-10.0)
    assert df.loc["cheap-T4", "cell_seconds"] == pytest.approx(7200)


def test_quality_against_cost_plot_and_its_pareto_front(spec_dir: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from qlora_ray.report import build_report

    rep = build_report(str(spec_dir))
    front = rep.frame.set_index("name")["pareto_cost"]
    # The cheapest good run is on the front; the A100 is as good but dearer, the L4 worse and
    # dearer than the T4; worse-L4 is the cheapest of all (0.6 h) so it is on the front too.
    assert front["cheap-T4"] and not front["fast-A100"] and not front["meh-L4"] and front["worse-L4"]
    assert pd.isna(front["oom-T4"])
    report(capsys, str(spec_dir), plots=True)
    with Image.open(spec_dir / COST_PNG) as im:
        assert im.width > 300 and len(im.convert("RGB").getcolors(maxcolors=1_000_000) or []) > 20
    assert COST_PNG in (spec_dir / "report.md").read_text()


def test_without_prices_the_plot_uses_hours_and_the_table_has_no_dollars(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [row("cpu-a", gpu=None, device="cpu", predicted_seconds=100.0, train_seconds=80.0),
            row("cpu-b", gpu=None, device="cpu", predicted_seconds=50.0, train_seconds=60.0,
                similarity_score=0.3)]
    spec_dir = Path(write_rows(str(tmp_path / "results"), rows))
    out = report(capsys, str(spec_dir), plots=True)
    assert "| Cost" not in out and "Predicted time (error)" in out
    assert (spec_dir / COST_PNG).is_file()
