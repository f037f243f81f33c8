"""The built-in tiny Llama widened k times, computing the same function (a benchmark model).

    .venv/bin/python benchmarks/wide_model.py OUT_DIR [--factor 4]

Why: the built-in model (hidden 128) is so small that a training step's fixed costs (the
optimizer, per-module Python and autograd work, 4-bit dequantization) weigh as much as its
tokens, which a real 7B model's step does not: there the matmuls over the batch's tokens
dominate. A wider model moves the balance toward per-token work; built this way (no
download) it also keeps what the built-in model learned, so eval quality still means
something (a randomly initialized wide model learns nothing in two epochs of LoRA).

How (function-preserving widening, as in Net2Net): hidden size, intermediate size and the
number of heads grow `factor` times, head_dim stays 32 (same rotary angles, same softmax
scale). The tiny model's weights fill the first block of every matrix; the new heads and
MLP units get small random inputs and zero outputs, and nothing writes to the new hidden
dimensions, so they stay zero; RMSNorm weights are divided by sqrt(factor) because the
mean square over the wider hidden state is `factor` times smaller (equal up to the norm's
epsilon). The embedding (tied to the LM head) is zero in the new dimensions. Dimensions
stay multiples of 64, so 4-bit blocks (64 values) of the copied part hold exactly the
tiny model's values: the quantized wide model is the quantized tiny one plus zero blocks.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def build(out: Path, factor: int = 4, seed: int = 0) -> Path:
    """Write the widened model (config, safetensors, the built-in tokenizer) to `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_ray.builtin import TINY_LLAMA, ensure_builtin

    src = ensure_builtin(TINY_LLAMA)
    tiny = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    c = tiny.config
    cfg: dict[str, Any] = {**c.to_dict(), "hidden_size": c.hidden_size * factor,
                           "intermediate_size": c.intermediate_size * factor,
                           "num_attention_heads": c.num_attention_heads * factor,
                           "num_key_value_heads": c.num_key_value_heads * factor,
                           "head_dim": c.hidden_size // c.num_attention_heads}
    torch.manual_seed(seed)
    wide = LlamaForCausalLM(LlamaConfig(**cfg))
    h = c.hidden_size
    norm_scale = 1 / math.sqrt(factor)
    with torch.no_grad():
        for name, w in wide.state_dict().items():
            small = tiny.state_dict()[name]
            if name.endswith("norm.weight"):
                w.fill_(norm_scale)
                w[:h] = small * norm_scale
            elif name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight"):
                w.zero_()
                w[:, :h] = small
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                w.zero_()  # new heads / units add nothing; nothing is written to new dims
                w[:h, : small.shape[1]] = small
            else:  # q, k, v, gate, up: new rows keep their random init (their outputs are unused)
                w[:, h:] = 0.0  # the new hidden dims are zero anyway; keep the copy exact
                w[: small.shape[0], :h] = small
    out.mkdir(parents=True, exist_ok=True)
    wide.generation_config = tiny.generation_config
    wide.save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    (out / "widened_from.json").write_text(json.dumps(
        {"source": str(src), "factor": factor, "seed": seed,
         "parameters": sum(p.numel() for p in wide.parameters()),
         "source_parameters": sum(p.numel() for p in tiny.parameters())}, indent=1) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--factor", type=int, default=4)
    args = ap.parse_args()
    print(build(args.out, args.factor))


if __name__ == "__main__":
    main()
