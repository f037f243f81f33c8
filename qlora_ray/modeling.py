"""Base model load (4-bit NF4/FP4, 8-bit, or 16-bit), k-bit preparation, LoRA adapters.

The only module that imports bitsandbytes (through transformers' BitsAndBytesConfig).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

# On AVX512-bf16 CPUs bitsandbytes tries, at import, to fetch an optional kernel from the
# Hugging Face hub and warns in every worker when it cannot; the built-in CPU kernel it
# falls back to is the one we want (nothing is downloaded at run time). Set before peft
# imports bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import torch  # noqa: E402
from peft import LoraConfig as PeftLoraConfig  # noqa: E402
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed  # noqa: E402

from qlora_ray.config import BUILTIN_PREFIX, ExperimentConfig  # noqa: E402
from qlora_ray.device import Device, check_attention  # noqa: E402

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class LoadedModel:
    model: PeftModel
    tokenizer: Any
    path: str  # local path or hub id actually loaded
    trainable_params: int
    total_params: int  # with 4-bit packing undone


def resolve_model_path(name: str) -> str:
    if name.startswith(BUILTIN_PREFIX):
        from qlora_ray.builtin import ensure_builtin

        return str(ensure_builtin(name))
    return name


def quantization_config(cfg: ExperimentConfig, compute_dtype: str) -> BitsAndBytesConfig | None:
    q = cfg.quant
    if q.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=DTYPES[compute_dtype],
        )
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None  # 16-bit: the plain LoRA baseline


def by_example_attention(cfg: ExperimentConfig, device: Device, loaded_with: str | None) -> bool:
    """Whether a cell runs sdpa one example at a time (qlora_ray.attention): packed or
    padding-free rows on the CPU, on a model transformers loaded with sdpa (not eager: a
    Gemma-2 soft-caps its attention logits, which sdpa cannot)."""
    one_row = cfg.dataset.packing or cfg.train.padding_free
    return one_row and device.kind == "cpu" and loaded_with == "sdpa"


def load_tokenizer(cfg: ExperimentConfig, path: str) -> Any:
    tok = AutoTokenizer.from_pretrained(
        path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    if tok.pad_token is None:
        # Llama-family tokenizers ship without a pad token; eos is the usual stand-in and is
        # masked out of the loss by the collator.
        tok.pad_token = tok.eos_token
    return tok


def load(cfg: ExperimentConfig, device: Device, compute_dtype: str, tokenizer: Any = None,
         by_example: bool = True) -> LoadedModel:
    """Quantized base model on exactly one device + LoRA adapters (+ the tokenizer, unless given).

    `by_example`: a packed or padding-free cell on the CPU with sdpa attention runs it one
    example at a time (qlora_ray.attention); the memory harness turns this off, since it
    measures on the CPU the step a GPU's sdpa runs.
    """
    check_attention(
        cfg.model.attn_implementation, device, importlib.util.find_spec("flash_attn") is not None
    )
    path = resolve_model_path(cfg.model.name)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg, path)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        quantization_config=quantization_config(cfg, compute_dtype),
        dtype=DTYPES[compute_dtype],
        device_map=device.device_map,
        # Safetensors only (no unpickling) unless the spec allows the .bin fallback.
        use_safetensors=True if cfg.model.use_safetensors else None,
        # `auto`: None lets transformers pick (sdpa where the class supports it, else eager).
        attn_implementation=None if (attn := cfg.model.attn_implementation) == "auto" else attn,
    )
    if by_example and by_example_attention(cfg, device, model.config._attn_implementation):
        from qlora_ray import attention

        # transformers keeps the current kernel (with a warning) for a class that does not
        # dispatch through its AttentionInterface.
        model.set_attn_implementation(attention.register())
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    _keep_4bit_layers_trainable(model)
    if cfg.quant.bits in (4, 8):
        # Casts norms/embeddings to fp32 for stable training and wires up checkpointing
        # (with input grads enabled, which checkpointing a frozen base model needs).
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.train.gradient_checkpointing
        )
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()

    # The adapters' A matrices are drawn here, before the Trainer seeds anything: seed now,
    # or two runs of one cell start from different adapters.
    set_seed(cfg.train.seed)
    lora = cfg.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    peft_model = get_peft_model(
        model,
        PeftLoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            bias=lora.bias,
            use_rslora=lora.use_rslora,
            use_dora=lora.use_dora,
            task_type="CAUSAL_LM",
        ),
    )
    # PEFT counts a packed 4-bit weight (two values per byte) as the weights it stands for.
    trainable, total = peft_model.get_nb_trainable_parameters()
    return LoadedModel(peft_model, tokenizer, path, int(trainable), int(total))


def _keep_4bit_layers_trainable(model: Any) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference during our eval passes.

    On CPUs with AVX512-bf16, a Linear4bit that runs in eval mode without grad (our
    before-training evaluation) permanently converts its weight to a CPU inference layout
    (dropping double quantization, switching to bf16) and from then on multiplies through a
    kernel with no autograd support, so training afterwards gets silently wrong gradients
    through every frozen base layer (torch warns "an autograd kernel was not registered").
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def paged_optimizer_bytes() -> int:
    """Bytes of paged optimizer state bitsandbytes has allocated in this process.

    Paged optimizers keep each state tensor of >= 1e5 elements in cudaMallocManaged memory
    (bitsandbytes/optim/optimizer.py get_state_buffer), outside PyTorch's caching allocator,
    and list it in GlobalPageManager.paged_tensors. Nothing ever frees it: the buffers wrap a
    raw pointer, and the list keeps them alive for the life of the process. So this only
    grows, and an OOM back-off that retries in the same process would carry the failed
    attempt's state along (the worker retries in a fresh process instead).
    """
    import bitsandbytes.functional as F

    return sum(int(t.nbytes) for t in F.GlobalPageManager.get_instance().paged_tensors)


def nf4_matmul_error(device: str = "cpu") -> tuple[float, float]:
    """Run one tiny NF4 layer on `device` (what `qlora-ray doctor` checks bitsandbytes with).

    Returns (kernel error, quantization error), both relative to the output's scale: the
    layer's output against a plain matmul with its own dequantized weights (0 when the
    4-bit kernel is right), and against the float weights it was quantized from (NF4's
    rounding: a few percent).
    """
    import bitsandbytes as bnb

    gen = torch.Generator().manual_seed(0)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type="nf4")
    with torch.no_grad():
        layer.weight.data.copy_(torch.randn(64, 64, generator=gen) / 8)
    original = layer.weight.data.clone()
    layer = layer.to(device)  # quantizes the weights
    x = torch.randn(4, 64, generator=gen).to(device=device, dtype=dtype)
    with torch.no_grad():
        y = layer(x).float()
        dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        exact = x.float() @ dequantized.float().t()
        unquantized = x.float() @ original.to(device).float().t()
    scale = float(unquantized.abs().max())
    return float((y - exact).abs().max()) / scale, float((y - unquantized).abs().max()) / scale
