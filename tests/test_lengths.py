"""lengths.py: the batch lengths the memory planner sizes a cell for, against data.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import DATA

from qlora_ray.config import ExperimentConfig, from_dict
from qlora_ray.lengths import batch_shape, data_lengths, worst_case


def config(**dotted) -> ExperimentConfig:
    cfg = from_dict(ExperimentConfig, {"dataset": {"path": str(DATA), "eval_size": 64}})
    return cfg.replace(**dotted) if dotted else cfg


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from qlora_ray.builtin import ensure_builtin

    return AutoTokenizer.from_pretrained(ensure_builtin("builtin:tiny-llama"))


@pytest.mark.parametrize("chat", [False, True])
def test_batch_lengths_are_what_data_py_builds(tokenizer, chat: bool) -> None:
    from qlora_ray.data import prepare_data

    cfg = config(**{"train.max_seq_len": 48, "dataset.chat_template": chat})
    shape = batch_shape(cfg, data_lengths(cfg), batch_size=4)
    data = prepare_data(cfg, tokenizer)
    assert shape.source == "tokenizer"
    # The longest training row: a random batch can hold it, and pads to it.
    assert shape.train_seq == max(len(r) for r in data.train["input_ids"])
    assert shape.eval_prompt == max(len(tokenizer(p, add_special_tokens=False)["input_ids"])
                                    for p in data.eval_prompts)
    assert shape.eval_seq == max(len(r) for r in data.eval["input_ids"])


def test_packing_fills_every_batch() -> None:
    cfg = config(**{"train.max_seq_len": 96, "dataset.packing": True})
    assert batch_shape(cfg, data_lengths(cfg), batch_size=2).train_seq == 96


def test_short_data_is_sized_shorter_than_the_worst_case() -> None:
    cfg = config(**{"train.max_seq_len": 1024})
    shape = batch_shape(cfg, data_lengths(cfg), batch_size=4)
    assert shape.train_seq < 100 < 1024 == worst_case(cfg).train_seq
    assert shape.eval_prompt < 100


def test_hub_datasets_are_sized_for_the_worst_case() -> None:
    cfg = config(**{"dataset.path": "org/some-hub-dataset"})
    assert batch_shape(cfg, data_lengths(cfg), batch_size=4) == worst_case(cfg)


def test_lengths_import_neither_torch_nor_transformers() -> None:
    probe = ("import sys, json; from qlora_ray.config import ExperimentConfig, from_dict; "
             "from qlora_ray.lengths import data_lengths, batch_shape; "
             f"cfg = from_dict(ExperimentConfig, {{'dataset': {{'path': {str(DATA)!r}}}}}); "
             "batch_shape(cfg, data_lengths(cfg), 4); "
             "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
