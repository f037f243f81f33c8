"""How long a cell's batches really are, for the memory planner.

    lengths = data_lengths(cfg, search)          # workload.DataLengths, or None (no local data)
    shape = batch_shape(cfg, lengths, batch_size=4)
    shape.train_seq, shape.eval_prompt, shape.eval_seq, shape.reference, shape.source

The tokens themselves are counted once per grid by `qlora_ray.workload.data_lengths`
(the worker's own `data.py` pass over the model's `tokenizer.json`, or a bytes-per-token
estimate without one), which the time estimate uses too. This module turns those counts
into the lengths that decide memory:

- training: the longest padded batch the run can draw. The collator pads a batch to its
  longest row and batches are drawn at random, so any batch may hold the longest row:
  `train_seq` is the longest (truncated) row. Length-grouped batching (`train.group_by_length`)
  does not change that: some batch still holds the longest row (transformers' sampler even
  puts it first); it shortens the other batches, which the time estimate counts
  (`throughput.grouped_batch_max`). With `dataset.packing` every batch is full: `train_seq`
  is `max_seq_len`.
- eval: generation left-pads `eval.batch_size` prompts to the longest and adds
  `eval.max_new_tokens` (`eval_prompt` is the longest prompt, cut as the worker cuts it to
  leave room for the new tokens); the eval loss runs on whole eval rows (`eval_seq`,
  truncated like training) with logits for the answers only (`reference`, the longest
  answer), and the similarity embedder reads the references and the generations.

`worst_case(cfg)` skips the data: every row is `max_seq_len` long (`plan --worst-case`).
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_ray.config import ExperimentConfig
from qlora_ray.workload import DataLengths, data_lengths

__all__ = ["BatchShape", "DataLengths", "batch_shape", "data_lengths", "worst_case"]


@dataclass(frozen=True)
class BatchShape:
    """Sequence lengths one cell's batches reach (the fields `memory.Shape` takes)."""

    # Padded length of the longest training batch (max_seq_len with packing or worst case).
    train_seq: int
    # Longest eval prompt, before `eval.max_new_tokens` are generated.
    eval_prompt: int
    # Longest eval-loss row.
    eval_seq: int
    # Longest reference answer.
    reference: int
    # `worst case`, `tokenizer` or `estimated` (bytes per token, no tokenizer found).
    source: str


def worst_case(cfg: ExperimentConfig) -> BatchShape:
    """Every row `max_seq_len` long: what planning assumes without data."""
    s = cfg.train.max_seq_len
    # Eval prompts are cut to leave room for the generated tokens (encoding.generation_prompts).
    return BatchShape(train_seq=s, eval_prompt=max(1, s - cfg.eval.max_new_tokens), eval_seq=s, reference=s,
                      source="worst case")


def batch_shape(cfg: ExperimentConfig, lengths: DataLengths | None, batch_size: int) -> BatchShape:
    """The cell's batch lengths from its data's token counts (worst case without them).

    `batch_size` does not change the longest batch (any batch may hold the longest row, and
    under length-grouped batching one batch always does).
    """
    if lengths is None or not lengths.train:
        return worst_case(cfg)
    s = cfg.train.max_seq_len
    return BatchShape(
        train_seq=s if cfg.dataset.packing else min(max(lengths.train), s),
        eval_prompt=max(lengths.eval_prompts, default=s),
        eval_seq=min(max(lengths.eval_examples, default=s), s),
        reference=max(lengths.references, default=1),
        source="estimated" if lengths.estimated else "tokenizer",
    )
