"""What qlora-ray writes is safe to open, whatever a results folder or a filter holds.

- report files and adapter folders are written whole (temporary name, then rename) and
  never through a symbolic link planted in a shared results folder;
- `report --where` evaluates comparisons only, never Python;
- text from rows cannot become a spreadsheet formula (CSV), markup or links (report.md),
  or a math expression that crashes matplotlib (plots).
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest
from results_factory import grid_rows, row, write_rows

from qlora_ray import report
from qlora_ray.cli import main as cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_report(capsys: pytest.CaptureFixture[str], *args: str, plots: bool = False) -> tuple[int, str, str]:
    """`qlora-ray report ARGS`; without the plots (a second each) unless the test looks at them."""
    code = cli(["report", *args, *([] if plots else ["--no-plots"])])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------
# files: whole, and not through links


def test_a_symlink_planted_at_report_md_is_refused_and_its_target_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = Path(write_rows(str(tmp_path / "results"), grid_rows()))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (spec / "report.md").symlink_to(victim)
    code, _, err = run_report(capsys, str(spec))
    assert code == 1
    assert f"{spec}/report.md is a symbolic link (to {victim}); refusing to write through it" in err
    assert victim.read_text() == "precious\n"
    assert (spec / "report.md").is_symlink()
    assert not [p for p in spec.iterdir() if p.name.startswith(".report")]  # no temporary left


def test_report_files_replace_old_ones_whole_with_no_temporaries_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = Path(write_rows(str(tmp_path / "results"), grid_rows()))
    (spec / "report.md").write_text("stale")
    assert run_report(capsys, str(spec), plots=True)[0] == 0
    assert (spec / "report.md").read_text().startswith("# qlora-ray report:")
    assert sorted(p.name for p in spec.iterdir() if p.is_file()) == sorted(
        ["report.md", "report.html", *(f for f, _ in report.PLOTS.values())])


@pytest.fixture(scope="module")
def peft_model():
    """A real PEFT model on a tiny random Llama (what the worker saves)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2))
    return get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))


def test_adapter_folder_appears_whole_and_a_retry_replaces_it(tmp_path: Path, peft_model) -> None:
    from qlora_ray.worker import save_adapter

    results = str(tmp_path / "results")
    dest = Path(save_adapter(peft_model, results, "spec", "abc123"))
    assert dest == tmp_path / "results" / "spec" / "adapters" / "abc123"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in dest.iterdir()}
    (dest / "stale-from-attempt-1").write_text("x")
    assert Path(save_adapter(peft_model, results, "spec", "abc123")) == dest
    assert not (dest / "stale-from-attempt-1").exists()
    assert [p.name for p in dest.parent.iterdir()] == ["abc123"]  # no staging or old folder left


def test_adapter_folder_symlink_is_refused(tmp_path: Path, peft_model) -> None:
    from qlora_ray.worker import save_adapter

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    adapters = tmp_path / "results" / "spec" / "adapters"
    adapters.mkdir(parents=True)
    (adapters / "abc123").symlink_to(victim)
    with pytest.raises(RuntimeError, match=r"is a symbolic link .* refusing to save the adapter"):
        save_adapter(peft_model, str(tmp_path / "results"), "spec", "abc123")
    assert [p.name for p in victim.iterdir()] == ["keep.txt"]
    assert [p.name for p in adapters.iterdir()] == ["abc123"]


# ---------------------------------------------------------------------------------------
# --where: comparisons only


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    return Path(write_rows(str(tmp_path / "results"), grid_rows()))


