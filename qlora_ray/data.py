"""Training and eval data: load, format, tokenize, split, pack, collate.

    data = prepare_data(cfg, tokenizer)      # cfg: ExperimentConfig
    trainer = Trainer(..., train_dataset=data.train, eval_dataset=data.eval,
                      data_collator=make_collator(tokenizer))

What a row becomes:

- prompt text: `dataset.prompt_template.format_map(row)`, where a column a row lacks (or
  holds null) formats as empty; with `dataset.chat_template: true` that text is the user
  message of the tokenizer's chat template (with the generation prompt appended).
  If the tokenizer puts a bos token in front of what it encodes (Llama does), the text
  starts with it; so the prompt text is exactly what the model sees, and is tokenized
  with `add_special_tokens=False` everywhere (training here, generation in evaluate).
- target: `row[dataset.response_field]` + the eos token. Prompt and response are
  tokenized separately, as generation sees them: the prompt, then new tokens.
- labels: -100 on every prompt token, so the loss is on the response only.
- truncation to `train.max_seq_len`: the response is kept and the prompt is cut from the
  left (after its bos token), because the end of a prompt (the question and the
  "### Response:" cue) is what the answer depends on. If the response alone would leave
  the prompt fewer than `max_seq_len // 2` tokens, the prompt keeps its last
  `max_seq_len // 2` tokens and the response is cut from the right (losing its eos).
- split: `eval_size` rows (a count, or a fraction of the rows) are held out, the rest
  train, drawn with `random.Random(dataset.split_seed)`. When there is a label set, the
  split is stratified on the reference (each label, and the rows whose answer is not a
  label, keep their share in both parts), and the eval rows are interleaved so that any
  prefix keeps it. `dataset.max_train_samples` then caps the training rows,
  `eval.max_samples` the eval rows (a prefix of each).
- packing (`dataset.packing`): whole training examples are laid end to end into
  sequences of at most `max_seq_len` tokens (an example is never split across two), with
  their label masks unchanged. Attention crosses example boundaries inside a sequence, as
  in the classic packed-SFT recipe; eval data is never packed.

Rows whose response is null or empty are dropped (with a warning): an empty target
teaches nothing and has no reference to score against.
"""

from __future__ import annotations

import logging
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_ray.config import ConfigError, DatasetConfig, ExperimentConfig, problem
from qlora_ray.datacheck import is_local, read_rows

if TYPE_CHECKING:
    import datasets
    import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value transformers' loss skips
# `eval.labels: auto`: answers of at most this many words seen at least this often, and at
# most this many such values (see `auto_labels`).
AUTO_LABEL_MAX_WORDS = 3
AUTO_LABEL_MIN_COUNT = 3
AUTO_LABEL_MAX_CLASSES = 10


@dataclass
class PreparedData:
    train: datasets.Dataset  # input_ids, attention_mask, labels (prompt tokens = -100)
    eval: datasets.Dataset  # same, unpacked, for the eval loss on the held-out rows
    # Prompt text of the held-out rows, chat template and bos included, never truncated:
    # tokenize it with add_special_tokens=False to get what the model saw in training.
    eval_prompts: list[str]
    eval_references: list[str]  # their reference answers
    labels: list[str] | None  # label set for accuracy/F1, or None
    labels_note: str | None  # why `eval.labels: auto` found no label set
    num_train_tokens: int  # non-padding tokens in one epoch of train
    stats: dict[str, int] = field(default_factory=dict)  # rows, dropped, truncated, ...


# ----------------------------------------------------------------------------- loading


def load_rows(cfg: DatasetConfig) -> list[dict[str, Any]]:
    """Every row of a local file (.jsonl/.json/.csv/.parquet) or of a hub dataset's split."""
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        ds = _load(cfg, str(path), split=cfg.split)
    elif is_local(cfg.path):
        # The same reader `plan` checked the file with, so what was checked is what trains.
        # The whole file is the data; `dataset.split` only selects a split of hub datasets.
        return read_rows(cfg.path)
    else:
        ds = _load(cfg, cfg.path, cfg.subset, split=cfg.split)
    import datasets

    if not isinstance(ds, datasets.Dataset):
        raise ConfigError([problem("dataset.split", cfg.split, "did not select one split",
                                   "name a split such as train")])
    rows = ds.to_list()
    if not rows:
        raise ConfigError([problem("dataset.path", cfg.path, "has no rows", "give a dataset with rows")])
    return rows


