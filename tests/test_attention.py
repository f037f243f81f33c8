"""qlora_ray.attention: sdpa one example at a time for packed / padding-free rows on the CPU (issue 11 item 4)."""

from __future__ import annotations

import pytest
import torch
from tiny_parts import builtin_tokenizer, cell_config
from transformers import AutoModelForCausalLM

from qlora_ray.attention import SDPA_BY_EXAMPLE, example_bounds, register
from qlora_ray.builtin import ensure_builtin
from qlora_ray.config import ExperimentConfig
from qlora_ray.data import make_collator, prepare_data
from qlora_ray.device import cpu_device
from qlora_ray.modeling import by_example_attention


def cfg_of(**dotted) -> ExperimentConfig:
    return cell_config(96, **dotted)


@pytest.fixture(scope="module")
def tokenizer():
    return builtin_tokenizer()


def model_with(attn: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(ensure_builtin("builtin:tiny-llama"), attn_implementation=attn)


def test_example_bounds_follow_transformers_restart_rule():
    assert example_bounds(torch.tensor([[0, 1, 2, 0, 1, 0]]), 6) == [(0, 3), (3, 5), (5, 6)]
    assert example_bounds(torch.tensor([[0, 1, 2, 3]]), 4) is None  # one example: plain sdpa
    assert example_bounds(torch.tensor([[0, 1], [0, 1]]), 2) is None  # not one row
    assert example_bounds(None, 3) is None


@pytest.mark.parametrize("packing", [False, True], ids=["padding_free", "packed"])
def test_each_example_gets_its_own_triangle_and_the_same_numbers(tokenizer, packing, monkeypatch):
    """The rows a packed or padding-free cell trains on: the logits, loss and gradients of
    transformers' masked sdpa, but no attention call spans more than one example."""
    cfg = cfg_of(**({"dataset.packing": True} if packing else {"train.padding_free": True}))
    data = prepare_data(cfg, tokenizer)
    batch = make_collator(tokenizer, flatten=not packing)([data.train[i] for i in range(2 if packing else 4)])
    longest = max(b - a for a, b in example_bounds(batch["position_ids"], batch["input_ids"].shape[1]))

    def run(attn: str):
        model = model_with(attn)
        out = model(**batch, use_cache=False)
        out.loss.backward()
        return out, model.model.layers[1].self_attn.k_proj.weight.grad

    lengths = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spying(query, *args, **kwargs):
        lengths.append(query.shape[2])
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spying)
    masked, masked_grad = run("sdpa")
    assert max(lengths) == batch["input_ids"].shape[1] > longest  # the whole row at once
    lengths.clear()
    split, split_grad = run(register())
    assert max(lengths) == longest  # one example at a time
    torch.testing.assert_close(split.logits, masked.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(split.loss, masked.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split_grad, masked_grad, rtol=1e-3, atol=1e-5)


def test_other_inputs_get_transformers_sdpa_unchanged(tokenizer):
    """A padded batch and generation with a cache (the eval passes) fall through."""
    data = prepare_data(cfg_of(), tokenizer)
    batch = make_collator(tokenizer)([data.train[i] for i in range(3)])
    plain, split = model_with("sdpa").eval(), model_with(register()).eval()
    with torch.no_grad():
        torch.testing.assert_close(split(**batch).logits, plain(**batch).logits)
    prompt = tokenizer(["The company reported"], return_tensors="pt")
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    assert split.generate(**prompt, **kw).tolist() == plain.generate(**prompt, **kw).tolist()


def test_packed_and_padding_free_cells_on_the_cpu_load_with_it():
    from qlora_ray import modeling

    cpu = cpu_device()
    base = {"quant.compute_dtype": "float32"}
    for setting in ("train.padding_free", "dataset.packing"):
        cfg = cfg_of(**base, **{setting: True})
        assert modeling.load(cfg, cpu, "float32").model.config._attn_implementation == SDPA_BY_EXAMPLE
        # The memory harness measures a GPU's sdpa.
        assert modeling.load(cfg, cpu, "float32", by_example=False).model.config._attn_implementation == "sdpa"
    assert modeling.load(cfg_of(**base), cpu, "float32").model.config._attn_implementation == "sdpa"
    # Only where transformers loaded sdpa: a spelled-out eager stands, and so does the eager
    # that `auto` gives a model without sdpa (tests/test_modelcheck.py, Gemma-2).
    assert not by_example_attention(cfg_of(**{"dataset.packing": True}), cpu, "eager")
