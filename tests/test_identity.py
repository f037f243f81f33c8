"""Experiment ids: the same cell always gets the same id, whatever the spelling or version.

A rerun finds a cell's row by its id, so an id that moves makes finished cells run again
(hours of GPU time) and lets duplicate cells through. The rules are in qlora_ray/identity.py
(`_f` in config.py declares them per field); these tests hold the code to them.

Regenerate the golden ids (only when a change of ids is intended and migrated):
    .venv/bin/python tests/test_identity.py --update
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import ROOT

from qlora_ray.config import ConfigError, ExperimentConfig, LoraConfig, _f, describe_fields, from_dict
from qlora_ray.grid import expand, load_spec
from qlora_ray.identity import FIRST_RELEASE, canonical, legacy_experiment_id

GOLDEN = ROOT / "tests" / "golden" / "experiment_ids.json"
FIELDS_0_1_0 = ROOT / "tests" / "golden" / "fields-0.1.0.txt"
LEGACY = ROOT / "tests" / "fixtures" / "results-0.1.0"


def shipped_ids() -> dict[str, dict[str, str]]:
    return {
        str(path.relative_to(ROOT)): {c.name: c.experiment_id for c in load_spec(path).cells}
        for path in sorted((ROOT / "experiments").glob("*.yaml"))
    }


def test_every_cell_of_every_shipped_spec_keeps_its_id():
    expected = json.loads(GOLDEN.read_text())
    got = shipped_ids()
    assert set(got) == set(expected), "a shipped spec was added or removed: run this file with --update"
    changed = [f"{spec}: {name} {expected[spec].get(name)} -> {eid}"
               for spec, cells in got.items() for name, eid in cells.items() if expected[spec].get(name) != eid]
    assert not changed and got == expected, (
        "experiment ids changed, so every finished grid would run again after an upgrade:\n  "
        + "\n  ".join(changed)
        + "\nA new config field needs since=... in its _f(...); a changed default changes ids (see "
        "the identity rules in qlora_ray/identity.py)."
    )


def test_every_field_added_after_the_first_release_declares_when():
    first = set(FIELDS_0_1_0.read_text().split())
    hints = {key for key, _, _ in describe_fields()}
    assert first <= hints, f"fields of {FIRST_RELEASE} were removed or renamed: {sorted(first - hints)}"
    undeclared = [key for key in sorted(hints - first) if _since(key) == FIRST_RELEASE]
    assert not undeclared, (f"{undeclared} were added after {FIRST_RELEASE} but declare no since=...: "
                            "they would change every experiment id")


def _since(dotted: str) -> str:
    cls: type = ExperimentConfig
    *sections, leaf = dotted.split(".")
    for section in sections:
        cls = {f.name: f for f in dataclasses.fields(cls)}[section].default_factory().__class__
    return {f.name: f for f in dataclasses.fields(cls)}[leaf].metadata["since"]


def cell(**sections) -> ExperimentConfig:
    return from_dict(ExperimentConfig, sections)


# (what the user wrote, an equal config spelled another way)
SPELLINGS = [
    ({"lora": {"alpha": 16}}, {}),                                    # a default written out
    ({"lora": {"alpha": 16.0}}, {"lora": {"alpha": 16}}),             # int vs float
    ({"train": {"epochs": 3}}, {}),
    ({"train": {"epochs": 2}}, {"train": {"epochs": 2.0}}),
    ({"train": {"learning_rate": "2e-4"}}, {"train": {"learning_rate": 0.0002}}),  # YAML 1.1 string
    ({"lora": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}, {}),
    ({"model": "builtin:tiny-llama"}, {"model": {"name": "builtin:tiny-llama"}}),  # shorthand
    ({"train": {"weight_decay": 0}}, {}),
    ({"lora": {"alpha": 16}, "train": {"epochs": 3}}, {"lora": {"alpha": 16.0}, "train": {"epochs": 3.0}}),
]


@pytest.mark.parametrize(("written", "other"), SPELLINGS)
def test_the_same_cell_spelled_differently_has_one_id(written, other):
    a, b = cell(**written), cell(**other)
    assert a == b
    assert a.experiment_id == b.experiment_id


def test_the_name_is_a_label_not_part_of_the_id():
    assert cell(name="a").experiment_id == cell(name="b").experiment_id
    assert cell(lora={"r": 4}).experiment_id != cell(lora={"r": 8}).experiment_id


def test_a_default_written_out_is_the_same_cell_so_the_grid_refuses_the_duplicate():
    spec = {"name": "dup", "base": {"model": "builtin:tiny-llama"},
            "runs": [{"name": "plain"}, {"name": "spelled", "lora.alpha": 16}]}
    with pytest.raises(ConfigError, match=r"two cells that resolve to the same experiment.*plain.*spelled"):
        expand(spec)


def test_a_field_added_later_changes_no_id_while_it_holds_its_default():
    # A release that adds a LoRA knob: declared with since=..., as identity.py's rules say.
    later = dataclasses.make_dataclass(
        "LoraConfigNext", [("init_scale", float, _f(1.0, "A knob added after 0.1.0.", since="0.2.0"))],
        bases=(LoraConfig,), frozen=True)
    assert canonical(later()) == canonical(LoraConfig())
    assert canonical(later(r=4)) == canonical(LoraConfig(r=4))
    assert canonical(later(init_scale=1)) == canonical(LoraConfig())  # declared type: 1 is 1.0
    assert canonical(later(init_scale=0.5)) != canonical(LoraConfig())
    # Without since=..., the same field would have changed every id.
    careless = dataclasses.make_dataclass(
        "LoraConfigCareless", [("init_scale", float, _f(1.0, "Forgot since."))], bases=(LoraConfig,), frozen=True)
    assert canonical(careless()) != canonical(LoraConfig())


def test_a_changed_default_declared_same_as_the_old_one_changes_no_id():
    # A release whose new default trains what the old default did (rule 4 in identity.py).
    changed = dataclasses.make_dataclass(
        "LoraConfigNext", [("bias", str, _f("none-by-default", "New spelling of none.",
                                            same_as={"none-by-default": "none"}))],
        bases=(LoraConfig,), frozen=True)
    changed.problems = lambda self: []  # the value check is not what this test is about
    assert canonical(changed()) == canonical(LoraConfig())
    assert canonical(changed(bias="all")) == canonical(LoraConfig(bias="all"))


def test_legacy_ids_are_what_0_1_0_gave_each_spelling():
    # The figures: 0.1.0 gave these two equal configs two ids.
    assert legacy_experiment_id(cell(lora={"alpha": 16})) == "41f0803244d9"
    assert legacy_experiment_id(cell()) == "e2e6ba232b2e"
    assert cell(lora={"alpha": 16}).experiment_id == cell().experiment_id


def test_a_results_folder_written_by_0_1_0_resumes_without_rerunning_anything(tmp_path, monkeypatch, capsys):
    from qlora_ray.scheduler import run_spec

    spec_path = LEGACY / "legacy.yaml"
    spec = load_spec(spec_path)
    results = tmp_path / "results"
    for sub in ("runs", "samples"):
        shutil.copytree(LEGACY / sub, results / "legacy" / sub)
    before = pd.read_parquet(results / "legacy" / "runs").set_index("name")
    cells = {c.name: c for c in spec.cells}
    # The fixture really is 0.1.0's: its file names are the legacy ids, two differ from today's.
    assert set(before.experiment_id) == {legacy_experiment_id(c) for c in spec.cells}
    moved = {n for n, c in cells.items() if legacy_experiment_id(c) != c.experiment_id}
    assert moved == {"defaults", "nogpu"}

    monkeypatch.chdir(ROOT)  # the spec's dataset path is relative, as users write it
    code = run_spec(str(spec_path), results=str(results))
    out = capsys.readouterr().out
    # Nothing to run (Ray is never started): the ok rows are kept, the unschedulable one too.
    assert "3 cells, 3 already have a row, 0 to run" in out, out
    assert "2 row(s) written by qlora-ray 0.1.0 moved to their current experiment ids" in out, out
    assert code == 1  # `nogpu` is still not ok

    after = pd.read_parquet(results / "legacy" / "runs").set_index("name")
    assert sorted(after.index) == sorted(before.index)  # one row per cell, no duplicates
    for name, c in cells.items():
        assert after.loc[name, "experiment_id"] == c.experiment_id
        assert (results / "legacy" / "runs" / f"{c.experiment_id}.parquet").is_file()
        # the same row, not a new run of the cell
        for column in ("status", "started_at", "finished_at", "worker_pid", "train_loss", "attempt"):
            assert after.loc[name, column] == before.loc[name, column] or (
                pd.isna(after.loc[name, column]) and pd.isna(before.loc[name, column])), column
    samples = pd.read_parquet(results / "legacy" / "samples")
    assert set(samples.experiment_id) == {cells["defaults"].experiment_id, cells["spelled"].experiment_id}
    assert sorted(p.stem for p in (results / "legacy" / "samples").glob("*.parquet")) == sorted(
        set(samples.experiment_id))

    # A second resume is a plain one.
    assert run_spec(str(spec_path), results=str(results)) == 1
    out = capsys.readouterr().out
    assert "3 already have a row, 0 to run" in out and "moved" not in out


def _copy_of_the_0_1_0_folder(tmp_path: Path) -> tuple[Path, Path, Any, Path]:
    """0.1.0's results folder copied under tmp_path: (spec, results, its `defaults` cell, and
    that cell's row file under its legacy id)."""
    spec_path = LEGACY / "legacy.yaml"
    results = tmp_path / "results"
    for sub in ("runs", "samples"):
        shutil.copytree(LEGACY / sub, results / "legacy" / sub)
    defaults = next(c for c in load_spec(spec_path).cells if c.name == "defaults")
    return spec_path, results, defaults, results / "legacy" / "runs" / f"{legacy_experiment_id(defaults)}.parquet"