def _load(cfg: DatasetConfig, *args: Any, **kwargs: Any) -> Any:
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as e:
        # Not found on the hub, offline, unknown split, or a file that does not parse.
        raise ConfigError([problem(
            "dataset.path", cfg.path, f"could not be loaded ({type(e).__name__}: {e})",
            "check the file's format, or the hub name, `dataset.subset`, `dataset.split` and the network",
        )]) from e


# -------------------------------------------------------------------------- validation


class _BlankMissing(dict):
    """A row for `format_map`: a column the row lacks formats as empty text."""

    def __missing__(self, key: str) -> str:
        return ""


def template_columns(template: str) -> list[str]:
    """Column names a prompt template refers to (`{a}`, `{a[0]}` and `{a.b}` all name `a`)."""
    names = []
    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name is not None:
            names.append(re.split(r"[.\[]", field_name, maxsplit=1)[0])
    return list(dict.fromkeys(names))


def _response(row: dict[str, Any], response_field: str) -> str | None:
    value = row.get(response_field)
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None


def check_rows(rows: list[dict[str, Any]], cfg: DatasetConfig) -> tuple[list[dict[str, Any]], int]:
    """(rows with a response, number dropped); raises on a template or column the data lacks."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    problems = []
    for name in template_columns(cfg.prompt_template):
        if name == "" or name.isdigit():
            problems.append(problem("dataset.prompt_template", cfg.prompt_template,
                                    "has a positional placeholder ({} or {0})",
                                    f"name a column instead, one of: {', '.join(columns)}"))
        elif name not in columns:
            problems.append(problem("dataset.prompt_template", cfg.prompt_template,
                                    f"uses {{{name}}}, which no row has",
                                    f"use the dataset's columns: {', '.join(columns)}"))
    if cfg.response_field not in columns:
        problems.append(problem("dataset.response_field", cfg.response_field,
                                "is not a column of the dataset",
                                f"set it to the answer column, one of: {', '.join(columns)}"))
    if problems:
        raise ConfigError(problems)
    kept = [row for row in rows if _response(row, cfg.response_field) is not None]
    dropped = len(rows) - len(kept)
    if not kept:
        raise ConfigError([problem("dataset.response_field", cfg.response_field,
                                   "is empty in every row", "point it at the column with the answers")])
    if dropped:
        log.warning("dropped %d of %d rows whose %r is null or empty", dropped, len(rows),
                    cfg.response_field)
    return kept, dropped


# ------------------------------------------------------------------------------ split


def eval_count(n_rows: int, eval_size: int | float) -> int:
    """Rows to hold out: a count as given, or a fraction of the rows (at least one)."""
    if isinstance(eval_size, float):
        return max(1, round(n_rows * eval_size))
    return eval_size


def split_indices(
    n_rows: int, eval_size: int | float, seed: int, strata: Sequence[str] | None = None
) -> tuple[list[int], list[int]]:
    """(train, eval) row indices, disjoint and seeded.

    Without `strata`: a seeded shuffle, eval taken from its front. With `strata` (one key
    per row, e.g. the reference label): each stratum gives the eval split its share of the
    rows (largest remainder), so the eval classes are in the data's proportions; the eval
    rows are interleaved across strata so that every prefix (`eval.max_samples`) keeps those
    proportions too. Train is the rest, shuffled.
    """
    k = eval_count(n_rows, eval_size)
    if k >= n_rows:
        raise ConfigError([problem("dataset.eval_size", eval_size,
                                   f"must leave rows to train on (the dataset has {n_rows} usable rows)",
                                   "hold out fewer rows, or a fraction such as 0.1")])
    rng = random.Random(seed)
    if strata is None:
        order = list(range(n_rows))
        rng.shuffle(order)
        return order[k:], order[:k]
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(strata):
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        rng.shuffle(members)
    shares = {key: k * len(members) / n_rows for key, members in groups.items()}
    take = {key: int(share) for key, share in shares.items()}
    by_remainder = sorted(groups, key=lambda key: -(shares[key] - take[key]))  # stable: ties in order
    for key in by_remainder[: k - sum(take.values())]:
        take[key] += 1
    # Interleave: the j-th eval row of a stratum holding m of them sits at (j + 0.5) / m.
    placed = [((j + 0.5) / take[key], g, groups[key][j])
              for g, key in enumerate(groups) for j in range(take[key])]
    held_out = [i for _, _, i in sorted(placed)]
    train = [i for key, members in groups.items() for i in members[take[key]:]]
    rng.shuffle(train)
    return train, held_out


def label_strata(answers: Sequence[str], labels: Sequence[str] | None) -> list[str] | None:
    """The stratum of each row: its label (ignoring case) when its answer is one, else ""."""
    if not labels:
        return None
    known = {label.strip().lower() for label in labels}
    return [a.strip().lower() if a.strip().lower() in known else "" for a in answers]


# ---------------------------------------------------------------------------- labels


def auto_labels(answers: Sequence[str]) -> tuple[list[str] | None, str | None]:
    """(label set, None), or (None, a note saying why there is none).

    A label set is inferred only when a few values cover most rows, as in a classification
    task: answers of at most three words seen at least three times (counted ignoring case;
    each label keeps its most common spelling), 2 to `AUTO_LABEL_MAX_CLASSES` of them, on at
    least half of the rows. On free-text answers a handful of repeats ("Paris", "Yes") is
    not a task with labels, and accuracy over just those rows would mislead.
    """
    spellings: dict[str, Counter[str]] = {}
    for a in answers:
        text = a.strip()
        if text and len(text.split()) <= AUTO_LABEL_MAX_WORDS:
            spellings.setdefault(text.lower(), Counter())[text] += 1
    frequent = {k: c for k, c in spellings.items() if c.total() >= AUTO_LABEL_MIN_COUNT}
    covered = sum(c.total() for c in frequent.values())
    shown = ", ".join(repr(c.most_common(1)[0][0]) for c in list(frequent.values())[:5])
    fix = "set `eval.labels` to the list of labels to score accuracy/F1"
    if len(frequent) < 2:
        return None, (f"eval.labels auto: no label set (fewer than two short answers repeat "
                      f"{AUTO_LABEL_MIN_COUNT}+ times); {fix}")
    if len(frequent) > AUTO_LABEL_MAX_CLASSES or covered * 2 < len(answers):
        return None, (f"eval.labels auto: no label set: the {len(frequent)} short answers seen "
                      f"{AUTO_LABEL_MIN_COUNT}+ times ({shown}{', ...' if len(frequent) > 5 else ''}) "
                      f"cover {covered} of {len(answers)} rows, which is not a few values covering "
                      f"most rows (at most {AUTO_LABEL_MAX_CLASSES} values, half the rows); {fix}")
    return sorted(c.most_common(1)[0][0] for c in frequent.values()), None


def label_set(setting: tuple[str, ...] | str, answers: Sequence[str]) -> tuple[list[str] | None, str | None]:
    """`eval.labels`: a list as given, `none` -> None, `auto` -> `auto_labels(answers)`;
    with a note when `auto` found no label set."""
    if setting == "none":
        return None, None
    if setting == "auto":
        return auto_labels(answers)
    return list(setting), None


# ------------------------------------------------------------------------ formatting


class PromptFormatter:
    """Row -> prompt text, the same way for training and for generation."""

    def __init__(self, cfg: DatasetConfig, tokenizer: Any):
        self.cfg = cfg
        self.tokenizer = tokenizer
        if cfg.chat_template and not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ConfigError([problem("dataset.chat_template", True,
                                       f"needs a tokenizer with a chat template, and {name!r} has none",
                                       "set it to false to use `dataset.prompt_template` as is")])
        # Chat templates write their own bos; otherwise add it as text if the tokenizer would.
        self.bos_text = "" if cfg.chat_template else _bos_text(tokenizer)

    def __call__(self, row: dict[str, Any], index: int) -> str:
        values = _BlankMissing({k: "" if v is None else v for k, v in row.items()})
        try:
            text = self.cfg.prompt_template.format_map(values)
        except (IndexError, KeyError, AttributeError, ValueError, TypeError) as e:
            raise ConfigError([problem("dataset.prompt_template", self.cfg.prompt_template,
                                       f"fails on row {index} ({type(e).__name__}: {e})",
                                       "fix the placeholder, or the data in that row")]) from e
        if self.cfg.chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return self.bos_text + text


def _bos_text(tokenizer: Any) -> str:
    bos_id = tokenizer.bos_token_id
    if bos_id is None or tokenizer("a")["input_ids"][:1] != [bos_id]:
        return ""  # the tokenizer does not add one (e.g. Qwen); neither do we
    if tokenizer(tokenizer.bos_token, add_special_tokens=False)["input_ids"] != [bos_id]:
        log.warning("the bos token %r does not tokenize back to itself; prompts go without it",
                    tokenizer.bos_token)
        return ""
    return tokenizer.bos_token


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


def encode(
    tokenizer: Any, prompts: list[str], responses: list[str], max_len: int
) -> tuple[list[dict[str, list[int]]], int]:
    """Tokenized examples (labels -100 on the prompt) and how many were truncated."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos_id = tokenizer.bos_token_id
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"] if responses else []
    examples, truncated = [], 0
    for p, r in zip(prompt_ids, response_ids, strict=True):
        head = 1 if p[:1] == [bos_id] and bos_id is not None else 0
        p2, r2 = truncate(list(p), list(r) + eos, max_len, head)
        truncated += (len(p2), len(r2)) != (len(p), len(r) + len(eos))
        examples.append({
            "input_ids": p2 + r2,
            "attention_mask": [1] * (len(p2) + len(r2)),
            "labels": [IGNORE_INDEX] * len(p2) + r2,
        })
    return examples, truncated


