"""One table printer for `plan` and the `run` summary; the README's tables are its output."""

from __future__ import annotations

import re
from io import StringIO

from conftest import CONFIGS, ROOT

from qlora_ray.table import line, table
from qlora_ray.units import GIB

README = (ROOT / "README.md").read_text()


def readme_block(after: str) -> list[str]:
    """The lines of the first ``` block that follows the text `after` in README.md."""
    match = re.search(re.escape(after) + r".*?```\n(.*?)```", README, re.S)
    assert match, f"no block after {after!r} in README.md"
    return match.group(1).splitlines()


def test_columns_are_as_wide_as_their_widest_cell_and_aligned_as_asked() -> None:
    lines = table(("name", "n"), [("a", "10"), ("long-name", "2")], right=(1,))
    assert lines == ["name        n", "---------  --", "a          10", "long-name   2"]
    # No trailing blanks (the README's tables are pasted output).
    assert table(("a", "b"), [("xx", "")]) == ["a   b", "--  -", "xx"]
    # Fixed widths: a cell wider than its column pushes the rest.
    assert line(("a", "bcd", "e"), (2, 2, 1), right=(2,)) == "a   bcd  e"


def test_the_readme_run_summary_is_what_print_summary_prints() -> None:
    from qlora_ray.progress import print_summary

    block = readme_block("The run ends with a summary table")
    # The README's four rows, as rows the driver keeps (peak GiB and seconds as measured).
    values = [("qlora-nf4-r4-a8", 16, 0.55, 0.833, 0.312, 0.47), ("qlora-nf4-r16-a32", 17, 0.56, 0.833, 0.246, 1.0),
              ("lora-16bit-r4-a8", 17, 0.70, 0.842, 0.246, 0.74), ("lora-16bit-r16-a32", 18, 0.70, 0.842, 0.236, 1.0)]
    rows = [dict(name=n, status="ok", train_seconds=float(s), peak_memory_bytes=int(g * GIB), memory_source="cpu_rss",
                 similarity_score_before=b, similarity_score=a, accuracy=acc, accuracy_majority=0.35)
            for n, s, g, b, a, acc in values]
    out = StringIO()
    print_summary(rows, out)
    assert out.getvalue().splitlines()[1:] == block[:6]


def test_the_readme_plan_table_is_what_plan_prints() -> None:
    from qlora_ray.grid import load_spec
    from qlora_ray.planner import plan_spec, render_table

    block = readme_block("so that planning needs no network:")
    assert block[0].startswith("$ qlora-ray plan experiments/gpu_profiles.yaml")
    plans = plan_spec(load_spec(ROOT / "experiments/gpu_profiles.yaml"),
                      model_configs=[str(CONFIGS)], worst_case=True)
    printed = render_table(plans).splitlines()
    by_name = {text.split()[0]: text for text in printed[2:len(plans) + 2]}
    # The README shows the header and a few rows, cut after `fits`.
    shown = [text.removesuffix("...").rstrip() for text in block[1:] if text != "..."]
    assert printed[0].startswith(shown[0]), (shown[0], printed[0])
    for readme_line in shown[1:]:
        assert by_name[readme_line.split()[0]].startswith(readme_line), readme_line
