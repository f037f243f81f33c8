"""Evaluation: greedy generation, similarity score, label accuracy / weighted F1, eval loss.

The scoring math (first half) is pure Python + NumPy; the model-facing half generates,
embeds and computes the loss, the same way before and after training. README ("Similarity
score") defines the score; docs/memory.md ("Eval") what the eval holds in memory.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from qlora_ray.encoding import IGNORE_INDEX

if TYPE_CHECKING:
    from qlora_ray.data import PreparedData

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------- pure scoring


def cosine_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise 1 - cos(a_i, b_i); a zero vector is at distance 1 from everything."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    denom = na * nb
    cos = np.divide((a * b).sum(axis=1), denom, out=np.zeros_like(denom), where=denom > 0)
    return 1.0 - cos


def match_label(text: str, labels: list[str]) -> str | None:
    """The label that appears earliest in `text` as a whole word, case-insensitively (the
    FinLoRA rule, without matching inside other words).

    A letter, digit, `_` or `-` next to a match disqualifies it: "Answer: B" is B, not A;
    "I don't know" is not "no"; "non-neutral, clearly negative" is negative. At the same
    position the longer label wins ("strong buy" over "strong" if both were labels).
    """
    best: tuple[int, int, str] | None = None
    for label in labels:
        if not label.strip():
            continue
        found = re.search(rf"(?<![\w-]){re.escape(label.strip())}(?![\w-])", text, re.IGNORECASE)
        if found:
            key = (found.start(), -len(label), label)
            if best is None or key < best:
                best = key
    return best[2] if best else None


def accuracy_and_weighted_f1(predicted: list[str | None], reference: list[str]) -> tuple[float, float]:
    """Accuracy and support-weighted F1 over the reference classes (sklearn's `weighted`).

    A prediction of None (no label found in the text) is wrong for every class.
    """
    if not reference:
        return float("nan"), float("nan")
    correct = sum(p == r for p, r in zip(predicted, reference, strict=True))
    support = Counter(reference)
    f1_sum = 0.0
    for cls, n_true in support.items():
        tp = sum(p == cls and r == cls for p, r in zip(predicted, reference, strict=True))
        n_pred = sum(p == cls for p in predicted)
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1_sum += f1 * n_true
    return correct / len(reference), f1_sum / len(reference)


# ------------------------------------------------------------------------- model-facing


@dataclass
class EvalResult:
    similarity_score: float
    accuracy: float | None
    f1: float | None
    majority_accuracy: float | None  # always answering the most frequent reference label
    eval_loss: float | None  # mean cross-entropy per answer token over the whole eval set
    seconds: float
    samples: list[dict[str, Any]] = field(default_factory=list)


def majority_accuracy(reference: list[str]) -> float | None:
    """Accuracy of always answering the most frequent reference label (the floor to beat)."""
    return Counter(reference).most_common(1)[0][1] / len(reference) if reference else None


def causal_lm(model: Any) -> Any:
    """The transformers model under a PeftModel (LoRA layers are injected in place, so
    adapters still apply), bypassing any wrapper the Trainer put on the PeftModel's forward."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def stop_token_ids(model: Any, tokenizer: Any, end_of_answer: list[int] | None = None) -> list[int]:
    """Every token that ends an answer: the model's own stop tokens (often several, e.g.
    Llama 3's `<|eot_id|>` and `<|end_of_text|>`), the tokenizer's eos, and the token the
    chat template ends a turn with (`PreparedData.end_of_answer_ids`)."""
    ids: list[int] = []
    model_eos = getattr(getattr(causal_lm(model), "generation_config", None), "eos_token_id", None)
    for source in (model_eos, tokenizer.eos_token_id, end_of_answer):
        ids.extend(source if isinstance(source, (list, tuple)) else [] if source is None else [source])
    return list(dict.fromkeys(int(i) for i in ids))


def generation_config(max_new_tokens: int, pad_token_id: int, stop_ids: list[int]) -> Any:
    """Greedy decoding with every field that could change the output set explicitly.

    transformers 5 fills each field a passed config leaves unset from the checkpoint's
    `generation_config.json` (a `repetition_penalty` of 1.05, `suppress_tokens`, ...), so
    `generate` below also swaps this in as the model's own config while it runs.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_length=0, do_sample=False, num_beams=1,
        num_return_sequences=1, use_cache=True, temperature=1.0, top_k=50, top_p=1.0, typical_p=1.0,
        min_p=None, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0,
        encoder_repetition_penalty=1.0, length_penalty=1.0, no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0, renormalize_logits=False, remove_invalid_values=False,
        output_scores=False, output_logits=False, return_dict_in_generate=False,
        pad_token_id=pad_token_id, eos_token_id=stop_ids,
    )


@contextlib.contextmanager
def _only_this_generation_config(model: Any, config: Any) -> Iterator[None]:
    hf = causal_lm(model)
    saved = hf.generation_config
    hf.generation_config = copy.deepcopy(config)  # nothing left to fill in from the checkpoint
    try:
        yield
    finally:
        hf.generation_config = saved


def _left_padded(rows: list[list[int]], pad_id: int, device: Any) -> dict[str, Any]:
    import torch

    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return {"input_ids": ids, "attention_mask": mask}


def generate(
    model: Any, tokenizer: Any, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int,
    stop_ids: list[int] | None = None,
) -> list[str]:
    """Greedy decoding of the prompts (token ids), left-padded; returns only the new text."""
    import torch

    stop_ids = stop_ids or stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    config = generation_config(max_new_tokens, pad_id, stop_ids)
    device = _input_device(model)
    out: list[str] = []
    with _only_this_generation_config(model, config), torch.no_grad():
        for i in range(0, len(prompt_ids), batch_size):
            batch = _left_padded(prompt_ids[i : i + batch_size], pad_id, device)
            ids = model.generate(**batch, generation_config=config)
            new = ids[:, batch["input_ids"].shape[1] :]
            out.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return out


def max_positions(model: Any, tokenizer: Any) -> int | None:
    """The longest input the model takes: the smaller of the tokenizer's and the config's
    limits (tokenizers without one report a huge sentinel)."""
    limits = [getattr(getattr(causal_lm(model), "config", None), "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    known = [int(n) for n in limits if isinstance(n, int) and 0 < n < 10**7]
    return min(known) if known else None


def embed(model: Any, tokenizer: Any, texts: list[str], batch_size: int) -> np.ndarray:
    """Mean-pooled last hidden state over non-padding tokens, one row per text.

    Runs the decoder body (a causal LM's `base_model`, or the model itself when it has no
    head): the same final hidden states as `model(..., output_hidden_states=True)`'s last,
    without the vocabulary-wide logits or the stack of every layer's states.
    """
    import torch

    hf = causal_lm(model)
    body = hf.base_model if hf.get_output_embeddings() is not None else hf
    device = _input_device(model)
    limit = max_positions(model, tokenizer)
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # positions count from 0 at the first real token
    rows: list[np.ndarray] = []
    try:
        for i in range(0, len(texts), batch_size):
            # An empty text still needs a token to embed: the eos token stands for "nothing".
            chunk = [t if t else (tokenizer.eos_token or " ") for t in texts[i : i + batch_size]]
            batch = tokenizer(chunk, return_tensors="pt", padding=True, truncation=limit is not None,
                              max_length=limit, add_special_tokens=False).to(device)
            with torch.no_grad():
                hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            rows.append(pooled.float().cpu().numpy())
    finally:
        tokenizer.padding_side = side
    return np.concatenate(rows) if rows else np.zeros((0, 1))


def eval_loss(model: Any, examples: list[dict[str, list[int]]], batch_size: int, pad_id: int) -> float | None:
    """Mean cross-entropy per answer token over all of `examples` (not a mean of batch means,
    so it does not depend on the batch size).

    Rows are left-padded so every answer ends at the right edge, and the model computes
    logits only for the last K positions (`logits_to_keep`), K covering the longest answer
    in the batch, instead of for every position.
    """
    import torch

    hf = causal_lm(model)
    device = _input_device(model)
    keep_supported = hf._supports_logits_to_keep()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = _left_padded([list(ex["input_ids"]) for ex in chunk], pad_id, device)
        width = batch["input_ids"].shape[1]
        labels = torch.tensor([[IGNORE_INDEX] * (width - len(ex["labels"])) + list(ex["labels"])
                               for ex in chunk], device=device)
        # Logits at position p predict token p + 1: keep from the one before the first answer token.
        answer = [len(ex["labels"]) - next((j for j, t in enumerate(ex["labels"]) if t != IGNORE_INDEX),
                                           len(ex["labels"])) for ex in chunk]
        keep = min(max(answer) + 1, width)
        if max(answer) == 0:
            continue
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            extra = {"logits_to_keep": keep} if keep_supported else {}
            logits = hf(**batch, position_ids=positions, use_cache=False, **extra).logits[:, -keep:]
            targets = labels[:, width - keep + 1 :]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(loss)
        count += int((targets != IGNORE_INDEX).sum())
    return total / count if count else None


def _input_device(model: Any) -> Any:
    return next(p.device for p in model.parameters())


class Embedder:
    """`self` embeds with the evaluated model's adapter disabled (the base model: one ruler
    before and after training); anything else is a fixed model, loaded once.

    A fixed model is loaded at `revision` (pin a commit: a branch moves), from safetensors
    only unless `use_safetensors` is False; `commit` says which commit it came from.
    """

    def __init__(self, spec: str, device: str, revision: str | None = None, use_safetensors: bool = True):
        self.spec = spec
        self.revision = revision
        self.use_safetensors = use_safetensors
        self._fixed: tuple[Any, Any] | None = None
        self._device = device

    @property
    def commit(self) -> str | None:
        """The hub commit of the fixed model's files (None for `self` or a local folder)."""
        if self.spec == "self" or os.path.isdir(os.path.expanduser(self.spec)):
            return None
        from qlora_ray.provenance import hub_commit

        return hub_commit(self.spec, self.revision) or self.revision

    def __call__(self, model: Any, tokenizer: Any, texts: list[str], batch_size: int) -> np.ndarray:
        if self.spec == "self":
            off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
            with off:
                return embed(model, tokenizer, texts, batch_size)
        if self._fixed is None:
            from transformers import AutoModel, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.spec, revision=self.revision)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            model = AutoModel.from_pretrained(self.spec, revision=self.revision,
                                              use_safetensors=True if self.use_safetensors else None)
            self._fixed = (model.to(self._device).eval(), tok)
        return embed(self._fixed[0], self._fixed[1], texts, batch_size)