def pack(examples: list[dict[str, list[int]]], max_len: int) -> list[dict[str, list[int]]]:
    """Lay whole examples end to end into sequences of at most `max_len` tokens, in order."""
    packed: list[dict[str, list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        if ids and len(ids) + len(ex["input_ids"]) > max_len:
            packed.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
            ids, labels = [], []
        ids = ids + ex["input_ids"]
        labels = labels + ex["labels"]
    if ids:
        packed.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return packed


def _to_dataset(examples: list[dict[str, list[int]]]) -> datasets.Dataset:
    import datasets

    columns = ("input_ids", "attention_mask", "labels")
    return datasets.Dataset.from_dict({c: [ex[c] for ex in examples] for c in columns})


# ------------------------------------------------------------------------------- main


def prepare_data(cfg: ExperimentConfig, tokenizer: Any) -> PreparedData:
    """Load, check, split, format and tokenize the experiment's dataset."""
    d = cfg.dataset
    rows, dropped = check_rows(load_rows(d), d)
    answers = [_response(row, d.response_field) or "" for row in rows]
    labels, labels_note = label_set(cfg.eval.labels, answers)
    if labels_note:
        log.warning("%s", labels_note)
    train_idx, eval_idx = split_indices(len(rows), d.eval_size, d.split_seed,
                                        label_strata(answers, labels))
    if d.max_train_samples is not None:
        train_idx = train_idx[: d.max_train_samples]
    if cfg.eval.max_samples is not None:
        eval_idx = eval_idx[: cfg.eval.max_samples]

    fmt = PromptFormatter(d, tokenizer)
    max_len = cfg.train.max_seq_len
    train_examples, train_cut = encode(
        tokenizer, [fmt(rows[i], i) for i in train_idx], [answers[i] for i in train_idx], max_len
    )
    eval_prompts = [fmt(rows[i], i) for i in eval_idx]
    eval_references = [answers[i] for i in eval_idx]
    eval_examples, eval_cut = encode(tokenizer, eval_prompts, eval_references, max_len)
    num_train_tokens = sum(len(ex["input_ids"]) for ex in train_examples)
    if d.packing:
        train_examples = pack(train_examples, max_len)
    if train_cut or eval_cut:
        log.warning("truncated %d train and %d eval examples to train.max_seq_len=%d",
                    train_cut, eval_cut, max_len)

    stats = {"rows": len(rows) + dropped, "rows_dropped": dropped, "train_rows": len(train_idx),
             "eval_rows": len(eval_idx), "train_sequences": len(train_examples),
             "train_truncated": train_cut, "eval_truncated": eval_cut}
    log.info("data: %s; labels %s", stats, labels)
    return PreparedData(
        train=_to_dataset(train_examples),
        eval=_to_dataset(eval_examples),
        eval_prompts=eval_prompts,
        eval_references=eval_references,
        labels=labels,
        labels_note=labels_note,
        num_train_tokens=num_train_tokens,
        stats=stats,
    )


# ---------------------------------------------------------------------------- collate


@dataclass
class PadCollator:
    """Right-pads input_ids (pad id), attention_mask (0) and labels (-100) to the longest."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
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


def make_collator(tokenizer: Any, pad_to_multiple_of: int | None = None) -> Callable[..., Any]:
    """The batch collator for `PreparedData.train`/`.eval`; pads on the right."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        # The pad value never reaches the loss (labels are -100 there) or attention (mask 0).
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return PadCollator(pad_id, pad_to_multiple_of)
