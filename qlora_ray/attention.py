"""sdpa for one row of several examples (packing, padding-free) without the masked square.

A packed or padding-free batch is one row of examples end to end, with positions restarting
at each. transformers reads the restarts from `position_ids`
(masking_utils.find_packed_sequence_indices) and gives sdpa and eager a block-diagonal
causal mask over the whole row: attention then computes, and masks away, the full
(sum of lengths)^2 square, against the sum of each example's own length^2 that padded
batches pay. flash_attention_2 takes the positions instead (its variable-length kernel) but
exists on CUDA only. This path, for the CPU, runs torch's sdpa once per example, causal,
on that example's slice of the row: the same numbers as the masked square (each query sees
exactly its own example's earlier keys), without the square.

It is registered under its own name (`SDPA_BY_EXAMPLE`), so it applies only to the cells
that load with it (modeling.load: packed or padding-free cells on the CPU); any other input
(a padded batch, generation with a cache) goes to transformers' own sdpa unchanged.
"""

from __future__ import annotations

from typing import Any

SDPA_BY_EXAMPLE = "sdpa_by_example"


def register() -> str:
    """Make `SDPA_BY_EXAMPLE` a valid `attn_implementation` (idempotent); its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SDPA_BY_EXAMPLE, sdpa_by_example)
    # The mask transformers builds for sdpa: still needed by the inputs that fall through.
    AttentionMaskInterface.register(SDPA_BY_EXAMPLE, sdpa_mask)
    return SDPA_BY_EXAMPLE


def example_bounds(position_ids: Any, length: int) -> list[tuple[int, int]] | None:
    """[(start, end)] of the examples in one row, or None unless it holds several.

    An example starts wherever the position does not follow the previous one by 1, the rule
    transformers uses to find packed sequences (masking_utils.find_packed_sequence_indices).
    """
    if position_ids is None or position_ids.shape[0] != 1 or position_ids.shape[-1] != length:
        return None
    pos = position_ids.reshape(-1)
    starts = [0, *((pos[1:] - pos[:-1]) != 1).nonzero().flatten().add(1).tolist()]
    if len(starts) == 1:
        return None
    return list(zip(starts, [*starts[1:], length], strict=True))


def sdpa_by_example(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                    position_ids: Any = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention-function signature (query/key/value: batch, heads, seq, dim)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    bounds = example_bounds(position_ids, length) if key.shape[2] == length else None
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # Without a mask sdpa runs causal (is_causal: a decoder's attention, more than one query).
    outs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                   **kwargs)[0] for a, b in bounds]
    return torch.cat(outs, dim=1), None  # sdpa_attention_forward returns (batch, seq, heads, dim)
