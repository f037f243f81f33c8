"""Predicted peak GPU memory of one experiment, from the model's `config.json` alone.

Pure arithmetic: no torch, no weights. The model is the one `modeling.py` and `train.py`
build (see `Recipe`), and each term is a count of tensors that are alive at the peak of a
training step (the start of backward), or of the evaluation pass when that is larger.
The method, the calibration against published measurements and where it is deliberately
conservative are in docs/memory.md.

Every sequence is taken to be padded to `train.max_seq_len` (the worst batch a run can
draw; with packing it is every batch), so predictions are upper bounds for short data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from qlora_ray.config import ExperimentConfig, problem
from qlora_ray.modelcheck import effective_attention
from qlora_ray.profiles import GpuProfile, resolve_compute_dtype

MiB = 1024**2
GiB = 1024**3

# bitsandbytes NF4/FP4: two 4-bit codes per byte, one absmax per block of 64 weights. The
# absmax is fp32 (4 bytes) or, with double quantization, an 8-bit code plus one fp32
# constant per 256 absmax values (QLoRA paper, section 3: 0.5 -> 0.127 bit per weight).
NF4_BLOCK = 64
DQ_BLOCK = 256
# CUDA context, cuBLAS workspace and bitsandbytes' kernels: a context alone is 300-500 MiB
# on recent drivers; we round up to cover the workspaces.
RUNTIME_OVERHEAD_BYTES = 600 * MiB
# Bytes of optimizer state per trainable parameter (two moments; bitsandbytes' 8-bit
# optimizers keep them as 8-bit codes, their per-block scales are ~1% and ignored).
OPTIMIZER_STATE_BYTES = {
    "adamw_torch": 8,
    "paged_adamw_32bit": 8,
    "paged_adamw_8bit": 2,
    "adamw_bnb_8bit": 2,
}
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
# Model types whose config class ties lm_head to the input embeddings when config.json
# does not say (transformers' own defaults).
TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text", "gpt2"}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
GATED_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    """How the training code lays the model out; the defaults are qlora-ray's own.

    Published measurements come from other scripts, so the calibration describes each of
    them with its own Recipe (docs/memory.md says which and why).
    """

    kbit_upcast: bool = True
    """4/8-bit: `prepare_model_for_kbit_training` casts every 16-bit parameter that is not
    packed 4-bit or int8 (embeddings, lm_head, norms) to fp32, and the residual stream that
    flows from the fp32 embeddings stays fp32."""
    upcast_16bit_model: bool = False
    """16-bit: also run k-bit preparation on the unquantized model, which makes the whole
    model fp32 (qlora-ray does not; FinLoRA's script did)."""
    adapter_bytes: int = 4
    """LoRA weights' width: PEFT keeps adapters in fp32 (`autocast_adapter_dtype`); the
    QLoRA paper's script cast them to bf16 (2)."""
    unquantized_bytes: int | None = None
    """Override the width of embeddings/lm_head/norms (the QLoRA script casts embeddings back
    to bf16 after k-bit preparation); None follows kbit_upcast."""
    autocast_lm_head_copy: bool = True
    """Under autocast an fp32 lm_head is cast to 16-bit for the matmul and that copy is saved
    for backward (vocab x hidden x 2 bytes: 1 GiB for Llama-3's 128k vocabulary)."""
    count_eval: bool = True
    """Also size the eval-loss forward pass (eval.batch_size x max_seq_len logits)."""


DEFAULT_RECIPE = Recipe()


@dataclass(frozen=True)
class Architecture:
    """The numbers of a decoder-only transformer that memory depends on."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    experts: int = 1
    experts_per_token: int = 1
    qkv_bias: bool = False
    # name -> (in_features, out_features, copies per layer) for every Linear in a layer
    linears: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder layers' Linear modules: what bitsandbytes quantizes."""
        return self.layers * sum(i * o * n for i, o, n in self.linears.values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def other_params(self) -> int:
        """Norms (two per layer plus the final one) and attention biases."""
        bias = self.layers * (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return (2 * self.layers + 1) * self.hidden + bias

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embedding_params + self.other_params

    @property
    def largest_linear(self) -> int:
        return max(i * o for i, o, _ in self.linears.values())


def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def architecture(config: dict[str, Any], model: str = "model") -> Architecture:
    """Read the memory-relevant numbers out of a Hugging Face `config.json` dict.

    Llama-like layouts (Llama, Mistral, Qwen2/3, Gemma, Mixtral-style MoE) are read by
    name; Phi-3's fused `qkv_proj` / `gate_up_proj` too. Raises ConfigError naming the key
    that is missing.
    """
    from qlora_ray.config import ConfigError

    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    model_type = str(cfg.get("model_type") or config.get("model_type") or "llama")
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(cfg, "num_attention_heads", "n_head")
    vocab = _first(cfg, "vocab_size")
    missing = [k for k, v in (("hidden_size", hidden), ("num_hidden_layers", layers),
                              ("num_attention_heads", heads), ("vocab_size", vocab)) if v is None]
    if missing:
        raise ConfigError([
            problem(f"{model} config.json", sorted(cfg)[:12], f"has no {', '.join(missing)}",
                    "point model.name at a decoder-only transformer's config.json")
        ])
    kv_heads = int(_first(cfg, "num_key_value_heads", default=heads))
    head_dim = int(_first(cfg, "head_dim", default=hidden // heads))
    intermediate = int(_first(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden))
    experts = int(_first(cfg, "num_local_experts", "num_experts", default=1))
    if experts > 1:
        intermediate = int(_first(cfg, "moe_intermediate_size", default=intermediate))
    per_token = int(_first(cfg, "num_experts_per_tok", default=1)) if experts > 1 else 1
    tied = cfg.get("tie_word_embeddings", config.get("tie_word_embeddings"))
    if tied is None:
        tied = model_type in TIED_BY_DEFAULT
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    if model_type.startswith("phi3"):
        linears = {"qkv_proj": (hidden, q_out + 2 * kv_out, 1), "o_proj": (q_out, hidden, 1),
                   "gate_up_proj": (hidden, 2 * intermediate, 1),
                   "down_proj": (intermediate, hidden, 1)}
    else:
        linears = {"q_proj": (hidden, q_out, 1), "k_proj": (hidden, kv_out, 1),
                   "v_proj": (hidden, kv_out, 1), "o_proj": (q_out, hidden, 1),
                   "gate_proj": (hidden, intermediate, experts),
                   "up_proj": (hidden, intermediate, experts),
                   "down_proj": (intermediate, hidden, experts)}
    return Architecture(
        model_type=model_type, hidden=int(hidden), layers=int(layers), heads=int(heads),
        kv_heads=kv_heads, head_dim=head_dim, intermediate=intermediate, vocab=int(vocab),
        tied_embeddings=bool(tied), experts=experts, experts_per_token=per_token,
        qkv_bias=bool(cfg.get("attention_bias") or model_type.startswith("qwen2")),
        linears=linears,
    )


@dataclass(frozen=True)
class Estimate:
    """Predicted peak bytes of one cell and what they are made of (the parts sum to it)."""

    peak_bytes: int
    breakdown: dict[str, int]
    problems: tuple[str, ...] = ()

    @property
    def allocated_bytes(self) -> int:
        """The part `torch.cuda.max_memory_allocated()` sees (no CUDA context)."""
        return self.peak_bytes - self.breakdown.get("runtime_overhead", 0)


def adapted_modules(arch: Architecture, targets: tuple[str, ...] | str) -> tuple[list[str], list[str]]:
    """(module names of a layer that get adapters, target names the model does not have)."""
    if targets == "all-linear":
        return list(arch.linears), []
    wanted = [t.rsplit(".", 1)[-1] for t in targets]
    return [m for m in arch.linears if m in wanted], [t for t in wanted if t not in arch.linears]


def estimate(
    model_config: dict[str, Any] | Architecture,
    cfg: ExperimentConfig,
    profile: GpuProfile | None = None,
    *,
    batch_size: int | None = None,
    recipe: Recipe = DEFAULT_RECIPE,
) -> Estimate:
    """Predicted peak memory of training (and evaluating) `cfg` on `profile`.

    `batch_size` overrides `cfg.train.batch_size` (needed when that is `auto`).
    """
    arch = model_config if isinstance(model_config, Architecture) else architecture(
        model_config, cfg.model.name)
    bs = batch_size if batch_size is not None else cfg.train.batch_size
    if not isinstance(bs, int):
        raise ValueError("train.batch_size is `auto`: pass the batch_size to estimate")
    static, per_sample, fixed_dynamic, eval_dynamic, problems = _terms(arch, cfg, profile, recipe)
    return _assemble(static, per_sample, fixed_dynamic, eval_dynamic, bs, problems)


def largest_batch(
    model_config: dict[str, Any] | Architecture,
    cfg: ExperimentConfig,
    profile: GpuProfile,
    budget_bytes: int,
    *,
    limit: int = 1024,
    eval_batch_size: int | None = None,
    recipe: Recipe = DEFAULT_RECIPE,
) -> int:
    """The largest micro-batch whose predicted peak is within `budget_bytes`; 0 if none.

    `eval_batch_size` overrides `cfg.eval.batch_size` (to ask "would a smaller one do?").
    """
    arch = model_config if isinstance(model_config, Architecture) else architecture(
        model_config, cfg.model.name)
    static, per_sample, fixed_dynamic, eval_dynamic, _ = _terms(
        arch, cfg, profile, recipe, eval_batch_size)
    # Peak is static + max(train(b), eval) with train linear in b: solve, then check.
    room = budget_bytes - sum(static.values())
    fixed, per = sum(fixed_dynamic.values()), sum(per_sample.values())
    if room < eval_dynamic or room < fixed + per:
        return 0
    return int(min(limit, (room - fixed) // per))


# ---------------------------------------------------------------------------------------


def _terms(
    arch: Architecture, cfg: ExperimentConfig, profile: GpuProfile | None, recipe: Recipe,
    eval_batch_size: int | None = None,
) -> tuple[dict[str, int], dict[str, int], dict[str, int], int, list[str]]:
    """Static bytes by part, per-sample training bytes by part, batch-independent dynamic
    bytes by part, and the eval pass's dynamic bytes."""
    q, lora, train = cfg.quant, cfg.lora, cfg.train
    problems: list[str] = []
    compute = resolve_compute_dtype(q.compute_dtype, profile)
    cb = DTYPE_BYTES[compute]
    kbit = q.bits in (4, 8)
    upcast = (kbit and recipe.kbit_upcast) or (q.bits == 16 and recipe.upcast_16bit_model)

    # Frozen base weights.
    n_linear = arch.linear_params
    if q.bits == 4:
        constants = 1 / NF4_BLOCK + 4 / (NF4_BLOCK * DQ_BLOCK) if q.double_quant else 4 / NF4_BLOCK
        base = n_linear * (0.5 + constants)
    elif q.bits == 8:
        # int8 codes plus one fp32 scale per output row (LLM.int8's SCB).
        base = n_linear + arch.layers * sum(o * n for _, o, n in arch.linears.values()) * 4
    else:
        base = n_linear * (4 if upcast else cb)
    unq_bytes = recipe.unquantized_bytes or (4 if upcast else cb)
    unquantized = (arch.embedding_params + arch.other_params) * unq_bytes

    # Adapters, their gradients and optimizer state.
    modules, unknown = adapted_modules(arch, lora.target_modules)
    if unknown:
        problems.append(problem("lora.target_modules", unknown, f"names modules {arch.model_type} "
                                "does not have", f"use some of {', '.join(arch.linears)} or all-linear"))
    lora_params = arch.layers * sum(
        lora.r * (i + o) * n + (o * n if lora.use_dora else 0)
        for name, (i, o, n) in arch.linears.items() if name in modules
    )
    optim_bytes = OPTIMIZER_STATE_BYTES[train.optim]
    static = {
        "base_weights": int(base),
        "unquantized_weights": int(unquantized),
        "lora_weights": lora_params * recipe.adapter_bytes,
        "lora_gradients": lora_params * recipe.adapter_bytes,
        "optimizer_states": lora_params * optim_bytes,
        # bitsandbytes dequantizes a weight to the compute dtype for each 4/8-bit matmul
        # (forward, and the input gradient in backward): room for the largest one.
        "dequant_buffer": arch.largest_linear * cb if kbit else 0,
        "runtime_overhead": RUNTIME_OVERHEAD_BYTES if profile is None or profile.is_gpu else 0,
    }

    # Activations, per token. `ab` is the width of the tensors a layer saves: the residual
    # stream has the embeddings' dtype (fp32 after k-bit preparation); autocast only narrows
    # the matmuls' inputs, and bitsandbytes casts its outputs back to the input dtype.
    ab = max(unq_bytes, cb)
    s = train.max_seq_len
    h, kv = arch.hidden, arch.kv_heads * arch.head_dim
    qd = arch.heads * arch.head_dim
    inter = arch.intermediate * arch.experts_per_token
    eager = effective_attention(cfg.model.attn_implementation, arch.model_type) == "eager"
    # What one layer saves for backward: the normed inputs, q/k/v before and after RoPE,
    # the attention output, the MLP's gate/up/act/product, and RMSNorm's fp32 internals.
    layer_elems = 3 * h + 2 * qd + 4 * kv + 4 * inter
    layer_bytes = layer_elems * ab + 2 * 2 * h * 4
    if eager:
        # Eager attention materializes heads x seq scores per token (fp32 softmax + copy).
        layer_bytes += arch.heads * s * (4 + cb)
    if lora.dropout > 0:
        # PEFT applies dropout per adapted module: the dropped input and its mask.
        layer_bytes += sum(i * n * (ab + 1) for name, (i, _, n) in arch.linears.items()
                           if name in modules)
    if train.gradient_checkpointing:
        # Saved: every layer's input. Live in backward: one recomputed layer plus the
        # gradients flowing through it (about its widest tensors twice).
        act = arch.layers * h * ab + layer_bytes + 2 * (inter + h) * ab
    else:
        act = arch.layers * layer_bytes + 2 * (inter + h) * ab
    # Logits: the loss upcasts them to fp32 and log-softmax saves its fp32 output; the peak
    # is log-softmax's backward, with that output, its incoming and its outgoing gradient.
    logits = arch.vocab * 12
    per_sample = {"activations": act * s, "logits": logits * s}
    lm_head_fp32 = unq_bytes == 4 and cb == 2
    fixed_dynamic = {
        "lm_head_copy": arch.vocab * h * cb if recipe.autocast_lm_head_copy and lm_head_fp32 else 0,
    }

    # Evaluation (eval loss and the self-embedder) runs forward only, eval.batch_size rows at
    # a time: the logits in the compute dtype and fp32, one layer's transient tensors, and
    # every layer's hidden state (the embedder asks for output_hidden_states).
    eval_dynamic = 0
    if recipe.count_eval:
        per_eval_token = arch.vocab * (cb + 4 + 4) + (arch.layers + 1) * h * ab + layer_bytes
        eval_rows = cfg.eval.batch_size if eval_batch_size is None else eval_batch_size
        eval_dynamic = eval_rows * s * per_eval_token + fixed_dynamic["lm_head_copy"]
    return static, per_sample, fixed_dynamic, eval_dynamic, problems


def _assemble(
    static: dict[str, int], per_sample: dict[str, int], fixed_dynamic: dict[str, int],
    eval_dynamic: int, bs: int, problems: list[str],
) -> Estimate:
    breakdown = dict(static)
    for key, value in per_sample.items():
        breakdown[key] = value * bs
    breakdown.update(fixed_dynamic)
    train_dynamic = sum(per_sample.values()) * bs + sum(fixed_dynamic.values())
    # The breakdown describes the training step; when the eval pass peaks higher, the
    # difference is its own line so the parts still add up to the peak.
    breakdown["eval_extra"] = max(0, eval_dynamic - train_dynamic)
    return Estimate(peak_bytes=sum(breakdown.values()), breakdown=breakdown, problems=tuple(problems))


def gib(n: int | float | None) -> float:
    return math.nan if n is None else n / GiB
