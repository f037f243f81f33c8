"""What a model's architecture allows, decided from its `config.json` alone (no torch).

Checks `plan` runs on every cell, so that a cell that would fail at load in every worker
is a plan problem instead:

- attention kernel: `model.attn_implementation: auto` (the default) becomes what
  transformers itself picks when it is given none, sdpa where the model class supports it
  and eager otherwise; an explicit choice the class does not support is a problem.
- LoRA rank: a rank above the smaller dimension of an adapted layer adds parameters that
  cannot raise the update's rank; it is a problem, with the largest rank that makes sense.
- weights: with `model.use_safetensors` (the default) a local model folder holding only
  pickled `pytorch_model*.bin` weights is a problem (they would be refused at load).

Which kernels a model class supports is a class attribute in transformers
(`_supports_sdpa`, `_supports_flash_attn` on each `*ForCausalLM`; the base class defaults
both to False), readable only by importing the model code, which imports torch. So
`ATTENTION_SUPPORT` copies them for the usual fine-tuning families, keyed by `model_type`,
and `tests/test_modelcheck.py` compares every entry with the installed transformers (a
release that changes one fails that test). A `model_type` not in the table is not
guessed at: `auto` is planned as sdpa and left to transformers at load time, and an
explicit choice is not second-guessed.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_ray.config import problem

if TYPE_CHECKING:
    from qlora_ray.config import ExperimentConfig
    from qlora_ray.memory import Architecture

_ALL = ("eager", "sdpa", "flash_attention_2")
_NO_SDPA = ("eager", "flash_attention_2")
_NO_FLASH = ("eager", "sdpa")

# model_type -> attention implementations its CausalLM class supports (transformers 5.23).
ATTENTION_SUPPORT: dict[str, tuple[str, ...]] = {
    **dict.fromkeys((
        "llama", "mistral", "ministral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
        "gemma", "gemma3", "gemma3_text", "recurrent_gemma", "phi", "phi3", "phimoe", "gpt2",
        "gpt_neox", "falcon", "falcon_h1", "olmo", "olmo2", "olmoe", "opt", "stablelm",
        "starcoder2", "gpt_bigcode", "cohere", "cohere2", "granite", "granitemoe", "smollm3",
        "deepseek_v3", "exaone4", "glm", "glm4", "jamba", "nemotron", "persimmon", "zamba2",
        "dbrx", "hunyuan_v1_dense", "ernie4_5", "seed_oss", "apertus", "arcee", "helium",
        "bitnet", "dots1", "lfm2",
    ), _ALL),
    # Gemma-2 and its kin soft-cap attention logits, which SDPA cannot; gpt-oss has sinks.
    **dict.fromkeys(("gemma2", "vaultgemma", "gpt_oss", "granite_swa"), _NO_SDPA),
    "gptj": _NO_SDPA,
    "llama4_text": _NO_FLASH,
    "doge": _NO_FLASH,
    "mpt": ("eager",),
    "bloom": ("eager",),
}


def effective_attention(requested: str, model_type: str) -> str:
    """The kernel a cell runs with: `auto` resolved the way transformers resolves None."""
    if requested != "auto":
        return requested
    supported = ATTENTION_SUPPORT.get(model_type, _ALL)
    return "sdpa" if "sdpa" in supported else "eager"


def attention_problems(requested: str, model_type: str) -> list[str]:
    supported = ATTENTION_SUPPORT.get(model_type)
    if requested == "auto" or supported is None or requested in supported:
        return []
    return [problem("model.attn_implementation", requested,
                    f"is not supported by {model_type} models (transformers has no {requested} "
                    f"kernel for them; they support {', '.join(supported)})",
                    "use auto (picks what the model supports) or eager")]


def rank_problems(cfg: ExperimentConfig, arch: Architecture) -> list[str]:
    from qlora_ray.memory import adapted_modules

    modules, _ = adapted_modules(arch, cfg.lora.target_modules)
    dims = {m: min(arch.linears[m][:2]) for m in modules}
    if not dims or cfg.lora.r <= min(dims.values()):
        return []
    narrowest = min(dims, key=lambda m: dims[m])
    i, o, _ = arch.linears[narrowest]
    return [problem("lora.r", cfg.lora.r,
                    f"is larger than the adapted layer {narrowest} ({i} -> {o} features in "
                    f"{cfg.model.name}), whose update cannot have rank above {dims[narrowest]}",
                    f"use lora.r <= {dims[narrowest]}, or leave {narrowest} out of lora.target_modules")]


@functools.lru_cache(maxsize=256)
def _weight_files(folder: str) -> tuple[bool, tuple[str, ...]]:
    """(has safetensors weights, pickled weight files) of a local model folder."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        return False, ()
    safe = any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))
    pickled = tuple(sorted(p.name for p in path.glob("pytorch_model*.bin")))
    return safe, pickled


def weights_problems(cfg: ExperimentConfig) -> list[str]:
    """`model.use_safetensors` (the default) on a local folder that has only pickled weights.

    Hub repositories are not listed at plan time (no network); transformers refuses them
    at load with the same reason. A folder holding only config.json (for planning) is fine.
    """
    if not cfg.model.use_safetensors:
        return []
    out = []
    folders = (("model.name", cfg.model.name), ("eval.similarity.embedder", cfg.eval.similarity.embedder))
    for key, name in folders:
        safe, pickled = _weight_files(name)
        if pickled and not safe:
            out.append(problem("model.use_safetensors", True,
                               f"loads only .safetensors weights, and {key} {name} has only pickled "
                               f"ones ({', '.join(pickled)})",
                               "convert them (from_pretrained, then save_pretrained writes safetensors), "
                               "or set model.use_safetensors: false if you trust the files"))
    return out


def model_problems(cfg: ExperimentConfig, arch: Architecture) -> list[str]:
    """Why `cfg` cannot run on this architecture as specified (empty when it can)."""
    return (attention_problems(cfg.model.attn_implementation, arch.model_type) + rank_problems(cfg, arch)
            + weights_problems(cfg))
