"""evaluate.py's model-facing half on the built-in model: one ruler before and after
training, a fixed generation config, a token-weighted eval loss without full logits."""

from __future__ import annotations

import math
from types import MethodType

import numpy as np
import pytest
from conftest import DATA

from qlora_ray import evaluate as ev
from qlora_ray.config import ExperimentConfig, from_dict

TEXTS = ["negative", "Polar Airlines shares plunge", "", "Harbor Financial profit falls"]


def config(**overrides) -> ExperimentConfig:
    cfg = from_dict(ExperimentConfig, {
        "dataset": {"path": str(DATA), "eval_size": 8},
        "quant": {"compute_dtype": "float32"},
        "lora": {"dropout": 0.0},
        "eval": {"max_new_tokens": 6, "batch_size": 4},
    })
    return cfg.replace(**overrides) if overrides else cfg


class NoCuda:
    @staticmethod
    def is_available():
        return False


@pytest.fixture(scope="module")
def loaded():
    from qlora_ray.device import resolve_device
    from qlora_ray.modeling import load

    cfg = config()
    return load(cfg, resolve_device(cfg, NoCuda), "float32")


@pytest.fixture(scope="module")
def data(loaded):
    from qlora_ray.data import prepare_data

    return prepare_data(config(), loaded.tokenizer)


def train_the_adapter(model, seed: int = 0) -> None:
    """Stand-in for training: every LoRA B matrix non-zero, so the adapter changes outputs."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def reset_the_adapter(model) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()


def lm_head_calls(model) -> tuple[list, object]:
    calls: list = []
    head = ev.causal_lm(model).get_output_embeddings()
    return calls, head.register_forward_hook(lambda mod, args, out: calls.append(tuple(out.shape)))


# ------------------------------------------------------------------------- similarity


def test_self_embedder_measures_before_and_after_with_the_base_model(loaded):
    """Issue 16 item 1: with `embedder: self` the ruler is the model with its adapter off, so
    a trained adapter does not move the similarity of the same text pairs."""
    model, tok = loaded.model, loaded.tokenizer
    embedder = ev.Embedder("self", "cpu")
    try:
        before = embedder(model, tok, TEXTS, 2)
        train_the_adapter(model)
        after = embedder(model, tok, TEXTS, 2)
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
        with model.disable_adapter():  # the seed's definition: mean-pooled last hidden state
            import torch

            batch = tok(TEXTS[:2], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
        np.testing.assert_allclose(before[:2], expected, rtol=1e-4, atol=1e-5)
    finally:
        reset_the_adapter(model)


def test_embedding_runs_no_lm_head_and_keeps_no_hidden_state_stack(loaded):
    calls, hook = lm_head_calls(loaded.model)
    try:
        ev.Embedder("self", "cpu")(loaded.model, loaded.tokenizer, TEXTS, 4)
    finally:
        hook.remove()
    assert calls == []  # no vocabulary-wide logits at all


def test_embedding_reads_as_far_as_the_model_does(loaded):
    """Issue 16 item 8: `max_length=512` was hard-coded; the limit is the model's own."""
    model, tok = loaded.model, loaded.tokenizer
    long_text = " ".join(["Shares of Apex Bank rose 5% on Monday."] * 80)
    n = len(tok(long_text, add_special_tokens=False)["input_ids"])
    assert n > 600
    hf = ev.causal_lm(model)
    saved = hf.config.max_position_embeddings, tok.model_max_length
    try:
        hf.config.max_position_embeddings = tok.model_max_length = 1024
        whole = ev.embed(model, tok, [long_text], 1)
        first_512 = ev.embed(model, tok, [tok.decode(tok(long_text, add_special_tokens=False)["input_ids"][:512])], 1)
        assert not np.allclose(whole, first_512, atol=1e-4)
        hf.config.max_position_embeddings = tok.model_max_length = 64
        assert np.allclose(ev.embed(model, tok, [long_text], 1),
                           ev.embed(model, tok, [tok.decode(tok(long_text, add_special_tokens=False)
                                                            ["input_ids"][:64])], 1), atol=1e-5)
    finally:
        hf.config.max_position_embeddings, tok.model_max_length = saved


# ------------------------------------------------------------------------- generation


def test_generation_ignores_the_checkpoints_generation_settings(loaded, data):
    """Issue 16 item 6: transformers 5 fills unset fields from the model's own
    generation_config; a checkpoint's repetition penalty or suppressed tokens must not
    change a greedy eval."""
    model, tok = loaded.model, loaded.tokenizer
    prompts = data.eval_prompt_ids[:4]
    clean = ev.generate(model, tok, prompts, 6, 4)
    first_tokens = {tok(t, add_special_tokens=False)["input_ids"][0] for t in clean if t}
    hf = ev.causal_lm(model)
    saved = hf.generation_config
    try:
        hf.generation_config = saved.__class__(**saved.to_dict())
        hf.generation_config.repetition_penalty = 3.0
        hf.generation_config.suppress_tokens = sorted(first_tokens)
        hf.generation_config.no_repeat_ngram_size = 1
        assert ev.generate(model, tok, prompts, 6, 4) == clean
    finally:
        hf.generation_config = saved


