"""The numbers of a decoder-only transformer that memory and time depend on, read from its
`config.json` (pure: no torch, no transformers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qlora_ray.config import problem

# Model types whose config class ties lm_head to the input embeddings when config.json
# does not say (transformers' own defaults).
TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text", "gpt2"}


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
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def family(self) -> str:
        """The architecture family corrections are kept by (`calibrate`)."""
        return self.model_type.split("_")[0].rstrip("0123456789.") or self.model_type


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


def adapted_modules(arch: Architecture, targets: tuple[str, ...] | str) -> tuple[list[str], list[str]]:
    """(module names of a layer that get adapters, target names the model does not have)."""
    if targets == "all-linear":
        return list(arch.linears), []
    wanted = [t.rsplit(".", 1)[-1] for t in targets]
    return [m for m in arch.linears if m in wanted], [t for t in wanted if t not in arch.linears]
