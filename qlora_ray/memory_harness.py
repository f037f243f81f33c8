"""Memory harness: qlora-ray's own train and eval path on the CPU, in live tensor bytes.

    m = measure(model_config, cfg, layers=2)            # one point, in this process
    m = measure_isolated(model_config, cfg, layers=2)   # the same in a fresh interpreter

A random-weight model at the config's real width (no download) goes through the worker's
own code (`modeling.load`, `train.make_trainer`, `evaluate.evaluate`) while `LiveBytes`
counts. docs/memory.md ("Measuring without a GPU") explains what it shows and what not.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qlora_ray.config import ExperimentConfig, from_dict, to_dict
from qlora_ray.live_bytes import LiveBytes

# What a CPU run cannot show, and where the estimator accounts for it (docs/memory.md).
CPU_VS_GPU = {
    "cuda_context": "CUDA context and kernel images (300-600 MiB, driver and card dependent): "
                    "memory.CUDA_CONTEXT_BYTES, outside torch's allocator",
    "allocator": "the caching allocator's block rounding (512 B / 2 MiB segments) and fragmentation "
                 "between reserved and allocated: memory.ALLOCATOR_SLACK as a share of the dynamic peak",
    "workspaces": "cuBLAS/cuBLASLt workspaces (a few MiB per stream and handle) and bitsandbytes' "
                  "kernel scratch: inside CUDA_CONTEXT_BYTES",
    "attention": "the CPU runs SDPA's flash kernel for CPU; CUDA runs FlashAttention or memory-"
                 "efficient attention, which save the same output and log-sum-exp (no seq x seq "
                 "matrix); eager attention materializes seq x seq on both",
    "paged_optimizer": "paged bitsandbytes optimizers keep their state in CUDA unified memory, "
                       "outside max_memory_reserved; counted in full in the prediction",
    "int8_matmul": "8-bit layers train through MatMul8bitFp on the CPU and MatMul8bitLt on CUDA; "
                   "both keep the layer input for backward, CUDA also its int8 copy during forward",
}


@dataclass
class Measurement:
    """One harness point: bytes of live tensors, and what they were at each peak."""

    layers: int
    # Live before training: weights, quantization constants, adapters.
    static_bytes: int
    train_peak_bytes: int
    eval_peak_bytes: int
    # Peak of the forward pass and the loss's backward, up to the final norm's gradient.
    loss_peak_bytes: int
    # Peak of the decoder layers' backward and the optimizer step.
    layer_peak_bytes: int
    # Live when training ends (adapters, gradients if kept, optimizer state).
    after_train_bytes: int
    train_seconds: float
    eval_seconds: float
    # Live bytes at the training peak by (phase, op, dtype, shape), largest first.
    train_top: list[tuple[str, int]] = field(default_factory=list)
    loss_top: list[tuple[str, int]] = field(default_factory=list)
    layer_top: list[tuple[str, int]] = field(default_factory=list)
    eval_top: list[tuple[str, int]] = field(default_factory=list)
    # Attention and matmul ops that ran (which SDPA kernel the CPU used, for instance).
    ops_seen: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# the model and data


def _word_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer: `w12 w7 ...` is exactly one token a word, so prompt lengths
    are exact. Ids stay below the model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(min(vocab_size, 512) - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)


def write_model(model_config: dict[str, Any], layers: int, folder: Path) -> Path:
    """A random-weight model at the config's width with `layers` decoder layers, saved as a
    model folder `modeling.load` can read (bf16 weights, as hub checkpoints ship)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(model_config)
    cfg.pop("architectures", None)
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    text["num_hidden_layers"] = layers
    for key in ("layer_types", "max_window_layers"):
        if isinstance(text.get(key), list):
            text[key] = text[key][:layers]
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    _word_tokenizer(folder, int(text["vocab_size"]))
    del model
    gc.collect()
    return folder


