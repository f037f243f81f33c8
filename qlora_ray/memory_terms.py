"""The tensors one cell's training step and eval pass keep alive, term by term, in bytes.

`ModelTerms` models the network `modeling.py` builds (widths after k-bit preparation,
autocast, PEFT) from `config.json` numbers; `memory.estimate` adds the card's own share.
docs/memory.md ("The estimator") walks through every term and where it comes from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qlora_ray.architecture import Architecture, adapted_modules
from qlora_ray.config import ExperimentConfig, problem
from qlora_ray.modelcheck import effective_attention
from qlora_ray.profiles import GpuProfile, resolve_compute_dtype

# bitsandbytes NF4/FP4: two 4-bit codes per byte, one absmax per block of 64 weights: fp32,
# or with double quantization an 8-bit code plus one fp32 constant per 256 of them.
NF4_BLOCK = 64
DQ_BLOCK = 256
# bitsandbytes' 8-bit optimizers keep 32-bit state for tensors smaller than this
# (`min_8bit_size` in bitsandbytes/optim/optimizer.py), and one fp32 absmax per 256 values.
BNB_MIN_8BIT_SIZE = 4096
BNB_STATE_BLOCK = 256
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
# Optimizer state per trainable parameter: two fp32 moments, or bitsandbytes' two 8-bit codes
# (their per-block absmax and the 32-bit state of small tensors: `_optimizer_state_bytes`).
OPTIMIZER_STATE_BYTES = {"adamw_torch": 8, "paged_adamw_32bit": 8, "paged_adamw_8bit": 2, "adamw_bnb_8bit": 2}


@dataclass(frozen=True)
class Recipe:
    """How the training code lays the model out; the defaults are qlora-ray's own.

    Published measurements come from other scripts, so the calibration describes each of
    them with its own Recipe (docs/memory.md says which and why).
    """

    # 4/8-bit: `prepare_model_for_kbit_training` casts every 16-bit parameter that is not packed
    # 4-bit or int8 (embeddings, lm_head, norms) to fp32, so the residual stream that flows from the
    # fp32 embeddings is fp32 too.
    kbit_upcast: bool = True
    # 16-bit: also run k-bit preparation on the unquantized model, which makes the whole model fp32
    # (qlora-ray does not; FinLoRA's script did).
    upcast_16bit_model: bool = False
    # LoRA weights' width: PEFT keeps adapters in fp32 (`autocast_adapter_dtype`).
    adapter_bytes: int = 4
    # Override the width of embeddings/lm_head/norms; None follows kbit_upcast.
    unquantized_bytes: int | None = None
    # `cpu` models the memory harness's run: dropout keeps an fp32 noise tensor instead of CUDA's
    # bool mask, and 8-bit layers run `MatMul8bitFp` (see memory_harness.CPU_VS_GPU).
    device: str = "cuda"
    # bitsandbytes before 0.45 kept each 4-bit layer's input for backward (`ctx.tensors = (A, B)` in
    # MatMul4Bit); 0.50, which qlora-ray pins, keeps only B.
    saves_4bit_input: bool = False
    # Also predict the eval pass.
    count_eval: bool = True


DEFAULT_RECIPE = Recipe()


@dataclass(frozen=True)
class Shape:
    """Token lengths one cell's batches reach (`lengths.BatchShape` carries the same names)."""

    train_seq: int
    eval_prompt: int
    eval_seq: int
    reference: int
    source: str = "worst case"
    # Whether training batches carry an attention mask; None: rows of unequal length do (any batch
    # of 2 or more, or packed rows).
    masked: bool | None = None


