"""`qlora-ray plan` and the planning API the run driver uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import CONFIGS, ROOT

from qlora_ray.cli import main as cli_main
from qlora_ray.config import ConfigError, ExperimentConfig
from qlora_ray.grid import expand, load_spec
from qlora_ray.planner import (
    AUTO_BATCH_MARGIN,
    MODEL_CONFIGS_ENV,
    UNKNOWN_LENGTHS,
    backoff,
    load_model_config,
    plan_spec,
)

SHIPPED = sorted((ROOT / "experiments").glob("*.yaml"))
LLAMA31 = "meta-llama/Llama-3.1-8B-Instruct"
JSON_KEYS = {"experiment_id", "name", "gpu", "predicted_peak_bytes", "fits", "problems", "breakdown",
             "batch_size", "compute_dtype"}


def spec_of(**data: Any) -> Any:
    return expand({"name": "t", **data})


def write_spec(tmp_path: Path, data: dict[str, Any]) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_spec_plans(path: Path) -> None:
    spec = load_spec(path)
    # Hub models are planned from the fixtures (no network at test time): a new shipped spec
    # with a new model needs its config.json under tests/fixtures/configs/<hub id>/.
    plans = plan_spec(spec, model_configs=[CONFIGS])
    assert len(plans) == len(spec.cells)
    for plan in plans:
        row = plan.to_json()
        assert set(row) >= JSON_KEYS
        assert row["predicted_peak_bytes"] == max(row["predicted_train_bytes"], row["predicted_eval_bytes"]) > 0
        assert row["predicted_low_bytes"] < row["predicted_peak_bytes"] < row["predicted_high_bytes"]
        assert isinstance(row["batch_size"], int) and row["batch_size"] >= 1
        assert row["compute_dtype"] in ("float16", "bfloat16", "float32")
        assert plan.experiment_id == plan.config.experiment_id
        # What we ship runs as shipped (the refusal rule itself: the does-not-fit, worst-case
        # and unknown-lengths tests below).
        assert plan.fits and not plan.problems, (plan.name, plan.problems)
    json.dumps([p.to_json() for p in plans])


def test_example_spec_fits_everywhere_and_plan_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", str(ROOT / "experiments" / "example.yaml")]) == 0
    out = capsys.readouterr().out
    assert "r4-bs2-fp16-T4" in out and "headroom" in out and "30 cells, 30 fit" in out


def test_gpu_profiles_spec_answers_for_llama31_offline(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["plan", str(ROOT / "experiments" / "gpu_profiles.yaml"), "--json",
                   "--model-configs", str(CONFIGS)])
    rows = json.loads(capsys.readouterr().out)
    assert rc == 0
    by_name = {r["name"]: r for r in rows}
    # An 8B model in 4-bit takes ~8 GiB before any batch: a real, non-trivial prediction.
    assert all(r["predicted_peak_bytes"] > 8 * 2**30 for r in rows)
    assert by_name["r8-bs1-autodtype-L4"]["compute_dtype"] == "bfloat16"
    assert by_name["r8-bs1-fp16-T4"]["compute_dtype"] == "float16"
    assert by_name["r64-bs4-fp16-T4"]["headroom"] < by_name["r8-bs1-fp16-T4"]["headroom"]


def test_bf16_on_t4_fails_naming_the_cells(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path, {
        "name": "bf16-everywhere",
        "base": {"model": "builtin:tiny-llama", "quant": {"compute_dtype": "bfloat16"}},
        "grid": {"lora.r": [4, 8], "gpu": ["T4", "L4"]},
    })
    assert cli_main(["plan", spec]) == 1
    out = capsys.readouterr().out
    problems = out.split("problems (these cells cannot run as specified):")[1]
    assert "r4-T4:" in problems and "r8-T4:" in problems and "L4:" not in problems
    assert "bfloat16" in problems and "use float16 or auto" in problems

    assert cli_main(["plan", spec, "--json"]) == 1
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["r4-T4"]["problems"] and not rows["r4-L4"]["problems"]

    assert cli_main(["plan", spec, "--skip-unfit"]) == 0
    assert "skipped" in capsys.readouterr().out


def test_auto_dtype_resolves_per_card_and_keeps_the_request() -> None:
    spec = spec_of(base={"model": "builtin:tiny-llama", "quant": {"compute_dtype": "auto"}},
                   grid={"gpu": ["T4", "V100", "A10G", "H100", "cpu"]})
    got = {p.gpu: (p.compute_dtype, p.to_json()["compute_dtype_requested"], p.problems)
           for p in plan_spec(spec)}
    v100 = got.pop("V100")
    assert got == {"T4": ("float16", "auto", []), "A10G": ("bfloat16", "auto", []),
                   "H100": ("bfloat16", "auto", []), "cpu": ("bfloat16", "auto", [])}
    assert v100[:2] == ("float16", "auto") and len(v100[2]) == 1  # no kernels: see below


def test_cards_and_attention_the_software_cannot_serve_are_plan_problems(monkeypatch) -> None:
    """Issue 13 item 10: the CUDA 13 torch and bitsandbytes the image installs have no sm_70
    kernels (V100), and the image has no flash-attn; both used to plan fine."""
    from importlib import metadata

    from qlora_ray import planner

    spec = spec_of(base={"model": "builtin:tiny-llama", "quant": {"compute_dtype": "float16"}},
                   grid={"gpu": ["V100", "V100-32G", "T4", "A100-40G"],
                         "model.attn_implementation": ["sdpa", "flash_attention_2"]})
    read_installed = planner.runtime_support.__wrapped__
    monkeypatch.setattr(planner, "runtime_support", lambda: ((7, 5), False))
    problems = {(p.gpu, p.config.model.attn_implementation): p.problems for p in plan_spec(spec)}
    for gpu in ("V100", "V100-32G"):
        (kernels,) = problems[gpu, "sdpa"]
        assert kernels.startswith("`gpu` needs a card the installed torch has kernels for")
        assert "has 7.0" in kernels and "CUDA 12.6" in kernels
    assert problems["T4", "sdpa"] == [] and problems["A100-40G", "sdpa"] == []
    (fa2,) = problems["A100-40G", "flash_attention_2"]
    assert "needs the flash-attn package" in fa2 and "use sdpa" in fa2
    assert "needs an Ampere or newer GPU" in problems["T4", "flash_attention_2"][0]

    # where flash-attn is installed and torch is a CUDA 12.6 build, both are fine
    monkeypatch.setattr(planner, "runtime_support", lambda: ((5, 0), True))
    problems = {(p.gpu, p.config.model.attn_implementation): p.problems for p in plan_spec(spec)}
    assert problems["V100", "sdpa"] == [] and problems["A100-40G", "flash_attention_2"] == []

    # and the torch build is read from its version tag, without importing it
    for version, min_cc in (("2.13.0", (7, 5)), ("2.13.0+cu130", (7, 5)), ("2.13.0+cpu", (7, 5)),
                            ("2.13.0+cu126", (5, 0))):
        monkeypatch.setattr(metadata, "version", lambda dist, v=version: v)
        assert read_installed()[0] == min_cc


def test_auto_batch_is_the_largest_that_fits_with_margin() -> None:
    spec = spec_of(base={"model": LLAMA31, "train": {"batch_size": "auto", "max_seq_len": 512},
                         "eval": {"batch_size": 1}, "quant": {"compute_dtype": "auto"}},
                   grid={"gpu": ["T4", "L4", "A100-80G"]})
    plans = {p.gpu: p for p in plan_spec(spec, model_configs=[CONFIGS], worst_case=True)}
    assert 1 <= plans["T4"].batch_size < plans["L4"].batch_size < plans["A100-80G"].batch_size
    for p in plans.values():
        assert p.config.train.batch_size == "auto"  # the plan keeps the spec'd config
        assert p.fits and not p.problems
        assert p.predicted_peak_bytes <= p.profile.usable_bytes * (1 - AUTO_BATCH_MARGIN)
        same, one_more = (plan_spec(expand({"name": "t", "base": {
            "model": LLAMA31, "gpu": p.gpu, "train": {"batch_size": n, "max_seq_len": 512},
            "eval": {"batch_size": 1}, "quant": {"compute_dtype": "auto"}}}), model_configs=[CONFIGS],
            worst_case=True)[0] for n in (p.batch_size, p.batch_size + 1))
        assert one_more.predicted_peak_bytes > p.profile.usable_bytes * (1 - AUTO_BATCH_MARGIN)
        # `auto` is planned as if that batch had been asked for: the same peaks, part by part.
        auto_row, asked_row = p.to_json(), same.to_json()
        for key in ("predicted_train_bytes", "predicted_eval_bytes", "breakdown", "eval_breakdown"):
            assert auto_row[key] == asked_row[key], key


def test_a_cell_that_does_not_fit_says_what_would(tmp_path: Path) -> None:
    base = {"model": LLAMA31, "gpu": "T4", "train": {"batch_size": 16, "max_seq_len": 1024},
            "eval": {"batch_size": 1}, "quant": {"compute_dtype": "float16"}}
    (plan,) = plan_spec(spec_of(base=base), model_configs=[CONFIGS], worst_case=True)
    assert not plan.fits and plan.headroom < 0
    (msg,) = plan.problems
    assert "does not fit" in msg and "T4" in msg and "train.batch_size" in msg and "--force" in msg
    # With the opt-in back-off the run can still go ahead: a note, not a problem.
    base["train"]["oom_backoff"] = True
    (plan,) = plan_spec(spec_of(base=base), model_configs=[CONFIGS], worst_case=True)
    assert not plan.fits and plan.problems == [] and "oom_backoff" in plan.notes[0]


def test_65b_does_not_fit_a_t4_at_any_batch() -> None:
    spec = spec_of(base={"model": "huggyllama/llama-65b", "gpu": "T4", "train": {"batch_size": "auto"},
                         "quant": {"compute_dtype": "auto"}})
    (plan,) = plan_spec(spec, model_configs=[CONFIGS])
    assert plan.batch_size == 1 and not plan.fits
    assert "even batch_size 1 does not fit" in plan.problems[0]


@pytest.mark.parametrize(("bs", "ga", "want"), [
    (8, 1, (4, 2)), (4, 3, (2, 6)), (6, 1, (3, 2)), (9, 2, (3, 6)), (3, 1, (1, 3)), (2, 5, (1, 10)),
])
def test_backoff_keeps_the_effective_batch(bs: int, ga: int, want: tuple[int, int]) -> None:
    cfg = ExperimentConfig().replace(**{"train.batch_size": bs, "train.grad_accum": ga})
    smaller = backoff(cfg)
    assert smaller is not None
    assert (smaller.train.batch_size, smaller.train.grad_accum) == want
    assert smaller.train.effective_batch == cfg.train.effective_batch


def test_backoff_chain_ends_at_batch_1() -> None:
    cfg: ExperimentConfig | None = ExperimentConfig().replace(**{"train.batch_size": 8})
    seen = []
    while cfg is not None:
        seen.append((cfg.train.batch_size, cfg.train.grad_accum))
        cfg = backoff(cfg)
    assert seen == [(8, 1), (4, 2), (2, 4), (1, 8)]
    with pytest.raises(ValueError, match="auto"):
        backoff(ExperimentConfig().replace(**{"train.batch_size": "auto"}))


def test_model_config_from_a_folder_holding_only_config_json(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / LLAMA31 / "config.json").read_text())
    assert load_model_config(str(folder))["vocab_size"] == 128256
    assert load_model_config(str(folder / "config.json"))["vocab_size"] == 128256
    # ... and a whole spec planned against that folder.
    (plan,) = plan_spec(spec_of(base={"model": str(folder), "gpu": "L4"}))
    assert plan.fits and plan.predicted_peak_bytes > 8 * 2**30
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"without config\.json"):
        load_model_config(str(tmp_path / "empty"))


def test_model_config_lookup_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_model_config(LLAMA31, search=[CONFIGS])["num_key_value_heads"] == 8
    flat = tmp_path / "meta-llama--Llama-2-7b-hf"
    flat.mkdir()
    (flat / "config.json").write_text((CONFIGS / "meta-llama/Llama-2-7b-hf/config.json").read_text())
    monkeypatch.setenv(MODEL_CONFIGS_ENV, os.pathsep.join([str(tmp_path / "nothing"), str(tmp_path)]))
    assert load_model_config("meta-llama/Llama-2-7b-hf")["intermediate_size"] == 11008


def test_builtin_model_config() -> None:
    cfg = load_model_config("builtin:tiny-llama")
    assert cfg["model_type"] == "llama" and cfg["vocab_size"] > 0


def test_hub_model_offline_fails_with_a_clear_message(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, {"name": "offline", "base": {"model": "some-org/not-here-7b", "gpu": "L4"}})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop(MODEL_CONFIGS_ENV, None)
    proc = subprocess.run([sys.executable, "-m", "qlora_ray.cli", "plan", spec], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "some-org/not-here-7b" in proc.stderr
    assert "config.json" in proc.stderr and "--model-configs" in proc.stderr


PROBE = """
import io, json, sys
from contextlib import redirect_stdout
from qlora_ray.cli import main
buf = io.StringIO()
with redirect_stdout(buf):
    rc = main(sys.argv[1:])
