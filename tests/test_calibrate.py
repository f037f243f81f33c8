"""`qlora-ray calibrate`: corrections learned from GPU rows, and plan/run using them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CONFIGS
from results_factory import GIB, row, write_rows

from qlora_ray.calibrate import MIN_SPREAD, load
from qlora_ray.cli import main as cli_main
from qlora_ray.config import ConfigError
from qlora_ray.grid import expand
from qlora_ray.planner import plan_spec


def gpu_row(name: str, predicted: float, measured: float | None, **values) -> dict:
    """A row measured on a card: the planner's prediction beside the card's training peak."""
    values = {"memory_correction": 1.0, **values}
    return row(name, model="meta-llama/Llama-2-7b-hf", model_family="llama",
               predicted_train_bytes=int(predicted * GIB), predicted_peak_bytes=int(predicted * GIB),
               peak_memory_bytes=None if measured is None else int(measured * GIB), **values)


def calibrate(tmp_path: Path, rows: list[dict], *extra: str) -> dict:
    folder = write_rows(str(tmp_path / "results"), rows)
    out = tmp_path / "corrections.json"
    assert cli_main(["calibrate", folder, "-o", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_the_factor_is_the_median_ratio_and_the_spread_its_scatter(tmp_path: Path) -> None:
    ratios = [1.10, 1.14, 1.15, 1.16, 1.20]
    rows = [gpu_row(f"t4-{i}", 6.0, 6.0 * r) for i, r in enumerate(ratios)]
    rows.append(gpu_row("cpu", 6.0, 1.0, gpu="cpu", memory_source="cpu_rss"))  # ignored
    memory = calibrate(tmp_path, rows)["memory"]
    t4 = memory["llama/T4"]
    assert t4["factor"] == pytest.approx(1.15, abs=1e-4)
    assert t4["spread"] == pytest.approx(max(abs(r / 1.15 - 1) for r in ratios), abs=1e-4)
    assert t4["ok_rows"] == 5 and t4["oom_rows"] == 0
    assert set(memory) == {"llama/T4", "llama/*", "*/T4", "*/*"}


def test_an_oom_row_raises_the_factor_to_the_card(tmp_path: Path) -> None:
    t4 = 15360 * 2**20
    rows = [gpu_row("ok", 10.0, 10.0),
            # Predicted 13.5 GiB, ran out of memory on a 15 GiB card: it needed more than the card.
            gpu_row("oom", 13.5, None, status="oom", error="CUDA out of memory", device_total_memory_bytes=t4)]
    factor = calibrate(tmp_path, rows)["memory"]["llama/T4"]["factor"]
    assert factor * 13.5 * GIB >= t4 * 0.9999 and factor > 1.1


def test_rows_planned_with_a_correction_do_not_compound(tmp_path: Path) -> None:
    rows = [gpu_row(f"r{i}", 6.0 * 1.2, 6.6, memory_correction=1.2) for i in range(3)]
    assert calibrate(tmp_path, rows)["memory"]["llama/T4"]["factor"] == pytest.approx(1.1, abs=1e-4)


def test_plan_scales_its_predictions_with_the_corrections(tmp_path: Path) -> None:
    data = calibrate(tmp_path, [gpu_row(f"r{i}", 6.0, 6.0 * 1.25) for i in range(3)])
    spec = expand({"name": "c", "base": {"model": "meta-llama/Llama-2-7b-hf", "gpu": "T4",
                                         "quant": {"compute_dtype": "float16"}}})
    (plain,) = plan_spec(spec, model_configs=[CONFIGS])
    (corrected,) = plan_spec(spec, model_configs=[CONFIGS], corrections=load(tmp_path / "corrections.json"))
    assert corrected.estimate.train_bytes == pytest.approx(1.25 * plain.estimate.train_bytes, rel=1e-4)
    row_json = corrected.to_json()
    assert row_json["memory_correction"] == data["memory"]["llama/T4"]["factor"]
    assert row_json["correction_group"] == "llama/T4"
    low, high = corrected.estimate.train_range
    assert low == pytest.approx(corrected.estimate.train_bytes * (1 - MIN_SPREAD), rel=1e-4)
    assert high == pytest.approx(corrected.estimate.train_bytes * (1 + MIN_SPREAD), rel=1e-4)


def test_other_sections_of_the_file_are_kept(tmp_path: Path) -> None:
    out = tmp_path / "corrections.json"
    out.write_text(json.dumps({"format": "qlora-ray-corrections", "version": 1, "memory": {},
                               "throughput": {"llama/T4": {"efficiency": 0.61}}}))
    data = calibrate(tmp_path, [gpu_row("r", 6.0, 6.3)])
    assert data["throughput"] == {"llama/T4": {"efficiency": 0.61}}
    assert data["memory"]["llama/T4"]["factor"] == pytest.approx(1.05, abs=1e-4)


def test_a_bad_corrections_file_names_itself(tmp_path: Path) -> None:
    bad = tmp_path / "c.json"
    bad.write_text('{"format": "something-else"}')
    with pytest.raises(ConfigError, match="--corrections"):
        load(bad)


def test_no_gpu_rows_is_said_plainly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_rows(str(tmp_path / "results"), [gpu_row("cpu", 1.0, 2.0, gpu="cpu", memory_source="cpu_rss")])
    assert cli_main(["calibrate", folder, "-o", str(tmp_path / "c.json")]) == 1
    assert "nothing to learn" in capsys.readouterr().err


def test_the_same_file_carries_the_time_efficiency(tmp_path: Path) -> None:
    """Issue 12's section: rows' tokens/s against their prediction give the efficiency the
    time estimate then uses for that family and card."""
    rows = [gpu_row(f"r{i}", 6.0, 6.0, tokens_per_second=900.0, predicted_tokens_per_second=1000.0,
                    time_efficiency=0.5) for i in range(3)]
    data = calibrate(tmp_path, rows)
    assert data["throughput"]["llama/T4/4bit"]["efficiency"] == pytest.approx(0.45, abs=1e-4)
    spec = expand({"name": "c", "base": {"model": "meta-llama/Llama-2-7b-hf", "gpu": "T4",
                                         "quant": {"compute_dtype": "float16"}}})
    (plan,) = plan_spec(spec, model_configs=[CONFIGS], corrections=load(tmp_path / "corrections.json"))
    assert plan.time is not None and plan.time.efficiency == pytest.approx(0.45, abs=1e-4)
    assert plan.time.calibration == "llama/T4/4bit"