@pytest.mark.parametrize(("where", "names"), [
    ("gpu == 'T4' and lora_r >= 16", {"qlora-r16-bs2-T4", "qlora-r64-bs16-T4"}),
    ("gpu in ['L4', 'A100-40G'] and not quant_bits == 16", {"qlora-r8-bs4-A100-40G", "qlora-r8-bs2-L4"}),
    ("status != 'ok' or peak_gib > 7.5", {"lora16-r8-bs4-T4", "qlora-r64-bs16-T4", "int8-r8-bs2-T4",
                                          "lora16-r8-bs4-A100-40G"}),
    ("8 < lora_r < 64 and (batch_size == 2)", {"qlora-r16-bs2-T4"}),
    ("train_seconds == None", {"lora16-r8-bs4-T4", "qlora-r64-bs16-T4"}),
    ("predicted_error_pct > -6 and predicted_error_pct < 0", {"lora16-r8-bs4-A100-40G"}),
])
def test_where_keeps_rows_matching_comparisons(spec_dir: Path, where: str, names: set[str]) -> None:
    rep = report.build_report(str(spec_dir), where=where)
    assert set(rep.frame["name"]) == names


@pytest.mark.parametrize("where", [
    "__import__('os').system('touch /tmp/pwned')",
    "name.str.contains('r8')",
    "@pd.io",
    "lora_r == lora_r.__class__",
    "gpu == 'T4' if True else False",
    "[x for x in name]",
    "lora_r + 1 > 2",
    "lambda: 1",
])
def test_where_refuses_anything_but_comparisons(spec_dir: Path, where: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_report(capsys, str(spec_dir), "--where", where)
    assert code == 2
    assert f"--where {where!r} failed" in err and "comparisons" in err


def test_where_names_an_unknown_column_and_lists_the_real_ones(spec_dir: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_report(capsys, str(spec_dir), "--where", "gpuu == 'T4'")
    assert code == 2 and "'gpuu' is not a column" in err and "columns you can use: experiment_id" in err


# ---------------------------------------------------------------------------------------
# text from rows stays text

HOSTILE = {
    "name": "=HYPERLINK(\"http://x\")",
    "error": "-2+3\n<img src=x onerror=alert(1)>\n| [click](javascript:alert(1)) \\<b>",
}


def hostile_rows() -> list[dict]:
    rows = grid_rows()
    rows.append(row("=cmd|' /C calc'!A0", gpu="$x^2$", status="failed",
                    error="@SUM(1+1)\n# heading\n<script>alert(1)</script> [a](javascript:x) ![i](http://x)",
                    peak_memory_bytes=None))
    # an ok row (so it is plotted) on a card whose label is not valid math text
    rows.append(row("+plus", gpu="$\\frac{x}{$ card", spec_name="evil\n# injected <b>title</b>"))
    return rows


def test_csv_cells_cannot_start_a_formula(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_rows(str(tmp_path / "results"), hostile_rows())
    code, out, _ = run_report(capsys, spec, "--format", "csv")
    assert code == 0
    cells = [c for line in csv.reader(io.StringIO(out)) for c in line]
    assert "'=cmd|' /C calc'!A0" in cells and "'+plus" in cells
    assert any(c.startswith("'@SUM(1+1)") for c in cells)
    assert not [c for c in cells if c[:1] in ("=", "+", "@")]
    # numbers stay numbers, negative ones included
    assert any(c.startswith("-") and c[1:2].isdigit() for c in cells)


def test_report_md_holds_no_markup_from_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = Path(write_rows(str(tmp_path / "results"), hostile_rows(), spec="evil"))
    code, _, _ = run_report(capsys, str(spec))
    assert code == 0
    md = (spec / "report.md").read_text()
    # a tag, link or image needs an unescaped `<` or `[`; every one from the rows is escaped
    assert not re.findall(r"(?<!\\)<(?:script|img|b)\b", md)
    assert not re.findall(r"(?<!\\)\]\(", md.split("![")[0])  # before the plots' own image links
    assert "\\<script>" in md and "\\[a\\](javascript:x)" in md
    # every table line is one row of the table: no newline from a name or error got through
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + len(hostile_rows())
    assert not [ln for ln in md.splitlines() if ln.startswith("# ") and "injected" in ln]


def test_gpu_labels_with_dollar_signs_draw_as_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = Path(write_rows(str(tmp_path / "results"), hostile_rows()))
    code, _, err = run_report(capsys, str(spec), plots=True)
    assert code == 0, err
    for filename, _ in report.PLOTS.values():
        assert (spec / filename).read_bytes().startswith(PNG_MAGIC)