def ensure_model(model_config: dict[str, Any], layers: int, cache: str | Path) -> Path:
    """`write_model` once per (config, layers) under `cache`; later calls reuse the folder."""
    import hashlib

    key = hashlib.sha256(json.dumps([model_config, layers], sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache) / f"{model_config.get('model_type', 'model')}-{layers}-{key}"
    if not (folder / "config.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".writing-", dir=cache))
        write_model(model_config, layers, tmp)
        tmp.rename(folder)
    return folder


def _rows(n: int, length: int, answer: int, vocab: int, seed: int,
          padded: bool = False) -> list[dict[str, list[int]]]:
    """Rows of `length` tokens, the last `answer` of them labelled. `padded`: the last
    quarter of each row is padding (mask 0), as in a batch padded to its longest row, so
    the model gets an attention mask; the tensors are as long either way."""
    import random

    rng = random.Random(seed)
    pad = length // 4 if padded else 0
    rows = []
    for _ in range(n):
        ids = [rng.randrange(4, min(vocab, 512)) for _ in range(length)]
        labels = [-100] * (length - pad - answer) + ids[length - pad - answer: length - pad] + [-100] * pad
        rows.append({"input_ids": ids, "attention_mask": [1] * (length - pad) + [0] * pad, "labels": labels})
    return rows


# ---------------------------------------------------------------------------------------
# one point


def measure(
    model_config: dict[str, Any],
    cfg: ExperimentConfig,
    *,
    layers: int = 2,
    steps: int = 2,
    eval_prompt_tokens: int | None = None,
    eval_rows: int | None = None,
    run_eval: bool = True,
    padded: bool = False,
    model_cache: str | Path | None = None,
) -> Measurement:
    """Train `steps` optimizer steps of `cfg` (batches of full `train.max_seq_len` rows) and
    evaluate once, counting live tensor bytes. `cfg.train.batch_size` must be an integer.

    The weights are counted as every tensor alive in the process when training starts, so
    measure one point per process (`measure_isolated`): libraries keep references to a
    previous point's model.

    Eval: `eval.batch_size` prompts of `eval_prompt_tokens` (default `max_seq_len` minus the
    answer) generating `eval.max_new_tokens`, and the eval loss on `eval_rows` rows (default
    one batch) of `max_seq_len` tokens. With `dataset.packing` each training row is four examples
    packed end to end. `padded`: batches mix long and short rows (so they
    carry an attention mask). `model_cache`: keep the random model folders there and reuse
    them (`ensure_model`); default a temp folder per call.
    """
    import datasets
    import torch

    from qlora_ray import evaluate as ev
    from qlora_ray import modeling
    from qlora_ray import train as training
    from qlora_ray.data import PreparedData, make_collator
    from qlora_ray.device import Device
    from qlora_ray.encoding import pack

    bs = cfg.train.batch_size
    if not isinstance(bs, int):
        raise ValueError("measure needs an integer train.batch_size")
    seq = cfg.train.max_seq_len
    answer = max(1, min(seq // 8, 32))
    compute = "bfloat16" if cfg.quant.compute_dtype in ("float16", "auto") else cfg.quant.compute_dtype
    vocab = int((model_config.get("text_config") or model_config)["vocab_size"])
    tmp = tempfile.TemporaryDirectory(prefix="qlora-ray-harness-")
    try:
        folder = (ensure_model(model_config, layers, model_cache) if model_cache is not None
                  else write_model(model_config, layers, Path(tmp.name) / "model"))
        run_cfg = cfg.replace(**{"model.name": str(folder), "quant.compute_dtype": compute,
                                 "train.max_steps": steps, "train.logging_steps": 1000,
                                 "train.warmup_ratio": 0.0})
        device = Device(kind="cpu", name="cpu", total_memory_bytes=None)  # bf16: yes on the CPU
        loaded = modeling.load(run_cfg, device, compute, by_example=False)  # a GPU's sdpa
        n_train = bs * steps * run_cfg.train.grad_accum
        if cfg.dataset.packing:
            # Four examples to a row, as data.py packs them (positions restart per example);
            # the collator lays a micro-batch of them end to end in one row.
            train_rows = pack(_rows(4 * n_train, seq // 4, max(1, answer // 4), vocab, 0), seq)
        else:
            train_rows = _rows(n_train, seq, answer, vocab, 0, padded)
        train_ds = datasets.Dataset.from_list(train_rows)
        n_eval = eval_rows or cfg.eval.batch_size
        eval_ds = datasets.Dataset.from_list(_rows(n_eval, seq, answer, vocab, 1))
        trainer = training.make_trainer(
            loaded.model, loaded.tokenizer, train_ds, eval_ds,
            make_collator(loaded.tokenizer, run_cfg.train.padding_free),
            run_cfg, device, compute, bs, run_cfg.train.grad_accum, output_dir=str(Path(tmp.name) / "out"),
            autocast=True,
        )
        counter = LiveBytes()
        hooks = _mark_moments(loaded.model, counter)
        static = counter.register_alive()
        with counter.mode():
            counter.mark()
            t0 = time.perf_counter()
            trainer.train()
            train_seconds = time.perf_counter() - t0
            for h in hooks:
                h.remove()
            counter.set_region(None)
            train_peak, train_top = counter.peak, counter.composition_at_peak()
            loss_peak, layer_peak = (counter.region_peaks.get(r, (0, 0))[0] for r in ("loss", "layer"))
            loss_top = counter.composition_at_peak(region="loss")
            layer_top = counter.composition_at_peak(region="layer")
            counter.mark()
            after_train = counter.current
            t0 = time.perf_counter()
            if run_eval:
                prompt_len = eval_prompt_tokens if eval_prompt_tokens is not None else seq - answer
                prompts = [" ".join(f"w{(i * 7 + j) % 500}" for j in range(prompt_len))
                           for i in range(cfg.eval.batch_size)]
                refs = [" ".join(f"w{j}" for j in range(4))] * len(prompts)
                tok = loaded.tokenizer
                data = PreparedData(
                    train=train_ds, eval=eval_ds, eval_prompts=prompts,
                    eval_prompt_ids=tok(prompts, add_special_tokens=False)["input_ids"],
                    eval_references=refs, labels=None, labels_note=None,
                    end_of_answer_ids=[tok.eos_token_id], num_train_tokens=0)
                # Generation, embedding and the eval loss, under the autocast the worker
                # uses on a GPU for this compute dtype.
                ev.evaluate(loaded.model, tok, data, max_new_tokens=cfg.eval.max_new_tokens,
                            batch_size=cfg.eval.batch_size, embedder=ev.Embedder("self", "cpu"),
                            phase="after", autocast_dtype=compute)
            eval_seconds = time.perf_counter() - t0
            eval_peak, eval_top = counter.peak, counter.composition_at_peak()
        del trainer, loaded
        gc.collect()
        return Measurement(layers=layers, static_bytes=static, train_peak_bytes=train_peak,
                           eval_peak_bytes=eval_peak, loss_peak_bytes=loss_peak,
                           layer_peak_bytes=layer_peak, after_train_bytes=after_train,
                           train_seconds=round(train_seconds, 2), eval_seconds=round(eval_seconds, 2),
                           train_top=train_top, loss_top=loss_top, layer_top=layer_top,
                           eval_top=eval_top, ops_seen=sorted(counter.ops))
    finally:
        tmp.cleanup()
        torch.set_grad_enabled(True)


def _mark_moments(model: Any, counter: LiveBytes) -> list[Any]:
    """Split each training step into the estimator's two moments: `loss` from the start of
    the forward pass until the gradient reaches the final norm's input, `layer` from there
    (the decoder layers' backward, then the optimizer step)."""
    import torch

    norm = next((m for name, m in model.named_modules() if name.endswith("model.norm")), None)
    if norm is None:
        raise ValueError("the harness needs a decoder with a final `model.norm`")

    def start_loss(module: Any, args: Any) -> None:
        counter.set_region("loss")

    def watch_norm_input(module: Any, args: Any) -> None:
        hidden = args[0] if args else None
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(lambda grad: counter.set_region("layer"))

    return [model.register_forward_pre_hook(start_loss), norm.register_forward_pre_hook(watch_norm_input)]


def measure_isolated(model_config: dict[str, Any], cfg: ExperimentConfig, timeout: float = 7200,
                     **kwargs: Any) -> Measurement:
    """`measure` in a fresh interpreter (no state or memory carried between points)."""
    payload = json.dumps({"model_config": model_config, "cfg": to_dict(cfg), "kwargs": kwargs})
    proc = subprocess.run([sys.executable, "-m", "qlora_ray.memory_harness"], input=payload,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise RuntimeError(f"harness point failed:\n{proc.stderr[-4000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("train_top", "loss_top", "layer_top", "eval_top"):
        data[key] = [tuple(x) for x in data[key]]
    return Measurement(**data)


def _main() -> None:
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    payload = json.loads(sys.stdin.read())
    cfg = from_dict(ExperimentConfig, payload["cfg"])
    m = measure(payload["model_config"], cfg, **payload["kwargs"])
    print(json.dumps(m.to_json()))


if __name__ == "__main__":
    _main()