class ModelTerms:
    """Widths and per-token bytes of the model qlora-ray builds for one cell.

    Width names: `cb` compute dtype (what autocast casts matmul inputs to), `ub` the
    unquantized parameters (embeddings, lm_head, norms), `rb` the residual stream (the
    embeddings' dtype: nothing narrows it), `mw` the MLP's activations (a 4-bit layer
    returns its input's dtype; nn.Linear under autocast returns `cb`).
    """

    def __init__(self, arch: Architecture, cfg: ExperimentConfig, profile: GpuProfile | None,
                 recipe: Recipe):
        self.arch, self.cfg, self.recipe = arch, cfg, recipe
        q = cfg.quant
        self.bits = q.bits
        self.cb = DTYPE_BYTES[resolve_compute_dtype(q.compute_dtype, profile)]
        self.autocast = self.cb == 2  # the Trainer's bf16/fp16 mixed precision
        kbit = q.bits in (4, 8)
        upcast = (kbit and recipe.kbit_upcast) or (q.bits == 16 and recipe.upcast_16bit_model)
        self.ub = recipe.unquantized_bytes or (4 if upcast else self.cb)
        self.rb = self.ub
        self.cpu = recipe.device == "cpu"
        self.mw = self.linear_out(self.rb)
        self.problems: list[str] = []
        modules, unknown = adapted_modules(arch, cfg.lora.target_modules)
        if unknown:
            self.problems.append(problem(
                "lora.target_modules", unknown, f"names modules {arch.model_type} does not have",
                f"use some of {', '.join(arch.linears)} or all-linear"))
        self.modules = modules
        lora = cfg.lora
        self.lora_params = arch.layers * sum(
            lora.r * (i + o) * n + (o * n if lora.use_dora else 0)
            for name, (i, o, n) in arch.linears.items() if name in modules)

    def linear_out(self, in_bytes: int) -> int:
        """Width of a base Linear's output for an input of `in_bytes`."""
        if self.bits == 4:
            return in_bytes  # Linear4bit casts its result back to the input's dtype
        if self.bits == 8 and not self.cpu:
            return in_bytes  # MatMul8bitLt: int8_scaled_mm(..., dtype=A.dtype)
        return self.cb if self.autocast else in_bytes

    # -- static ---------------------------------------------------------------------

    def static(self) -> dict[str, int]:
        """Alive through training and eval (the Trainer keeps its optimizer after training)."""
        arch, cfg = self.arch, self.cfg
        n = arch.linear_params
        if self.bits == 4:
            consts = 1 / NF4_BLOCK + 4 / (NF4_BLOCK * DQ_BLOCK) if cfg.quant.double_quant else 4 / NF4_BLOCK
            base = n * (0.5 + consts)
        elif self.bits == 8:
            base = n + arch.layers * sum(o * k for _, o, k in arch.linears.values()) * 4  # int8 + SCB
        else:  # 16-bit: the compute dtype, or fp32 when k-bit preparation ran on it too
            base = n * (4 if self.recipe.upcast_16bit_model else self.cb)
        opt = _optimizer_state_bytes(cfg.train.optim, self.lora_params, self._small_lora_params())
        return {
            "base_weights": int(base),
            "unquantized_weights": (arch.embedding_params + arch.other_params) * self.ub,
            "lora_weights": self.lora_params * self.recipe.adapter_bytes,
            "optimizer_states": opt,
        }

    def _small_lora_params(self) -> int:
        """Adapter parameters in tensors too small for 8-bit optimizer state."""
        r = self.cfg.lora.r
        return sum(r * d * n * self.arch.layers for name, (i, o, n) in self.arch.linears.items()
                   if name in self.modules for d in (i, o) if r * d < BNB_MIN_8BIT_SIZE)

    # -- training -------------------------------------------------------------------

    def layer_saved(self, seq: int, masked: bool, first: bool = False,
                    recomputed: bool = False) -> dict[str, float]:
        """Bytes per token one decoder layer keeps for backward, by part, for rows of `seq`.

        `first`: layer 0 without checkpointing, whose input does not require grad (only
        checkpointing calls `enable_input_require_grads`), so its input norm and q/k/v
        dropout keep nothing. `masked`: the batch carries an attention mask. `recomputed`:
        the layer under checkpointing, whose input (kept by checkpointing) is what the input
        norm keeps when the residual stream is fp32.
        """
        a, cb, rb, mw = self.arch, self.cb, self.rb, self.mw
        h, inter = a.hidden, a.intermediate * a.experts_per_token
        parts: dict[str, float] = {}
        # RMSNorm computes in fp32 and keeps its fp32 input (a copy when rb is 16-bit).
        norms = 1 if first or (recomputed and rb == 4) else 2
        parts["norms"] = norms * h * 4 + 8
        parts["attention"] = self._attention_saved(seq, masked)
        # act(gate) keeps gate; act * up keeps act and up. Phi-3's fused gate_up is the
        # same two tensors in one.
        parts["mlp"] = 3 * inter * mw
        parts["lora"] = self._lora_saved(first)
        if self.bits == 8:
            # MatMul8bit* keep their input A for backward: one per distinct input tensor
            # (q/k/v share the attention norm's output, gate/up the MLP norm's).
            keep_first = self.cpu or not first  # MatMul8bitLt keeps A only if it needs grad
            parts["int8_inputs"] = (h * rb if keep_first else 0) + a.q_dim * cb + h * rb + inter * mw
        if self.recipe.saves_4bit_input and self.bits == 4:
            # Old MatMul4Bit kept A, the compute-dtype copy each Linear4bit makes of its input
            # (one per module: q, k, v and gate, up each cast separately; o_proj's input is
            # already 16-bit and kept by attention anyway).
            attn_in = sum(1 for m in ("q_proj", "k_proj", "v_proj", "qkv_proj") if m in a.linears)
            mlp_in = sum(1 for m in ("gate_proj", "up_proj", "gate_up_proj") if m in a.linears)
            parts["int4_inputs"] = ((0 if first else attn_in) + mlp_in) * h * cb + inter * cb
        return parts

    def _attention_saved(self, seq: int, masked: bool) -> float:
        a, cb = self.arch, self.cb
        if effective_attention(self.cfg.model.attn_implementation, a.model_type) == "eager":
            # matmul(q, k^T) keeps q and the repeated k; softmax keeps its fp32 output and
            # matmul(probs, v) the 16-bit probs and the repeated v.
            return 3 * a.q_dim * cb + a.heads * seq * (4 + cb)
        # SDPA (flash / memory-efficient on CUDA, flash-for-CPU here) keeps q, k, v, the
        # output and the log-sum-exp; transformers repeats k/v for GQA when a mask is passed.
        kv = a.q_dim if masked else a.kv_dim
        return (2 * a.q_dim + 2 * kv) * cb + a.heads * 4

    def _lora_saved(self, first: bool) -> float:
        a, cb = self.arch, self.cb
        r = self.cfg.lora.r
        mask = 4 if self.cpu else 1  # CPU dropout keeps an fp32 noise tensor, CUDA a bool mask
        total = 0.0
        for name in self.modules:
            i, _, n = a.linears[name]
            no_grad_input = first and name in ("q_proj", "k_proj", "v_proj", "qkv_proj")
            dropout = self.cfg.lora.dropout > 0 and not no_grad_input
            # PEFT casts the input to the fp32 adapter dtype, drops it out (keeping the
            # mask), and autocast casts it to cb for lora_A, which keeps that copy; lora_B
            # keeps lora_A's r-wide output.
            total += n * (i * ((mask if dropout else 0) + (cb if self.autocast else 4)) + r * cb)
        return total

    def train_moments(self, bs: int, seq: int, shape_masked: bool | None = None) -> dict[str, dict[str, int]]:
        """Tensors beyond `static()` at the three moments that can be a step's peak."""
        a, cfg, cb, rb = self.arch, self.cfg, self.cb, self.rb
        tokens = bs * seq
        # Rows of unequal length (any batch of 2+, or packed / padding-free rows) carry an
        # attention mask; flash_attention_2 never gets one (it unpads, or takes packed rows
        # by their positions).
        one_row = cfg.dataset.packing or cfg.train.padding_free
        masked = shape_masked if shape_masked is not None else (bs > 1 or one_row) and (
            effective_attention(cfg.model.attn_implementation, a.model_type) != "flash_attention_2")
        ckpt = cfg.train.gradient_checkpointing
        h, inter, L = a.hidden, a.intermediate * a.experts_per_token, a.layers
        per_layer = sum(self.layer_saved(seq, masked, recomputed=ckpt).values())
        first = sum(self.layer_saved(seq, masked, first=True).values())
        saved = tokens * (L * h * rb if ckpt else first + (L - 1) * per_layer)
        # Autocast's 16-bit copies of the adapter weights live in its cache until the forward
        # ends; after that only the matmuls' saved ones (none under checkpointing).
        copies = self.lora_params * cb if self.autocast else 0
        kept_copies = 0 if ckpt else copies
        grads = self.lora_params * 4
        accumulating = cfg.train.grad_accum > 1
        # With padding: transformers' bool mask, and the float bias SDPA converts it to in
        # each layer (convert_boolean_attn_mask), kept for backward by every layer, or under
        # checkpointing by the recomputed one only.
        square = bs * seq * seq if masked else 0
        # Eager attention makes a heads x seq x seq score matrix per row in every layer it runs:
        # in the forward the fp32 scores (after the mask is added) and softmax's fp32 output,
        # in backward softmax's fp32 input gradient beside what the layer saved.
        scores = bs * a.heads * seq * seq if effective_attention(
            cfg.model.attn_implementation, a.model_type) == "eager" else 0
        common = {
            "lm_head_copy": a.vocab * h * cb if self.ub != cb and self.autocast else 0,
            "attention_mask": square * (1 + (0 if ckpt else L * cb)),
        }
        logits = tokens * a.vocab
        # Forward's end: the loss inside the forward, with the 16-bit logits, their fp32 copy
        # and log_softmax's output; autocast's cache still holds every adapter copy.
        forward = {"activations": saved + tokens * h * 4, "logits": logits * (cb + 8),
                   "lora_autocast_copies": copies, "lora_gradients": grads if accumulating else 0, **common}
        if scores:  # or inside the last layer's eager attention, before the logits exist
            in_attention = {**forward, "activations": saved + scores * 8, "logits": 0}
            forward = max(forward, in_attention, key=lambda d: sum(d.values()))
        # Loss: log_softmax's backward, with its fp32 output, nll_loss's gradient and its own.
        loss = {"activations": saved + tokens * h * 4, "logits": logits * 12,
                "lora_autocast_copies": kept_copies, "lora_gradients": grads if accumulating else 0,
                **common}
        # Layer: a decoder layer's backward (recomputed under checkpointing), at whichever is
        # larger of two instants of its MLP's backward. (a) down_proj's input gradient: its
        # weight dequantized (4/8-bit), the gradient it makes, the incoming gradient in the
        # compute dtype and the residual stream's two. (b) act * up's backward: d(act*up),
        # d act and d up in the MLP's width, and the residual stream's two gradients.
        # The first layer backward reaches has every checkpointed input still alive; the
        # last has every adapter's gradient.
        wide = self.mw if self.bits == 8 else cb
        largest = max(i * o for i, o, _ in a.linears.values())
        if self.bits == 4:
            dequant = largest * cb
        elif self.bits == 8:
            # MatMul8bitLt's backward dequantizes the int8 weight to its input's dtype (fp32 for
            # gate/up, whose input is the fp32 residual); the CPU's MatMul8bitFp does that in
            # the recomputed forward, where autocast adds a 16-bit copy for F.linear.
            dequant = largest * (max(rb, self.mw) + (cb if self.cpu and self.autocast else 0))
        else:
            dequant = 0
        at_down = dequant + tokens * (inter * wide + 2 * h * rb + h * cb)
        at_mul = tokens * (3 * inter * self.mw + 2 * h * rb)
        transient = max(at_down, at_mul) + tokens * (per_layer if ckpt else 0) + scores * 4
        base = {"attention_mask": square * (1 + (cb if ckpt else L * cb))}
        # Gradients exist for the layers already done and, in this one, for down_proj's
        # adapter (its backward runs before the MLP's).
        down = self.cfg.lora.r * sum(i + o for m, (i, o, _) in a.linears.items()
                                     if m == "down_proj" and m in self.modules) * 4
        first_bwd = {"activations": transient + saved,
                     "lora_gradients": grads if accumulating else down,
                     "lora_autocast_copies": copies / L if ckpt else copies, **base}
        last_bwd = {"activations": transient + tokens * (h * rb if ckpt else first),
                    "lora_gradients": grads if accumulating else grads * (L - 1) / L + down,
                    "lora_autocast_copies": copies / L, **base}
        layer = max(first_bwd, last_bwd, key=lambda d: sum(d.values()))
        return {"forward": _ints(forward), "loss": _ints(loss), "layer": _ints(layer)}

    # -- eval -----------------------------------------------------------------------

    def eval_moments(self, rows: int, shape: Shape) -> dict[str, dict[str, int]]:
        """The eval pass as evaluate.py runs it (its docstring lists what is alive at the
        peak): every part under autocast in the compute dtype, without gradients, one
        decoder layer's activations at a time."""
        a, cb, rb = self.arch, self.cb, self.rb
        h, inter, L = a.hidden, a.intermediate * a.experts_per_token, a.layers
        new = self.cfg.eval.max_new_tokens
        # q/k/v (and so the KV cache) come out of 4/8-bit layers in their input's dtype, the
        # fp32 residual's after k-bit preparation; a 16-bit Linear under autocast gives cb.
        kvb = self.linear_out(rb) if self.bits != 16 else self.cb
        # Autocast casts an fp32 lm_head to 16 bits at every call and, without gradients,
        # does not cache the copy: it lives while the logits are made.
        head = a.vocab * h * cb if self.ub != cb and self.autocast else 0
        # Rows of unequal length are left-padded: transformers' bool mask and the float bias
        # SDPA makes of it, for the layer running.
        masked = rows > 1

        def mask(seq: int) -> int:
            return rows * seq * seq * (1 + cb) if masked else 0

        def layer(tokens: int, width: int) -> float:
            # The MLP's product: act(gate), up and their product in the projections' output
            # width, beside the residual stream's tensors: the embeddings (the model's forward
            # still holds them), the layer's input (the embeddings themselves in layer 0), its
            # attention output added in and the MLP's normed input.
            return tokens * (3 * inter * width + (4 if L > 1 else 3) * h * rb)

        def head_input(tokens: int) -> float:
            # At the LM head the decoder has returned: only the final norm's output is left.
            return tokens * h * rb

        prompt = shape.eval_prompt
        kv_cache = 2 * L * rows * a.kv_dim * (prompt + new) * kvb
        # Generation: the prefill's largest layer moment, or the lm_head (generate asks for the
        # last position's logits only, `logits_to_keep=1`), with the KV cache of every layer.
        generate = {"kv_cache": kv_cache, **_larger(
            {"activations": layer(rows * prompt, kvb) + mask(prompt)},
            {"activations": head_input(rows * prompt), "lm_head_copy": head,
             "logits": rows * a.vocab * (cb + 4)})}
        # Eval loss: logits only for the answer span (`logits_to_keep`: the longest answer,
        # its end-of-answer token and the position before it), 16-bit, then fp32 for the
        # cross-entropy and its log-softmax; at the lm_head the weight's 16-bit copy instead.
        seq = shape.eval_seq
        keep = min(shape.reference + 2, seq)
        logits = rows * keep * a.vocab
        loss = _larger({"activations": layer(rows * seq, self.mw) + mask(seq)},
                       {"activations": head_input(rows * seq), "logits": logits * (cb + 8)},
                       {"activations": head_input(rows * seq), "logits": logits * cb, "lm_head_copy": head})
        # Similarity embedding: the decoder body over the texts, no LM head.
        text = max(shape.reference, new)
        embed = {"activations": layer(rows * text, self.mw) + mask(text)}
        return {"generate": _ints(generate), "eval_loss": _ints(loss), "embed": _ints(embed)}


def _larger(*parts: dict[str, float]) -> dict[str, float]:
    return max(parts, key=lambda d: sum(d.values()))


def _ints(d: dict[str, float]) -> dict[str, int]:
    return {k: int(v) for k, v in d.items()}


def _optimizer_state_bytes(optim: str, params: int, small: int) -> int:
    """Two moments per trainable parameter: fp32, or bitsandbytes' 8-bit codes with one fp32
    absmax per 256 values (`small`: parameters in tensors under BNB_MIN_8BIT_SIZE, which
    stay fp32)."""
    if OPTIMIZER_STATE_BYTES[optim] == 8:
        return params * 8
    big = params - small
    return small * 8 + big * 2 + math.ceil(big / BNB_STATE_BLOCK) * 8
