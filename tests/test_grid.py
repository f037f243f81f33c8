"""Spec expansion and validation: what a user sees when a spec is right, and when it is wrong."""

from __future__ import annotations

import textwrap

import pytest
from conftest import ROOT

from qlora_ray.config import ConfigError, ExperimentConfig, from_dict
from qlora_ray.grid import expand, load_spec


def test_example_spec_expands_as_design_says():
    spec = load_spec(ROOT / "experiments" / "example.yaml")
    # 3 ranks x 2 batch sizes x 2 dtypes x 3 GPUs, minus the 6 bf16 cells on the T4
    assert spec.name == "rank-vs-gpu"
    assert len(spec.cells) == 3 * 2 * 2 * 3 - 6
    names = {c.name for c in spec.cells}
    assert "r8-bs4-fp16-T4" in names
    assert "r8-bs4-bf16-T4" not in names  # excluded
    cell = next(c for c in spec.cells if c.name == "r16-bs2-bf16-A100-40G")
    assert (cell.lora.r, cell.train.batch_size, cell.quant.compute_dtype, cell.gpu) == (16, 2, "bfloat16", "A100-40G")
    assert cell.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert cell.train.learning_rate == pytest.approx(2e-4)


def test_experiment_ids_are_stable_distinct_and_file_safe():
    a = load_spec(ROOT / "experiments" / "example.yaml")
    b = load_spec(ROOT / "experiments" / "example.yaml")
    ids = [c.experiment_id for c in a.cells]
    assert ids == [c.experiment_id for c in b.cells]
    assert len(set(ids)) == len(ids)
    assert all(i.isalnum() and len(i) == 12 for i in ids)
    # the id is the recipe, not the label: renaming a cell keeps it
    cfg = a.cells[0]
    assert from_dict(ExperimentConfig, {**_as_dict(cfg), "name": "other"}).experiment_id == cfg.experiment_id


def _as_dict(cfg):
    from qlora_ray.config import to_dict

    return to_dict(cfg)


def test_paired_axes_keep_effective_batch_and_seeds_repeat():
    spec = expand({
        "name": "paired",
        "paired": [{"train.batch_size": [1, 2, 4], "train.grad_accum": [4, 2, 1]}],
        "seeds": [0, 1],
    })
    assert len(spec.cells) == 6
    assert {c.train.batch_size * c.train.grad_accum for c in spec.cells} == {4}
    assert {c.name for c in spec.cells} >= {"bs1-ga4-s0", "bs4-ga1-s1"}


def test_named_runs_cross_the_grid():
    spec = expand({
        "name": "runs",
        "runs": [{"name": "lora", "quant.bits": 16}, {"name": "qlora", "quant": {"bits": 4, "type": "fp4"}}],
        "grid": {"lora.r": [4, 8]},
    })
    by_name = {c.name: c for c in spec.cells}
    assert set(by_name) == {"lora-r4", "lora-r8", "qlora-r4", "qlora-r8"}
    assert by_name["lora-r8"].quant.bits == 16
    assert by_name["qlora-r4"].quant.type == "fp4"


def test_expansion_is_pure(capsys):
    data = {"name": "p", "grid": {"lora.r": [4, 8]}}
    before = repr(data)
    expand(data)
    expand(data)
    assert repr(data) == before  # the caller's mapping is not mutated
    assert capsys.readouterr() == ("", "")


BROKEN = [
    ({"name": "x", "grid": {"train.batch_size": [0]}}, ["`train.batch_size` must be >= 1, got 0"]),
    ({"name": "x", "grid": {"lora.rr": [8]}}, ["`lora.rr` is not a known key", "did you mean `lora.r`?"]),
    ({"name": "x", "gird": {"lora.r": [8]}}, ["`gird` is not a known spec key", "did you mean `grid`?"]),
    ({"name": "x", "grid": {"lora.r": []}}, ["`grid.lora.r` must be a non-empty list, got []"]),
    ({"name": "x", "grid": {"lora.r": ["eight"]}}, ["`lora.r` must be an integer, got 'eight'"]),
    ({"name": "x", "base": {"quant": {"bits": 3}}}, ["`quant.bits` must be one of 4, 8, 16, got 3"]),
    ({"name": "x", "base": {"quant": {"compute_dtype": "bf16"}}}, ["did you mean 'bfloat16'?"]),
    ({"name": "x", "base": {"train": {"optim": "adam"}}}, ["`train.optim` must be one of"]),
    ({"name": "x", "grid": {"gpu": ["T5"]}}, ["`gpu` is not a known GPU profile, got 'T5'"]),
    ({"name": "x", "runs": [{"name": "a"}, {"name": "b"}]},
     ["two cells that resolve to the same experiment, got ['a', 'b']"]),
    ({"name": "x", "grid": {"lora.r": [4]}, "exclude": [{"lora.r": 5}]}, ["`exclude[0]` matches no cell"]),
    ({"name": "x", "paired": [{"train.batch_size": [1, 2], "train.grad_accum": [1]}]},
     ["`paired[0]` has lists of different lengths"]),
    ({"name": "bad name!"}, ["`name` must be a file-name-safe string, got 'bad name!'"]),
    ({"name": "x", "seeds": [1, 1]}, ["`seeds` repeats a seed"]),
    ({"name": "x", "base": {"model": {"attn_implementation": "flash_attention_2"},
                            "quant": {"compute_dtype": "float32"}}},
     ["`model.attn_implementation` needs quant.compute_dtype float16 or bfloat16"]),
    ({"name": "x", "base": {"dataset": {"eval_size": 1.5}}}, ["`dataset.eval_size` as a fraction must be in (0, 1)"]),
    ({"name": "x", "base": {"dataset": {"packing": True}}, "grid": {"train.group_by_length": [False, True]}},
     ["`train.group_by_length` cannot be combined with dataset.packing", "got True; set one of"]),
]


@pytest.mark.parametrize(("spec", "expected"), BROKEN, ids=[e[0] for _, e in BROKEN])
def test_broken_specs_name_key_value_and_fix(spec, expected):
    with pytest.raises(ConfigError) as info:
        expand(spec)
    message = str(info.value)
    for fragment in expected:
        assert fragment in message
    # every line carries a fix after the semicolon
    assert all("; " in p for p in info.value.problems)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        expand({
            "name": "x",
            "seed": [1],
            "grid": {"train.batch_size": [0], "lora.dropout": [1.5], "quant.type": ["nf5"]},
        })
    text = str(info.value)
    assert "4 problems" in text
    for key in ("`seed`", "`train.batch_size`", "`lora.dropout`", "`quant.type`"):
        assert key in text


def test_yaml_scientific_notation_without_dot_is_a_number(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent("""
        name: lr
        grid:
          train.learning_rate: [2e-4, 1.0e-3]
    """))
    spec = load_spec(path)
    assert [c.train.learning_rate for c in spec.cells] == [2e-4, 1e-3]


def test_missing_spec_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="is not a file"):
        load_spec(tmp_path / "nope.yaml")
