"""Evaluation: greedy generation, similarity score, label accuracy / weighted F1.

The scoring math (first half of this file) is pure Python + NumPy and tested on its own;
the model-facing half generates and embeds.

similarity_score (the seed projects' published definition): for each eval row, embed the
generated answer and the reference answer by mean-pooling the embedder's last hidden state
over non-padding tokens, take 1 - cosine similarity, and average over the rows. Lower is
better; 0 means identical embeddings.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
    seconds: float
    samples: list[dict[str, Any]] = field(default_factory=list)


def generate(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy decoding (a fixed config, so runs compare); returns only the new text."""
    import torch
    from transformers import GenerationConfig

    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    device = _input_device(model)
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            with torch.no_grad():
                ids = model.generate(**batch, generation_config=gen_config)
            new = ids[:, batch["input_ids"].shape[1] :]
            out.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return out


def embed(model: Any, tokenizer: Any, texts: list[str], batch_size: int) -> np.ndarray:
    """Mean-pooled last hidden state over non-padding tokens, one row per text."""
    import torch

    device = _input_device(model)
    rows: list[np.ndarray] = []
    for i in range(0, len(texts), batch_size):
        # An empty generation still needs a token to embed: the eos token stands for "nothing".
        chunk = [t if t else (tokenizer.eos_token or " ") for t in texts[i : i + batch_size]]
        batch = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                          max_length=512, add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
        hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) else out.last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        rows.append(pooled.float().cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 1))


def _input_device(model: Any) -> Any:
    return next(p.device for p in model.parameters())


class Embedder:
    """`self` embeds with the evaluated model; anything else is a fixed model, loaded once.

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


def evaluate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    references: list[str],
    labels: list[str] | None,
    *,
    max_new_tokens: int,
    batch_size: int,
    embedder: Embedder,
    phase: str,
) -> EvalResult:
    import time

    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        generated = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
        distances = cosine_distances(
            embedder(model, tokenizer, generated, batch_size),
            embedder(model, tokenizer, references, batch_size),
        )
    finally:
        model.train(was_training)

    accuracy = f1 = None
    predicted: list[str | None] = [None] * len(generated)
    label_rows: list[int] = []
    if labels:
        label_set = {lab.lower() for lab in labels}
        label_rows = [i for i, r in enumerate(references) if r.strip().lower() in label_set]
        predicted = [match_label(g, labels) if i in set(label_rows) else None
                     for i, g in enumerate(generated)]
        if label_rows:
            canon = {lab.lower(): lab for lab in labels}
            accuracy, f1 = accuracy_and_weighted_f1(
                [predicted[i] for i in label_rows],
                [canon[references[i].strip().lower()] for i in label_rows],
            )
    label_set_rows = set(label_rows)
    samples = [
        {
            "phase": phase,
            "index": i,
            "prompt": prompts[i],
            "reference": references[i],
            "generated": generated[i],
            "similarity_score": float(distances[i]),
            "label_predicted": predicted[i],
            "correct": (predicted[i] is not None
                        and predicted[i].lower() == references[i].strip().lower())
            if i in label_set_rows else None,
        }
        for i in range(len(generated))
    ]
    return EvalResult(
        similarity_score=float(np.mean(distances)) if len(distances) else float("nan"),
        accuracy=accuracy,
        f1=f1,
        seconds=time.perf_counter() - start,
        samples=samples,
    )