def test_generation_stops_at_every_stop_token_of_the_model(loaded, data):
    """Issue 16 item 6: the model's generation_config may list several stop tokens (Llama 3:
    `<|eot_id|>` and `<|end_of_text|>`); each one ends an answer, not only the tokenizer's eos."""
    model, tok = loaded.model, loaded.tokenizer
    prompt = data.eval_prompt_ids[:1]
    hf = ev.causal_lm(model)
    other = tok.convert_tokens_to_ids("<|user|>")  # a stop token this model never emits
    saved = tok.eos_token, hf.generation_config.eos_token_id
    try:
        tok.eos_token = "<|user|>"
        free = ev.generate(model, tok, prompt, 6, 1, stop_ids=[other])[0]
        ids = tok(free, add_special_tokens=False)["input_ids"]
        assert len(ids) >= 3, free
        hf.generation_config.eos_token_id = [other, ids[1]]
        stopped = ev.generate(model, tok, prompt, 6, 1)[0]
    finally:
        tok.eos_token, hf.generation_config.eos_token_id = saved
    assert stopped == tok.decode(ids[:2]).strip() != free


def test_generation_computes_logits_for_the_last_position_only(loaded, data):
    calls, hook = lm_head_calls(loaded.model)
    try:
        ev.generate(loaded.model, loaded.tokenizer, data.eval_prompt_ids[:4], 3, 4)
    finally:
        hook.remove()
    assert calls and all(shape[1] == 1 for shape in calls), calls  # (batch, 1, vocab) each step


# -------------------------------------------------------------------------- eval loss


def reference_loss(model, examples) -> float:
    """Per answer token over the whole set, with full logits, one example at a time."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor(ex["labels"][1:])
            logits = ev.causal_lm(model)(input_ids=ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100,
                                                             reduction="sum"))
            count += int((labels != -100).sum())
    return total / count


def test_eval_loss_is_per_token_over_the_set_whatever_the_batch_size(loaded, data):
    """Issue 16 item 8 / issue 9 item 4: not a mean of batch means, and logits only for the
    answer span (left-padded batch, `logits_to_keep`)."""
    model, tok = loaded.model, loaded.tokenizer
    examples = list(data.eval)
    model.eval()
    expected = reference_loss(model, examples)
    calls, hook = lm_head_calls(model)
    try:
        losses = {bs: ev.eval_loss(model, examples, bs, tok.pad_token_id) for bs in (1, 3, 8)}
    finally:
        hook.remove()
    for bs, loss in losses.items():
        assert math.isclose(loss, expected, rel_tol=1e-5), (bs, loss, expected)
    longest_sequence = max(len(ex["input_ids"]) for ex in examples)
    longest_answer = max(sum(t != -100 for t in ex["labels"]) for ex in examples)
    assert all(shape[1] <= longest_answer + 1 < longest_sequence for shape in calls), calls


def test_evaluate_is_unchanged_by_an_autocast_wrapper_on_the_forward(loaded, data):
    """After training on CUDA with bf16/fp16 the model's forward stays wrapped in autocast by
    accelerate (Accelerator.prepare_model: `model.forward = MethodType(autocast_context(
    model_forward_func), model)`, accelerate/accelerator.py); before training it is not.
    The eval must read the same either way, so before and after share one precision."""
    import torch

    model, tok = loaded.model, loaded.tokenizer
    kwargs = {"max_new_tokens": 4, "batch_size": 4, "embedder": ev.Embedder("self", "cpu"), "phase": "after"}
    plain = ev.evaluate(model, tok, data, **kwargs)
    model.forward = MethodType(torch.autocast("cpu", dtype=torch.bfloat16)(type(model).forward), model)
    try:
        wrapped = ev.evaluate(model, tok, data, **kwargs)
    finally:
        del model.forward
    assert wrapped.eval_loss == plain.eval_loss
    assert wrapped.similarity_score == plain.similarity_score
    assert [s["generated"] for s in wrapped.samples] == [s["generated"] for s in plain.samples]


def test_references_are_scored_stripped_like_the_generations(loaded, data):
    """Issue 16 item 8: generations are stripped; a reference's stray whitespace must not
    count against the answer."""
    import dataclasses

    padded = dataclasses.replace(data, eval_references=[f" {r}\n" for r in data.eval_references])
    kwargs = {"max_new_tokens": 2, "batch_size": 4, "embedder": ev.Embedder("self", "cpu"), "phase": "after"}
    a = ev.evaluate(loaded.model, loaded.tokenizer, data, **kwargs)
    b = ev.evaluate(loaded.model, loaded.tokenizer, padded, **kwargs)
    assert a.similarity_score == b.similarity_score
    assert [s["reference"] for s in b.samples] == [s["reference"] for s in a.samples]