def test_a_move_interrupted_after_the_new_row_was_written_leaves_no_duplicate(tmp_path, monkeypatch, capsys):
    # Killed between writing the row under its new id and deleting the 0.1.0 file: both exist.
    from qlora_ray.scheduler import run_spec

    spec_path, results, defaults, old = _copy_of_the_0_1_0_folder(tmp_path)
    table = pd.read_parquet(old)
    table["experiment_id"] = defaults.experiment_id
    table.to_parquet(results / "legacy" / "runs" / f"{defaults.experiment_id}.parquet")

    monkeypatch.chdir(ROOT)
    run_spec(str(spec_path), results=str(results))
    assert "0 to run" in capsys.readouterr().out
    df = pd.read_parquet(results / "legacy" / "runs")
    assert len(df) == 3 and df.experiment_id.is_unique and not old.exists()


def test_a_0_1_0_ok_row_is_kept_over_a_later_failed_row_of_the_same_cell(tmp_path, monkeypatch, capsys):
    # After the upgrade the spec was spelled so that 0.1.0's row was not found (its legacy id
    # differs), the cell ran again under its current id and failed; spelled back, both rows
    # exist. The ok row is the one kept.
    from qlora_ray.scheduler import run_spec

    spec_path, results, defaults, old = _copy_of_the_0_1_0_folder(tmp_path)
    ok = pd.read_parquet(old)
    assert list(ok.status) == ["ok"]
    failed = ok.assign(experiment_id=defaults.experiment_id, status="failed", error="CUDA error", attempt=1)
    failed.to_parquet(results / "legacy" / "runs" / f"{defaults.experiment_id}.parquet")

    monkeypatch.chdir(ROOT)
    run_spec(str(spec_path), results=str(results))
    assert "0 to run" in capsys.readouterr().out
    df = pd.read_parquet(results / "legacy" / "runs").set_index("name")
    assert len(df) == 3 and df.experiment_id.is_unique and not old.exists()
    assert df.loc["defaults", "status"] == "ok" and df.loc["defaults", "experiment_id"] == defaults.experiment_id
    assert df.loc["defaults", "started_at"] == ok.started_at[0]


if __name__ == "__main__":
    if sys.argv[1:] == ["--update"]:
        GOLDEN.write_text(json.dumps(shipped_ids(), indent=1) + "\n")
        print(f"wrote {GOLDEN}")
    else:
        print(yaml.safe_dump(shipped_ids()))
