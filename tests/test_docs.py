"""The docs a newcomer reads match the code."""

from __future__ import annotations

from pathlib import Path

from qlora_ray.docs_gen import config_reference

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_current():
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == config_reference(), "run: python -m qlora_ray.docs_gen > docs/config.md"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in readme and "scripts/test.sh" in ci
    assert "scripts/quickstart.sh" in readme