def autocast(device: Any, dtype: str | None) -> Any:
    """The autocast context of an eval pass: `dtype` (float16/bfloat16) on, or off."""
    import torch

    kind = device.type if hasattr(device, "type") else str(device).split(":")[0]
    if dtype in ("float16", "bfloat16"):
        return torch.autocast(kind, dtype=getattr(torch, dtype))
    return torch.autocast(kind, enabled=False)


def evaluate(
    model: Any,
    tokenizer: Any,
    data: PreparedData,
    *,
    max_new_tokens: int,
    batch_size: int,
    embedder: Embedder,
    phase: str,
    autocast_dtype: str | None = None,
) -> EvalResult:
    """Generate, score and compute the eval loss on `data`'s held-out rows.

    The same way before and after training: in eval mode, without gradients, through the
    base transformers model (not the forward the Trainer's accelerate wrapped with autocast
    while training), under one explicit autocast setting (`autocast_dtype`: the compute
    dtype on CUDA, as training used; none on the CPU).
    """
    import time

    start = time.perf_counter()
    references = [r.strip() for r in data.eval_references]
    was_training = model.training
    model.eval()
    try:
        with autocast(_input_device(model), autocast_dtype):
            stop_ids = stop_token_ids(model, tokenizer, data.end_of_answer_ids)
            generated = generate(model, tokenizer, data.eval_prompt_ids, max_new_tokens, batch_size, stop_ids)
            distances = cosine_distances(
                embedder(model, tokenizer, generated, batch_size),
                embedder(model, tokenizer, references, batch_size),
            )
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
            loss = eval_loss(model, list(data.eval), batch_size, pad_id)
    finally:
        model.train(was_training)

    labels = data.labels
    accuracy = f1 = majority = None
    predicted: list[str | None] = [None] * len(generated)
    canon = {lab.strip().lower(): lab for lab in labels or []}
    label_rows = [i for i, r in enumerate(references) if r.lower() in canon]
    if labels and label_rows:
        for i in label_rows:
            predicted[i] = match_label(generated[i], labels)
        truth = [canon[references[i].lower()] for i in label_rows]
        accuracy, f1 = accuracy_and_weighted_f1([predicted[i] for i in label_rows], truth)
        majority = majority_accuracy(truth)
    is_label = set(label_rows) if labels else set()
    samples = [
        {
            "phase": phase,
            "index": i,
            "prompt": data.eval_prompts[i],
            "reference": references[i],
            "generated": generated[i],
            "similarity_score": float(distances[i]),
            "label_predicted": predicted[i],
            "correct": (predicted[i] is not None and predicted[i].lower() == references[i].lower())
            if i in is_label else None,
        }
        for i in range(len(generated))
    ]
    return EvalResult(
        similarity_score=float(np.mean(distances)) if len(distances) else float("nan"),
        accuracy=accuracy,
        f1=f1,
        majority_accuracy=majority,
        eval_loss=loss,
        seconds=time.perf_counter() - start,
        samples=samples,
    )
