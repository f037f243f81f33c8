"""The docs a newcomer reads match the code."""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

from conftest import ROOT

from qlora_ray.config import describe_fields
from qlora_ray.docs_gen import config_reference
from qlora_ray.profiles import GpuProfile


def test_config_reference_is_current():
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == config_reference(), "run: python -m qlora_ray.docs_gen > docs/config.md"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in readme and "scripts/test.sh" in ci
    assert "scripts/quickstart.sh" in readme


SECRET_NAME = r"[A-Z0-9_]*(?:TOKEN|SECRET|PASSWORD|ACCESS_KEY)[A-Z0-9_]*"
# Builtins run in the shell itself: their arguments are on no process's command line.
SHELL_BUILTINS = {"printf", "echo", "export", "read", "local"}


def test_no_documented_command_puts_an_expanded_secret_on_its_command_line():
    """`ps` shows every user a process's arguments: tokens go through files, pipes or the env.

    A shell variable assigned from a secret (`JOB_ENV="...$HF_TOKEN..."`) is a secret too.
    """
    offenders = []
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "k8s").rglob("*.yaml"))]
    for path in docs:
        lines = path.read_text().splitlines()
        names = SECRET_NAME
        for line in lines:  # names assigned from a secret expansion, anywhere in the file
            assigned = re.match(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
            if assigned and re.search(rf"\$\{{?{names}\b", assigned.group(2)):
                names = rf"(?:{names}|{assigned.group(1)})"
        expansion = re.compile(rf"\$\{{?{names}\b")
        for number, line in enumerate(lines, start=1):
            for segment in re.split(r"\||&&|;|\(|\)", line.strip().lstrip("#").strip()):
                words = segment.split()
                if (expansion.search(segment) and words and words[0] not in SHELL_BUILTINS
                        and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0])):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def _attribute_docstrings(path: Path) -> list[str]:
    """`field: T` followed by a string statement, in a dataclass body (the style the README retired)."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in node.decorator_list):
            for stmt, after in itertools.pairwise(node.body):
                if (isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr)
                        and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                    found.append(f"{path.relative_to(ROOT)}:{after.lineno} {node.name}.{ast.unparse(stmt.target)}")
    return found


def test_fields_are_documented_one_way():
    """README "Layout": a config field has help= (docs/config.md is made of it); any other
    dataclass explains a field with a comment, never an attribute docstring."""
    rows = describe_fields() + describe_fields(GpuProfile, "profiles.<name>.")
    undocumented = [key for key, _, help_text in rows if not help_text.strip()]
    assert undocumented == []
    docstrings = [hit for path in sorted((ROOT / "qlora_ray").glob("*.py")) for hit in _attribute_docstrings(path)]
    assert docstrings == []
