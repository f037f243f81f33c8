"""Predicted training throughput of one experiment on one GPU profile, before it runs.

Pure arithmetic over the same `Architecture` the memory planner reads from config.json: no
torch, no weights. One micro-batch of `batch_size` sequences padded to `seq_len` costs

    FLOPs     every matmul of a LoRA/QLoRA step: forward through the frozen weights, the
              recomputed forward under gradient checkpointing, backward for the input
              gradients only (frozen weights get none), the adapters' forward and both
              their gradients, attention scores, the lm_head
    bytes     memory traffic that does not hide behind the matmuls: RMSNorm's fp32
              internals, rotary embeddings, activations and residual adds, casts between
              the fp32 residual stream of a k-bit model and the 16-bit matmuls, the LoRA
              branch (dropout, fp32 adapters), the loss over the vocabulary, and
              bitsandbytes' dequantization of every 4/8-bit weight once per pass
    ops       kernels launched (GPU) or operators dispatched (CPU): what a tiny model pays

and takes

    device = max(FLOPs / peak, weight reads / bandwidth) + bytes / bandwidth
    time   = max(device, ops x op_seconds) / efficiency      (GPU: the host runs ahead)
    time   = (device + ops x op_seconds) / efficiency        (CPU: one thread does both)

`peak` and `bandwidth` are the card's datasheet numbers (`GpuProfile`); `efficiency` is the
one free parameter, fitted on published measurements with full settings (docs/time.md,
`benchmarks/throughput_points.py`) and refitted per model and GPU type by `qlora-ray
calibrate` from measured rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qlora_ray.architecture import Architecture, adapted_modules
from qlora_ray.config import ExperimentConfig
from qlora_ray.memory_terms import DEFAULT_RECIPE, DTYPE_BYTES, Recipe
from qlora_ray.profiles import GpuProfile, resolve_compute_dtype

# The efficiency factor before any calibration: the geometric mean of the published GPU
# points' own factors (benchmarks/throughput_points.py prints them; docs/time.md).
DEFAULT_GPU_EFFICIENCY = 0.70
# The CPU profile's datasheet numbers are nominal (`profiles.py`); this factor is fitted on
# this project's own quickstart runs (docs/time.md) and is what `calibrate` replaces.
DEFAULT_CPU_EFFICIENCY = 1.0

# Host-side cost of one eager PyTorch op on a GPU machine: the Python dispatcher, autograd
# bookkeeping and the CUDA launch (~5-10 us each on a recent x86 host).
GPU_OP_SECONDS = 10e-6

# Operators one Llama decoder layer dispatches in a forward pass besides its matmuls (as
# transformers runs it in eager mode): 2 RMSNorms (~8 each: cast, pow, mean, add, rsqrt,
# mul, cast, weight), views and transposes, rotary embeddings on q and k, repeat_kv,
# attention, two residual adds, the gated activation.
OPS_PER_LAYER = 56
# Ops per Linear: one matmul in 16 bits; bitsandbytes dequantizes, multiplies and casts.
OPS_PER_LINEAR = {16: 1, 8: 4, 4: 3}
# The LoRA branch per adapted module: input cast to the adapters' dtype, dropout, A, B,
# scaling and the add into the base output.
OPS_PER_ADAPTER = 6
# Autograd runs roughly two kernels per differentiable forward op.
BACKWARD_OPS = 2.0
# Per optimizer step: gradient clipping (a norm per tensor), the optimizer's update, zeroing,
# per trainable tensor; plus the Trainer's own per-step work (scheduler, callbacks, logging,
# collating the batch), counted as op-equivalents.
OPS_PER_TRAINABLE_TENSOR = 4
OPS_PER_STEP = 200
# Bytes a fused AdamW-style update moves per trainable parameter: the fp32 weight and
# gradient read and written, plus the two moments (read and written) at the state width.
OPTIMIZER_BYTES_PER_STATE_BYTE = 2


@dataclass(frozen=True)
class Work:
    """What a piece of training or evaluation costs the device and the host."""

    flops: float = 0.0
    # Weights the matmuls read: hidden behind the FLOPs unless the batch is small.
    weight_bytes: float = 0.0
    # Other memory traffic (elementwise ops, casts, dequantization).
    bytes: float = 0.0
    ops: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.weight_bytes + other.weight_bytes,
                    self.bytes + other.bytes, self.ops + other.ops)

    def __mul__(self, k: float) -> Work:
        return Work(self.flops * k, self.weight_bytes * k, self.bytes * k, self.ops * k)

    __rmul__ = __mul__


@dataclass(frozen=True)
class Hardware:
    """The numbers of a profile the time model uses, in base units."""

    flops_per_second: float
    bytes_per_second: float
    op_seconds: float
    # GPU: the host queues kernels ahead of the device, so the slower of the two counts.
    asynchronous: bool


def hardware(profile: GpuProfile | None, compute_dtype: str) -> Hardware | None:
    """Peak throughput of `profile` for `compute_dtype`; None when the profile lacks numbers."""
    if profile is None or profile.peak_tflops is None or profile.memory_bandwidth_gbs is None:
        return None
    tflops = profile.peak_tflops
    if compute_dtype == "float32":
        # PyTorch runs fp32 matmuls without TF32 by default: the card's plain fp32 rate.
        tflops = profile.peak_fp32_tflops or profile.peak_tflops / 8
    op_seconds = profile.op_overhead_us * 1e-6 if profile.op_overhead_us else GPU_OP_SECONDS
    return Hardware(tflops * 1e12, profile.memory_bandwidth_gbs * 1e9, op_seconds, profile.is_gpu)


def seconds(work: Work, hw: Hardware, efficiency: float) -> float:
    """Wall time of `work` on `hw` at `efficiency` (see the module docstring)."""
    device = max(work.flops / hw.flops_per_second, work.weight_bytes / hw.bytes_per_second)
    device += work.bytes / hw.bytes_per_second
    host = work.ops * hw.op_seconds
    ideal = max(device, host) if hw.asynchronous else device + host
    return ideal / efficiency


def default_efficiency(profile: GpuProfile | None) -> float:
    return DEFAULT_GPU_EFFICIENCY if profile is not None and profile.is_gpu else DEFAULT_CPU_EFFICIENCY


# ---------------------------------------------------------------------------------------
# what one micro-batch costs


@dataclass(frozen=True)
class _Shape:
    """The per-token quantities of one cell that every pass needs."""

    linear_params: float  # active per token (MoE: the routed experts only)
    linear_dims: float  # sum of in + out over every Linear of every layer
    lm_head: float
    lora_params: float  # r x (in + out) summed over adapted modules and layers
    lora_in: float  # sum of in-features of adapted modules, all layers
    lora_out: float
    n_linear: int  # Linear modules per layer
    n_adapted: int  # adapted modules per layer
    cb: int  # compute dtype width
    ab: int  # residual stream width (fp32 after k-bit preparation)
    wbits: int  # 4, 8 or 16


def shape(arch: Architecture, cfg: ExperimentConfig, profile: GpuProfile | None,
          recipe: Recipe = DEFAULT_RECIPE) -> _Shape:
    compute = resolve_compute_dtype(cfg.quant.compute_dtype, profile)
    cb = DTYPE_BYTES[compute]
    kbit = cfg.quant.bits in (4, 8)
    # k-bit preparation upcasts embeddings and norms to fp32 (memory.Recipe.kbit_upcast), and
    # the residual stream that flows from the fp32 embeddings stays fp32.
    ab = 4 if (kbit and recipe.kbit_upcast) or recipe.upcast_16bit_model else cb
    modules, _ = adapted_modules(arch, cfg.lora.target_modules)
    active = {name: (i, o, n if n == 1 else arch.experts_per_token)
              for name, (i, o, n) in arch.linears.items()}
    L = arch.layers
    return _Shape(
        linear_params=L * sum(i * o * n for i, o, n in active.values()),
        linear_dims=L * sum((i + o) * n for i, o, n in active.values()),
        lm_head=arch.vocab * arch.hidden,
        lora_params=L * sum(cfg.lora.r * (i + o) * n for m, (i, o, n) in active.items() if m in modules),
        lora_in=L * sum(i * n for m, (i, o, n) in active.items() if m in modules),
        lora_out=L * sum(o * n for m, (i, o, n) in active.items() if m in modules),
        n_linear=len(arch.linears), n_adapted=len(modules), cb=cb, ab=ab, wbits=cfg.quant.bits,
    )


def _layer_bytes(arch: Architecture, sh: _Shape, cfg: ExperimentConfig, context: float) -> float:
    """Elementwise memory traffic of one forward pass through every layer, per token."""
    h, L = arch.hidden, arch.layers
    qd, kvd = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    inter = arch.intermediate * arch.experts_per_token
    cb, ab = sh.cb, sh.ab
    per_layer = (
        2 * 7 * h * 4  # two RMSNorms, computed in fp32: ~7 reads/writes of h floats each
        + 8 * (qd + kvd) * cb  # rotary on q and k: rotate_half, two products, a sum
        + 2 * (qd + 2 * kvd) * cb + 2 * qd * cb  # transposes in and out of attention
        + 2 * 3 * h * ab  # two residual adds at the stream's width
        + 5 * inter * cb  # act(gate) * up
    )
    if cfg.model.attn_implementation != "flash_attention_2" and arch.kv_heads != arch.heads:
        per_layer += 4 * qd * cb  # repeat_kv materializes k and v at every head
    if cfg.model.attn_implementation == "eager":
        # Eager attention writes the scores, upcasts them for an fp32 softmax and casts back.
        per_layer += arch.heads * context * (4 * cb + 16)
    stream = L * per_layer
    if ab != cb:
        # Autocast casts each Linear's fp32 input to 16 bits; bitsandbytes casts its output
        # back to the input's dtype (fp32): read 4 + write 2 bytes in, write 4 + read 2 out.
        stream += 6 * sh.linear_dims
    # The LoRA branch: the input cast to the fp32 adapters, dropout (input and mask), and the
    # fp32 output scaled and added to the base output.
    dropout = (2 * ab + 1) if cfg.lora.dropout > 0 else 0
    stream += (6 + dropout) * sh.lora_in + 5 * 4 * sh.lora_out
    return stream


def train_microbatch(
    arch: Architecture, cfg: ExperimentConfig, profile: GpuProfile | None, *,
    batch_size: int, seq_len: float, recipe: Recipe = DEFAULT_RECIPE, sh: _Shape | None = None,
) -> Work:
    """Forward and backward of one micro-batch of `batch_size` sequences of `seq_len` tokens.

    `recipe` describes the training code (memory.Recipe): qlora-ray's own by default;
    published measurements come from other scripts and say theirs. `sh` is `shape(...)` of
    the same arguments, when the caller has it already.
    """
    sh = sh or shape(arch, cfg, profile, recipe)
    tokens = batch_size * seq_len
    ckpt = cfg.train.gradient_checkpointing
    fwd = 2 if ckpt else 1  # forward passes through the layers (the second one recomputes)
    flash = cfg.model.attn_implementation == "flash_attention_2"
    # Attention: QK^T and PV over the context; causal kernels that skip the masked half do
    # half the work (FlashAttention-2); its backward recomputes the scores (2.5x forward).
    context = seq_len / 2 if flash else seq_len
    attention = 4 * context * arch.heads * arch.head_dim * arch.layers
    attention_passes = fwd + (2.5 if flash else 2.0)

    flops = tokens * (
        2 * sh.linear_params * (fwd + 1)  # forward(s) + input gradient
        + 2 * sh.lm_head * 2  # lm_head forward + input gradient (it is frozen)
        + 2 * sh.lora_params * (fwd + 2)  # adapters: forward(s) + input and weight gradients
        + attention * attention_passes
    )
    weight_passes = fwd + 1
    weight_bytes = (sh.linear_params + sh.lm_head) * sh.cb * weight_passes
    # bitsandbytes dequantizes each 4/8-bit weight to the compute dtype once per pass: read
    # the packed codes (0.5 / 1 byte), write the 16-bit copy the matmul then reads.
    dequant = {4: 0.5 + sh.cb, 8: 1 + sh.cb}.get(sh.wbits, 0) * sh.linear_params * weight_passes
    # Backward moves about twice the forward's elementwise traffic (saved input + incoming
    # gradient read, outgoing gradient written).
    stream = _layer_bytes(arch, sh, cfg, seq_len) * (fwd + 2)
    # The loss: logits cast to fp32, log-softmax, its backward and the cast back.
    loss = arch.vocab * (sh.cb + 4 + 4 + 4 + 8 + 4 + sh.cb)
    memory = tokens * (stream + loss) + dequant

    layer_ops = OPS_PER_LAYER + sh.n_linear * OPS_PER_LINEAR.get(sh.wbits, 1) + sh.n_adapted * (
        OPS_PER_ADAPTER + (1 if cfg.lora.dropout > 0 else 0))
    ops = arch.layers * layer_ops * (fwd + BACKWARD_OPS) + 15 * (1 + BACKWARD_OPS)
    return Work(flops=flops, weight_bytes=weight_bytes, bytes=memory, ops=ops)


def optimizer_step(arch: Architecture, cfg: ExperimentConfig) -> Work:
    """Clip, update and zero the adapters once (per optimizer step, not per micro-batch)."""
    from qlora_ray.memory_terms import OPTIMIZER_STATE_BYTES

    modules, _ = adapted_modules(arch, cfg.lora.target_modules)
    sh_params = arch.layers * sum(cfg.lora.r * (i + o) * n for m, (i, o, n) in arch.linears.items()
                                  if m in modules)
    tensors = arch.layers * len(modules) * 2
    state = OPTIMIZER_STATE_BYTES.get(cfg.train.optim, 8)
    moved = sh_params * (4 * 4 + state * OPTIMIZER_BYTES_PER_STATE_BYTE)
    return Work(bytes=moved, ops=OPS_PER_STEP + tensors * OPS_PER_TRAINABLE_TENSOR)


# ---------------------------------------------------------------------------------------
# evaluation: generation, scoring, eval loss


def forward_pass(
    arch: Architecture, cfg: ExperimentConfig, profile: GpuProfile | None, *,
    batch_size: int, seq_len: float, context: float | None = None, recipe: Recipe = DEFAULT_RECIPE,
    sh: _Shape | None = None,
) -> Work:
    """One forward pass without gradients (prefill, eval loss, embedding, one decode step).

    `context` is the attention span per token (defaults to `seq_len`): a decode step has
    seq_len 1 and the prompt plus the tokens so far as context.
    """
    sh = sh or shape(arch, cfg, profile, recipe)
    tokens = batch_size * seq_len
    span = seq_len if context is None else context
    attention = 4 * span * arch.heads * arch.head_dim * arch.layers
    flops = tokens * (2 * sh.linear_params + 2 * sh.lm_head + 2 * sh.lora_params + attention)
    weight_bytes = (sh.linear_params + sh.lm_head) * sh.cb
    dequant = {4: 0.5 + sh.cb, 8: 1 + sh.cb}.get(sh.wbits, 0) * sh.linear_params
    memory = tokens * (_layer_bytes(arch, sh, cfg, span) + arch.vocab * (sh.cb + 4)) + dequant
    ops = arch.layers * (OPS_PER_LAYER + sh.n_linear * OPS_PER_LINEAR.get(sh.wbits, 1)
                         + sh.n_adapted * OPS_PER_ADAPTER) + 15
    return Work(flops=flops, weight_bytes=weight_bytes, bytes=memory, ops=ops)


def expected_batch_max(lengths: Sequence[int], batch_size: int) -> float:
    """Expected longest of `batch_size` lengths drawn at random: the padded length of a batch.

    The collator pads each batch to its longest sequence and the Trainer samples batches at
    random, so a batch costs its maximum, not its mean. With lengths sorted ascending,
    P(max <= l_k) = (k / n) ** batch_size (draws with replacement; exact enough for n >> b).
    """
    if not lengths:
        return 0.0
    ordered = sorted(lengths)
    n = len(ordered)
    return sum(v * ((k / n) ** batch_size - ((k - 1) / n) ** batch_size)
               for k, v in enumerate(ordered, start=1))


def grouped_batch_max(lengths: Sequence[int], batch_size: int) -> float:
    """Mean padded length of a batch under length-grouped batching (`train.group_by_length`).

    transformers' LengthGroupedSampler sorts random mega-batches of up to 50 batches by length
    and cuts them into batches (trainer_pt_utils.get_length_grouped_indices), so a batch holds
    neighbours in length order; this takes the whole set sorted as one mega-batch, which is
    what it approaches when a mega-batch spans many batches. The longest batch is unchanged:
    the memory planner keeps the longest row.
    """
    if not lengths:
        return 0.0
    ordered = sorted(lengths)
    maxima = [ordered[min(i + batch_size, len(ordered)) - 1] for i in range(0, len(ordered), batch_size)]
    return sum(maxima) / len(maxima)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
