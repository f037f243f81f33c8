"""Small pieces several test modules build the same way: a toy Llama for Trainer tests, a
cell config on the shipped data, the built-in tokenizer, and a planner comparison on
length-skewed rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import CONFIGS, DATA


def toy_llama() -> Any:
    """A one-layer Llama over 32 tokens (seeded): enough for the Trainer to take real steps."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2, max_position_embeddings=32))


def collate_lm(rows: list[dict]) -> dict[str, Any]:
    """Equal-length rows of `input_ids` -> a language-modelling batch (labels = inputs)."""
    import torch

    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def cell_config(max_seq_len: int, **dotted: Any) -> Any:
    """A cell on the shipped data (8 eval rows, batch 4), with dotted keys set."""
    from qlora_ray.config import ExperimentConfig, from_dict, set_dotted

    data: dict = {"dataset": {"path": str(DATA), "eval_size": 8},
                  "train": {"batch_size": 4, "max_seq_len": max_seq_len}}
    for key, value in dotted.items():
        set_dotted(data, key, value)
    return from_dict(ExperimentConfig, data)


def builtin_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from qlora_ray.builtin import ensure_builtin

    return AutoTokenizer.from_pretrained(ensure_builtin("builtin:tiny-llama"))


def skewed_plans(tmp_path: Path, train_key: str) -> tuple[dict, dict]:
    """The plan of one Llama-3.1-8B cell on length-skewed rows (most short, every tenth ~400
    words), without and with `train.<train_key>` on: (off, on) as JSON dicts."""
    import yaml

    from qlora_ray.grid import load_spec
    from qlora_ray.planner import plan_spec

    rows = [{"instruction": "Classify.", "input": "word " * (400 if i % 10 == 0 else 3 + i % 7),
             "output": "positive"} for i in range(120)]
    data = tmp_path / "skewed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plans = {}
    for on in (False, True):
        spec = tmp_path / f"s{on}.yaml"
        spec.write_text(yaml.safe_dump({"name": "g", "base": {
            "model": "meta-llama/Llama-3.1-8B-Instruct", "gpu": "A100-80G",
            "dataset": {"path": str(data), "eval_size": 8},
            "train": {"batch_size": 4, "max_seq_len": 512, train_key: on}}}))
        plans[on] = plan_spec(load_spec(str(spec)), model_configs=[CONFIGS])[0].to_json()
    return plans[False], plans[True]
