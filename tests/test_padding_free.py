"""`train.padding_free`: the padded default's batches, laid end to end without padding (issue 11 item 4).

The same random batches of `batch_size` examples as the default, each collated into one
row with positions restarting per example (transformers' `DataCollatorWithFlattening`
layout), so a step computes on real tokens only; the planner counts it as that one row.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS
from tiny_parts import builtin_tokenizer, cell_config, skewed_plans

from qlora_ray.config import ConfigError, ExperimentConfig, from_dict, set_dotted
from qlora_ray.data import make_collator, prepare_data
from qlora_ray.encoding import IGNORE_INDEX
from qlora_ray.results import batching


def cfg_of(**dotted) -> ExperimentConfig:
    return cell_config(128, **dotted)


@pytest.fixture(scope="module")
def tokenizer():
    return builtin_tokenizer()


def test_a_batch_becomes_one_row_of_its_examples_with_their_own_positions(tokenizer):
    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": [8, 9], "attention_mask": [1, 1], "labels": [8, 9]}]
    padded = make_collator(tokenizer)(rows)
    flat = make_collator(tokenizer, flatten=True)(rows)
    assert padded["input_ids"].shape == (2, 3)  # the default pads the short row
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9]]  # no pad token
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # The second example's first token is not predicted from the first one's last token.
    assert flat["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert "attention_mask" not in flat  # transformers builds the block mask from the positions


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_flat_batch_computes_what_the_padded_batch_does(tokenizer, attn):
    """Each example sees only itself, at its own positions: its logits, the loss and the
    adapters' gradients are the padded batch's, without the pad tokens."""
    from transformers import AutoModelForCausalLM

    from qlora_ray.builtin import ensure_builtin

    model = AutoModelForCausalLM.from_pretrained(ensure_builtin("builtin:tiny-llama"),
                                                 attn_implementation=attn).eval()
    data = prepare_data(cfg_of(), tokenizer)
    rows = [data.train[i] for i in range(4)]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # rows of unequal length: padding to drop
    padded = make_collator(tokenizer)(rows)
    flat = make_collator(tokenizer, flatten=True)(rows)

    def loss_and_grad(batch):
        model.zero_grad()
        out = model(**batch, use_cache=False)
        out.loss.backward()
        return out, model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    p_out, p_grad = loss_and_grad(padded)
    f_out, f_grad = loss_and_grad(flat)
    start = 0
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        torch.testing.assert_close(f_out.logits[0, start:start + n], p_out.logits[i, :n], rtol=1e-4, atol=1e-4)
        start += n
    torch.testing.assert_close(f_out.loss, p_out.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_grad, p_grad, rtol=1e-3, atol=1e-5)


def test_the_trainer_gets_the_padded_batches_without_their_padding():
    """Same sampler, same seed: the same examples in the same batches and steps as the
    default, every token real."""
    from qlora_ray.device import cpu_device
    from qlora_ray.modeling import load
    from qlora_ray.train import make_trainer

    base = {"quant.compute_dtype": "float32", "train.optim": "adamw_torch", "dataset.max_train_samples": 24}
    loaded = load(cfg_of(**base), cpu_device(), "float32")  # the batching setting does not reach the model
    seen = {}
    for flat in (False, True):
        cfg = cfg_of(**base, **{"train.padding_free": flat})
        data = prepare_data(cfg, loaded.tokenizer)
        trainer = make_trainer(loaded.model, loaded.tokenizer, data.train, data.eval,
                               make_collator(loaded.tokenizer, flat), cfg, cpu_device(), "float32", 4, 1)
        batches = list(trainer.get_train_dataloader())
        if flat:
            assert all(b["input_ids"].shape[0] == 1 for b in batches)
            seen[flat] = [sorted(b["input_ids"][0].tolist()) for b in batches]
        else:
            seen[flat] = [sorted(t for row, mask in zip(b["input_ids"].tolist(), b["attention_mask"].tolist(),
                                                        strict=True)
                                 for t, m in zip(row, mask, strict=True) if m) for b in batches]
    assert len(seen[True]) == 6 and seen[True] == seen[False]


def test_padding_free_names_what_it_cannot_be_combined_with():
    for other in ("dataset.packing", "train.group_by_length"):
        with pytest.raises(ConfigError) as err:
            cfg_of(**{"train.padding_free": True, other: True})
        assert "train.padding_free" in str(err.value) and f"set one of train.padding_free and {other}" in str(
            err.value)
    assert batching(cfg_of(**{"train.padding_free": True})) == "padding_free"
    assert batching(cfg_of()) == "padded"


def test_the_planner_counts_a_padding_free_batch_as_one_row_of_real_tokens(tmp_path: Path) -> None:
    """Time: the batch's real tokens, not batch x its longest row (faster than padded on
    skewed lengths). Memory: the worst batch is the longest rows end to end in one row, with
    a block mask on sdpa: the packed micro-batch's shape (memory.estimate)."""
    padded, flat = skewed_plans(tmp_path, "padding_free")
    assert flat["predicted_steps"] == padded["predicted_steps"]
    assert flat["predicted_train_tokens"] == padded["predicted_train_tokens"]
    assert flat["predicted_seconds"] < 0.8 * padded["predicted_seconds"]
    # One row of 4 x the longest row with a (4 x seq)^2 block mask: more than 4 padded rows.
    assert flat["predicted_peak_bytes"] > padded["predicted_peak_bytes"]


def test_the_memory_of_a_padding_free_batch_is_that_of_a_packed_one() -> None:
    from qlora_ray.memory import estimate
    from qlora_ray.profiles import get_profile

    config = json.loads((CONFIGS / "meta-llama/Llama-3.1-8B-Instruct" / "config.json").read_text())

    def train_bytes(**dotted) -> int:
        data: dict = {"model": {"name": "x"}, "train": {"batch_size": 4, "max_seq_len": 1024}}
        for key, value in dotted.items():
            set_dotted(data, key, value)
        return estimate(config, from_dict(ExperimentConfig, data), get_profile("A100-80G")).train_bytes

    assert train_bytes(**{"train.padding_free": True}) == train_bytes(**{"dataset.packing": True})
    assert train_bytes(**{"train.padding_free": True}) > train_bytes()
