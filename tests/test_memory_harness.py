"""The memory harness: exact live tensor bytes of the real training and eval path on the CPU."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from qlora_ray.config import ExperimentConfig, from_dict, set_dotted  # noqa: E402
from qlora_ray.live_bytes import LiveBytes  # noqa: E402
from qlora_ray.memory_harness import measure_isolated  # noqa: E402

MiB = 2**20


def test_each_storage_is_counted_once_until_it_is_freed() -> None:
    counter = LiveBytes()
    with counter.mode():
        counter.mark()
        a = torch.zeros(1024, 256)  # 1 MiB
        view = a.view(-1)  # same storage: no new bytes
        b = a + 1  # 1 MiB
        assert counter.current == 2 * MiB
        del b
        assert counter.current == MiB
        a.mul_(2)  # in place: the storage it already knows
        c = torch.ones(512, 256)  # 0.5 MiB, while b is gone: the peak stays 2 MiB
        assert counter.peak == 2 * MiB
        del view, c
    del a
    assert counter.current == 0


def test_the_peak_of_a_backward_pass_and_what_made_it() -> None:
    x = torch.randn(256, 512)
    w = torch.randn(512, 1024, requires_grad=True)
    counter = LiveBytes()
    counter.register_alive()
    start = counter.current
    with counter.mode():
        counter.mark()
        h = x @ w  # 1 MiB, kept by relu for backward
        y = torch.relu(h).sum()
        y.backward()
    # relu keeps its output (1 MiB); backward adds the incoming gradient (1 MiB) and w's
    # gradient (2 MiB) while both are still alive (plus the loss and its gradient, 4 bytes each).
    assert counter.peak - start == 4 * MiB + 8
    top = dict(counter.composition_at_peak())
    assert top["bwd mm float32 [512, 1024]"] == 2 * MiB


def tiny_cell(**dotted: object) -> ExperimentConfig:
    data: dict = {"model": {"name": "x"}}
    base = {"quant.compute_dtype": "bfloat16", "lora.r": 8, "train.batch_size": 2,
            "train.max_seq_len": 64, "eval.batch_size": 2, "eval.max_new_tokens": 4}
    for key, value in {**base, **dotted}.items():
        set_dotted(data, key, value)
    return from_dict(ExperimentConfig, data)


TINY = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1024, "num_hidden_layers": 2,
        "tie_word_embeddings": False}


@pytest.mark.slow
def test_the_harness_runs_the_real_4bit_step(tmp_path) -> None:
    m = measure_isolated(TINY, tiny_cell(), layers=1, model_cache=str(tmp_path))
    # Before training: the fp32 embeddings and lm_head and norms (k-bit preparation upcasts
    # them), the layer's Linear weights as bitsandbytes stores them in NF4 with double
    # quantization (half a byte a weight, an 8-bit absmax per 64 of them and an fp32 one per
    # 256 of those, a 256-entry fp32 code table per module), and the fp32 LoRA adapters.
    n = 256 * 256 + 2 * 256 * 128 + 256 * 256 + 3 * 256 * 512
    nf4 = n / 2 + n / 64 + 4 * n / (64 * 256) + 7 * 256 * 4
    lora = 8 * ((256 + 256) + 2 * (256 + 128) + (256 + 256)) * 4
    unquantized = (2 * 1024 * 256 + 3 * 256) * 4
    assert m.static_bytes == pytest.approx(unquantized + nf4 + lora, rel=0.01)
    # Training ran with the optimizer state alive, above the weights.
    assert m.train_peak_bytes > m.after_train_bytes > m.static_bytes
    # The peak is the checkpointed layer's backward: the MLP's fp32 gradients (d act, d up:
    # tokens x intermediate x 4 bytes each) are alive in it.
    assert ("bwd mul float32 [2, 64, 512]", 2 * 128 * 512 * 4) in m.train_top
    assert "gemm_4bit" in m.ops_seen and "dequantize_4bit" in m.ops_seen
    assert m.eval_peak_bytes > m.static_bytes
