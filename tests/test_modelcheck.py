"""Model checks at plan time: the attention kernel an architecture supports, and LoRA rank.

A random-init Gemma-2 saved with save_pretrained is the model the issue found planning as
fitting and then failing at load in every cell (`sdpa` was the default, and
Gemma2ForCausalLM has no SDPA kernel).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import DATA, ROOT

from qlora_ray.cli import main as cli_main
from qlora_ray.config import ExperimentConfig, from_dict
from qlora_ray.modelcheck import ATTENTION_SUPPORT, effective_attention

EXAMPLE_FIRST_ID_0_1_0 = "f4bc0d02534c"  # experiments/example.yaml's first cell at ca2c96e


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory) -> Path:
    """A tiny random-init Gemma-2 with the builtin tokenizer, saved as a user would."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, set_seed

    from qlora_ray.builtin import ensure_builtin

    folder = tmp_path_factory.mktemp("gemma2")
    tok = AutoTokenizer.from_pretrained(ensure_builtin("builtin:tiny-llama"))
    set_seed(0)
    config = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                          pad_token_id=tok.pad_token_id or 0, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)
    Gemma2ForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def plan_json(tmp_path: Path, capsys: pytest.CaptureFixture[str], base: dict) -> tuple[int, list[dict]]:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "m", "base": {"dataset": {"path": str(DATA)}, **base}}))
    rc = cli_main(["plan", str(spec), "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_attention_table_matches_the_installed_transformers() -> None:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    wrong = {}
    for model_type, supported in ATTENTION_SUPPORT.items():
        cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        actual = ("eager", *(["sdpa"] if cls._supports_sdpa else []),
                  *(["flash_attention_2"] if cls._supports_flash_attn else []))
        if set(actual) != set(supported):
            wrong[model_type] = actual
    assert not wrong, f"update ATTENTION_SUPPORT in qlora_ray/modelcheck.py: {wrong}"


def test_gemma2_plans_with_the_kernel_it_supports_and_rejects_sdpa(
    gemma2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, cells = plan_json(tmp_path, capsys, {"model": str(gemma2)})
    assert rc == 0 and cells[0]["problems"] == [] and cells[0]["fits"]
    assert effective_attention("auto", "gemma2") == "eager"
    assert effective_attention("auto", "llama") == "sdpa"

    rc, cells = plan_json(tmp_path, capsys, {"model": {"name": str(gemma2), "attn_implementation": "sdpa"}})
    assert rc == 1
    (message,) = cells[0]["problems"]
    assert message.startswith("`model.attn_implementation` is not supported by gemma2 models")
    assert "got 'sdpa'" in message and "use auto" in message


def test_gemma2_auto_loads_with_eager_attention(gemma2: Path) -> None:
    from qlora_ray import modeling
    from qlora_ray.device import cpu_device

    cfg = from_dict(ExperimentConfig, {"model": str(gemma2), "quant": {"compute_dtype": "float32"}})
    assert cfg.model.attn_implementation == "auto"
    loaded = modeling.load(cfg, cpu_device(), "float32")
    assert loaded.model.config._attn_implementation == "eager"
    # Packed or padding-free rows on the CPU run sdpa one example at a time only where
    # transformers loaded sdpa (qlora_ray/attention.py); Gemma-2 keeps eager.
    for setting in ({"dataset": {"packing": True}}, {"train": {"padding_free": True}}):
        one_row = from_dict(ExperimentConfig, {"model": str(gemma2), "quant": {"compute_dtype": "float32"},
                                               **setting})
        assert modeling.load(one_row, cpu_device(), "float32").model.config._attn_implementation == "eager"


def test_lora_rank_above_the_adapted_layers_width_is_a_plan_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # builtin:tiny-llama: hidden 128, 4 heads x 32 = 128 for q/k/v/o, MLP 384
    rc, cells = plan_json(tmp_path, capsys, {"lora": {"r": 129}})
    assert rc == 1
    (message,) = cells[0]["problems"]
    assert message.startswith("`lora.r` is larger than the adapted layer q_proj (128 -> 128 features")
    assert "got 129" in message and "use lora.r <= 128" in message
    rc, cells = plan_json(tmp_path, capsys, {"lora": {"r": 128}})
    assert rc == 0 and cells[0]["problems"] == []


def test_memory_estimate_counts_eager_scores_for_auto_on_gemma2(gemma2: Path) -> None:
    from qlora_ray.memory import architecture, estimate

    arch = architecture(json.loads((gemma2 / "config.json").read_text()))
    auto = from_dict(ExperimentConfig, {"model": str(gemma2)})
    eager = auto.replace(**{"model.attn_implementation": "eager"})
    sdpa_like = auto.replace(**{"model.attn_implementation": "flash_attention_2", "quant.compute_dtype": "float16"})
    assert estimate(arch, auto).peak_bytes == estimate(arch, eager).peak_bytes
    # Eager's seq x seq scores are in what a layer keeps: the layer moment of the step.
    assert estimate(arch, sdpa_like).moment_tensors["layer"] < estimate(arch, auto).moment_tensors["layer"]


@pytest.mark.slow
def test_gemma2_cell_with_the_default_kernel_trains_and_records_eager(gemma2: Path) -> None:
    from qlora_ray.worker import run_experiment

    cfg = from_dict(ExperimentConfig, {
        "model": str(gemma2), "dataset": {"path": str(DATA), "eval_size": 4},
        "quant": {"compute_dtype": "float32"},
        "train": {"max_steps": 1, "batch_size": 2, "optim": "adamw_torch", "gradient_checkpointing": False},
        "eval": {"max_new_tokens": 2, "before": False},
    })
    row = run_experiment(cfg, num_threads=1).row
    assert row["status"] == "ok", row["error"]
    assert row["attn_implementation"] == "eager"


def test_the_auto_default_keeps_the_ids_cells_had_when_sdpa_was_the_default() -> None:
    from qlora_ray.grid import load_spec

    for cell in load_spec(ROOT / "experiments" / "example.yaml").cells:
        assert cell.model.attn_implementation == "auto"
        assert cell.experiment_id == cell.replace(**{"model.attn_implementation": "sdpa"}).experiment_id
    # the first cell's id as qlora-ray at ca2c96e (default sdpa) computed it
    assert load_spec(ROOT / "experiments" / "example.yaml").cells[0].experiment_id == EXAMPLE_FIRST_ID_0_1_0


def test_trust_remote_code_is_off_by_default_and_recorded_in_the_row(tmp_path: Path) -> None:
    from qlora_ray.results import empty_row, flatten
    from qlora_ray.results_io import read_run_rows, write_run

    cfg = from_dict(ExperimentConfig, {})
    assert cfg.model.trust_remote_code is False
    for trusted in (False, True):
        row = {**empty_row(), **flatten(cfg.replace(**{"model.trust_remote_code": trusted})), "status": "ok"}
        write_run(str(tmp_path), "s", row)
        assert read_run_rows(str(tmp_path), "s")[row["experiment_id"]]["trust_remote_code"] is trusted


def test_pickled_only_weights_are_a_plan_problem_and_refused_at_load_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_ray import modeling
    from qlora_ray.builtin import ensure_builtin
    from qlora_ray.device import cpu_device

    # an older repository's layout: the weights only as a pickled pytorch_model.bin
    folder = tmp_path / "old-model"
    tok = AutoTokenizer.from_pretrained(ensure_builtin("builtin:tiny-llama"))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()

    rc, cells = plan_json(tmp_path, capsys, {"model": str(folder), "lora": {"r": 4}})
    assert rc == 1
    (message,) = cells[0]["problems"]
    assert message.startswith("`model.use_safetensors` loads only .safetensors weights, and model.name")
    assert "(pytorch_model.bin), got True" in message and "set model.use_safetensors: false" in message
    allowed = {"model": {"name": str(folder), "use_safetensors": False}, "lora": {"r": 4}}
    rc, cells = plan_json(tmp_path, capsys, allowed)
    assert rc == 0 and cells[0]["problems"] == []

    cpu = cpu_device()
    cfg = from_dict(ExperimentConfig, {"model": str(folder), "quant": {"compute_dtype": "float32"}})
    with pytest.raises(OSError, match=r"no file named model\.safetensors"):
        modeling.load(cfg, cpu, "float32")
    assert modeling.load(cfg.replace(**{"model.use_safetensors": False}), cpu, "float32").total_params > 0


def test_fields_added_after_0_1_0_leave_ids_alone_at_their_default() -> None:
    cfg = from_dict(ExperimentConfig, {})
    assert cfg.model.use_safetensors is True and cfg.eval.similarity.revision is None
    changed = cfg.replace(**{"model.use_safetensors": False})
    assert changed.experiment_id != cfg.experiment_id
    from qlora_ray.grid import load_spec

    assert load_spec(ROOT / "experiments" / "example.yaml").cells[0].experiment_id == EXAMPLE_FIRST_ID_0_1_0