rows = json.loads(buf.getvalue())
heavy = sorted(m for m in ("torch", "ray", "transformers", "bitsandbytes", "peft") if m in sys.modules)
print(json.dumps({"rc": rc, "cells": len(rows), "heavy": heavy}))
"""


@pytest.mark.parametrize("args", [
    ["experiments/example.yaml"],
    ["experiments/gpu_profiles.yaml", "--model-configs", "tests/fixtures/configs"],
])
def test_plan_imports_neither_torch_nor_ray(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE, "plan", *args, "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["rc"] == 0 and got["cells"] == 30 and got["heavy"] == []


SEED_7B = {"name": "seed-7b", "preset": "seed-per-gpu",
           "base": {"model": "meta-llama/Llama-2-7b-hf", "quant": {"compute_dtype": "auto"},
                    "train": {"max_seq_len": 512}},
           "grid": {"gpu": ["T4", "L4", "A100-40G", "H100"]}}


@pytest.mark.parametrize("worst_case", [False, True], ids=["data", "worst-case"])
def test_the_seed_per_gpu_table_for_a_7b_llama_fits_at_default_eval_settings(worst_case: bool) -> None:
    """Issue 9: T4 r8/a16 bs1 attention fp16, L4 r16/a32 bs2, A100-40G r32/a64 bs4 attention+MLP,
    H100 r64/a128 bs8 all linear layers, at max_seq_len 512 and eval.batch_size 16."""
    plans = {p.gpu: p for p in plan_spec(expand(SEED_7B), model_configs=[CONFIGS], worst_case=worst_case)}
    t4 = plans["T4"].config
    assert (t4.lora.r, t4.lora.alpha, t4.train.batch_size, t4.eval.batch_size) == (8, 16, 1, 16)
    assert plans["T4"].compute_dtype == "float16" and plans["H100"].config.lora.target_modules == "all-linear"
    for p in plans.values():
        assert p.fits and not p.problems, (p.gpu, p.problems)
    if worst_case:
        # Every prompt at 512 tokens, 16 at a time: the eval's KV cache is fp32 (4-bit layers
        # return the fp32 residual's dtype), so on a T4 the card is inside the range: it runs.
        t4_plan = plans["T4"]
        low, high = t4_plan.estimate.peak_range
        assert low <= t4_plan.profile.usable_bytes < high and t4_plan.tight
        assert any(n.startswith("tight:") for n in t4_plan.notes)
    else:
        assert not any(p.tight for p in plans.values())


# The seeds' T4 setup (issue 9's first complaint): Llama-2-7B nf4 + double quantization,
# float16, r 16 on q/k/v/o, batch 1, checkpointing, default eval settings.
T4_7B = {"model": "meta-llama/Llama-2-7b-hf", "gpu": "T4",
         "quant": {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "float16"},
         "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
         "train": {"batch_size": 1, "gradient_checkpointing": True}}


@pytest.mark.parametrize("dataset", ["experiments/data/fin_sentiment.jsonl", "timdettmers/openassistant-guanaco"],
                         ids=["local", "hub"])
def test_the_seed_t4_7b_cell_fits_at_512_1024_and_2048_tokens(dataset: str) -> None:
    spec = expand({"name": "t4", "base": {**T4_7B, "dataset": {"path": dataset}},
                   "grid": {"train.max_seq_len": [512, 1024, 2048]}})
    plans = plan_spec(spec, model_configs=[CONFIGS])
    for p in plans:
        assert p.fits and not p.problems, (p.name, p.problems)
    if dataset.startswith("experiments/"):
        # The shipped rows are short: sized by them, nothing is near the card.
        assert not any(p.tight for p in plans)
    else:
        # A hub dataset's lengths are unknown: sized for max_seq_len-long rows, which at
        # 2,048 tokens and 16 eval rows would not fit, but nothing says the rows are that
        # long, so the cell runs (tight) and says why.
        long = plans[-1]
        assert long.shape.source == UNKNOWN_LENGTHS and long.tight
        assert long.estimate.peak_bytes > long.profile.usable_bytes
        assert any("lengths are unknown" in n for n in long.notes)


def test_unknown_lengths_still_refuse_what_the_weights_alone_cannot_hold() -> None:
    spec = expand({"name": "t4", "base": {**T4_7B, "model": "meta-llama/Llama-2-13b-hf", "quant": {"bits": 16},
                                          "dataset": {"path": "timdettmers/openassistant-guanaco"}}})
    (plan,) = plan_spec(spec, model_configs=[CONFIGS])
    assert not plan.fits and plan.problems  # 26 GB of 16-bit weights on a 15 GiB card


def test_data_lengths_size_cells_below_the_worst_case() -> None:
    spec = expand({**SEED_7B, "grid": {"gpu": ["L4"]}})
    (data,) = plan_spec(spec, model_configs=[CONFIGS])
    (worst,) = plan_spec(spec, model_configs=[CONFIGS], worst_case=True)
    assert data.shape.train_seq < 100 < worst.shape.train_seq == 512
    assert data.estimate.train_bytes < worst.estimate.train_bytes
    assert data.estimate.eval_bytes < worst.estimate.eval_bytes


def test_plan_json_has_the_training_and_eval_predictions(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", str(ROOT / "experiments" / "gpu_profiles.yaml"), "--json", "--worst-case",
                     "--model-configs", str(CONFIGS)]) == 0
    for row in json.loads(capsys.readouterr().out):
        assert row["predicted_peak_bytes"] == max(row["predicted_train_bytes"], row["predicted_eval_bytes"])
        assert row["predicted_train_low_bytes"] < row["predicted_train_bytes"] < row["predicted_train_high_bytes"]
        assert row["train_moment"] in ("forward", "loss", "layer") and row["predicted_lengths"] == "worst case"
        assert row["predicted_train_seq"] == 512 and isinstance(row["tight"], bool)
