"""Token-level data: prompt/answer ids, truncation, generation prompts, packing, collation.

What `qlora_ray.data.prepare_data` turns rows into; the rules are described in data.py's
module docstring. No torch import at module level (the collator imports it when called).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value transformers' loss skips


# ------------------------------------------------------------------------ tokenizing


def truncate(
    prompt: list[int], response: list[int], max_len: int, head: int = 0
) -> tuple[list[int], list[int]]:
    """Fit prompt + response into `max_len`, keeping the response and the prompt's end.

    `head` leading prompt tokens (the bos token) are always kept. See the module docstring.
    """
    if len(prompt) + len(response) <= max_len:
        return prompt, response
    budget = max(max_len - len(response), min(len(prompt), max_len // 2))
    keep = max(budget - head, 0)
    prompt = prompt[:head] + prompt[len(prompt) - keep :]
    return prompt, response[: max_len - len(prompt)]


def answer_suffix(tokenizer: Any, chat_template: bool) -> tuple[list[int], list[int]]:
    """(tokens that end a training target, the stop tokens among them).

    Without a chat template an answer ends with the eos token. With one it ends the way
    the template closes an assistant turn (Gemma `<end_of_turn>`, Phi-3 `<|end|>`,
    ChatML `<|im_end|>`), read off the template itself by rendering a turn around a
    marker; generation stops at the special tokens in it.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not chat_template:
        return eos, eos
    marker = "QLORARAYANSWERMARKER"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "question"}, {"role": "assistant", "content": marker}],
            tokenize=False)
        suffix = text.split(marker, 1)[1].rstrip() if marker in text else ""
    except Exception as e:  # a template that refuses this conversation: fall back to eos
        log.warning("could not read the end of an assistant turn from the chat template (%s); "
                    "answers end with the eos token", e)
        suffix = ""
    if not suffix:
        return eos, eos
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    return ids, [i for i in ids if i in special][:1] or eos


def encode(
    tokenizer: Any, prompts: list[str], responses: list[str], max_len: int,
    suffix: list[int] | None = None,
) -> tuple[list[dict[str, list[int]]], int]:
    """Tokenized examples (labels -100 on the prompt) and how many were truncated.

    Each response is followed by `suffix` (default: the eos token; see `answer_suffix`).
    """
    if suffix is None:
        suffix = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos_id = tokenizer.bos_token_id
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"] if responses else []
    examples, truncated = [], 0
    for p, r in zip(prompt_ids, response_ids, strict=True):
        p2, r2 = truncate(list(p), list(r) + suffix, max_len, _head(p, bos_id))
        truncated += (len(p2), len(r2)) != (len(p), len(r) + len(suffix))
        examples.append({
            "input_ids": p2 + r2,
            "attention_mask": [1] * (len(p2) + len(r2)),
            "labels": [IGNORE_INDEX] * len(p2) + r2,
        })
    return examples, truncated


def _head(prompt: list[int], bos_id: int | None) -> int:
    """Leading prompt tokens truncation always keeps: the bos token, if it starts the prompt."""
    return 1 if bos_id is not None and prompt[:1] == [bos_id] else 0


def generation_prompts(
    tokenizer: Any, prompts: list[str], max_len: int, max_new_tokens: int
) -> tuple[list[list[int]], int]:
    """Eval prompts as token ids, cut like training prompts (`truncate`) to leave room for
    `max_new_tokens` within `max_len`; and how many were cut."""
    bos_id = tokenizer.bos_token_id
    out, cut = [], 0
    for p in tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []:
        kept, _ = truncate(list(p), [0] * max_new_tokens, max_len, _head(p, bos_id))
        out.append(kept)
        cut += len(kept) != len(p)
    return out, cut


def _positioned(example: dict[str, Any]) -> dict[str, list[int]]:
    """One example as it sits in a packed or padding-free row: its own positions, its first label ignored
    (in a row it would be predicted from the previous example's last token)."""
    ids = list(example["input_ids"])
    labels = list(example["labels"]) if "labels" in example else list(ids)
    return {"input_ids": ids, "labels": [IGNORE_INDEX, *labels[1:]], "position_ids": list(range(len(ids)))}


def pack(examples: list[dict[str, list[int]]], max_len: int) -> list[dict[str, list[int]]]:
    """Lay whole examples end to end into sequences of at most `max_len` tokens, in order.

    Each sequence carries `position_ids` restarting at 0 with every example and no
    attention mask: from that, transformers builds a block-diagonal causal mask, so an
    example attends only to itself and sits at the positions it would have alone.
    """
    packed: list[dict[str, list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex in map(_positioned, examples):
        if ids and len(ids) + len(ex["input_ids"]) > max_len:
            packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
            ids, labels, positions = [], [], []
        ids += ex["input_ids"]
        labels += ex["labels"]
        positions += ex["position_ids"]
    if ids:
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed


# ---------------------------------------------------------------------------- collate


@dataclass
class PadCollator:
    """Right-pads input_ids (pad id), attention_mask (0) and labels (-100) to the longest.

    Packed sequences (they carry `position_ids`) are instead laid end to end into one row
    of shape [1, total tokens], with their position ids and no attention mask and no
    padding, as transformers' `DataCollatorWithFlattening` does: sdpa and eager attention
    then get a block-diagonal mask built from the positions, and flash_attention_2 its
    variable-length kernel, which it uses for position-packed input only in a batch of one.
    The price on sdpa/eager is a mask (and attention scores) over the whole micro-batch,
    (batch_size x max_seq_len)^2 instead of batch_size x max_seq_len^2.

    `flatten` (`train.padding_free`): unpacked examples are laid out the same way, one batch
    per row: the batch the padded layout would make, without its pad tokens.
    """

    pad_token_id: int
    flatten: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        if self.flatten and "position_ids" not in features[0]:
            features = [_positioned(f) for f in features]
        if "position_ids" in features[0]:
            keys = ("input_ids", "labels", "position_ids")
            return {k: torch.tensor([[x for f in features for x in f[k]]], dtype=torch.long) for k in keys}
        longest = max(len(f["input_ids"]) for f in features)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            ids = list(f["input_ids"])
            pad = longest - len(ids)
            mask = list(f["attention_mask"]) if "attention_mask" in f else [1] * len(ids)
            labels = list(f["labels"]) if "labels" in f else list(ids)
            batch["input_ids"].append(ids + [self.pad_token_id] * pad)
            batch["attention_mask"].append(mask + [0] * pad)
            batch["labels"].append(labels + [IGNORE_INDEX] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def make_collator(tokenizer: Any, flatten: bool = False) -> Callable[..., Any]:
    """The batch collator for `PreparedData.train`/`.eval`; pads on the right, or with
    `flatten` (`train.padding_free`) lays each batch end to end in one row."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        # The pad value never reaches the loss (labels are -100 there) or attention (mask 0).
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return PadCollator(pad_id, flatten)
