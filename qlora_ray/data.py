"""Training and eval data: load, format, split, label set (token ids: encoding.py).

    data = prepare_data(cfg, tokenizer)      # cfg: ExperimentConfig
    trainer = Trainer(..., train_dataset=data.train, eval_dataset=data.eval,
                      data_collator=make_collator(tokenizer))

What a row becomes (prompt, target, labels, truncation, split, packing): docs/data.md.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_ray.config import ConfigError, DatasetConfig, ExperimentConfig, problem
from qlora_ray.datacheck import is_local, read_rows, template_problems

# PadCollator, make_collator and truncate are re-exported for callers of this module.
from qlora_ray.encoding import IGNORE_INDEX, answer_suffix, encode, generation_prompts, pack
from qlora_ray.encoding import PadCollator as PadCollator
from qlora_ray.encoding import make_collator as make_collator
from qlora_ray.encoding import truncate as truncate

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

# `eval.labels: auto`: answers of at most this many words seen at least this often, and at
# most this many such values (see `auto_labels`).
AUTO_LABEL_MAX_WORDS = 3
AUTO_LABEL_MIN_COUNT = 3
AUTO_LABEL_MAX_CLASSES = 10


@dataclass
class PreparedData:
    train: datasets.Dataset  # input_ids, attention_mask, labels (prompt tokens = -100)
    eval: datasets.Dataset  # same, unpacked, for the eval loss on the held-out rows
    # Prompt text of the held-out rows, chat template and bos included, as generation sees
    # it (cut like training prompts when too long, see `generation_prompts`).
    eval_prompts: list[str]
    eval_prompt_ids: list[list[int]]  # the same as token ids: what `generate` is given
    eval_references: list[str]  # their reference answers
    labels: list[str] | None  # label set for accuracy/F1, or None
    labels_note: str | None  # why `eval.labels: auto` found no label set
    end_of_answer_ids: list[int]  # the token an answer ends with (eos, or the chat turn's end)
    num_train_tokens: int  # non-padding tokens in one epoch of train
    stats: dict[str, int] = field(default_factory=dict)  # rows, dropped, truncated, ...
    cached: bool = False  # read from the tokenized-data cache (datacache.py), not built here


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


def _response(row: dict[str, Any], response_field: str) -> str | None:
    value = row.get(response_field)
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None


def check_rows(rows: list[dict[str, Any]], cfg: DatasetConfig) -> tuple[list[dict[str, Any]], int]:
    """(rows with a response, number dropped); raises on a template or column the data lacks."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    problems = template_problems(cfg.prompt_template, columns, "", f", one of: {', '.join(columns)}")
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


def _to_dataset(examples: list[dict[str, list[int]]]) -> datasets.Dataset:
    import datasets

    columns = list(examples[0]) if examples else ["input_ids", "attention_mask", "labels"]
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
    suffix, end_of_answer = answer_suffix(tokenizer, d.chat_template)
    train_examples, train_cut = encode(
        tokenizer, [fmt(rows[i], i) for i in train_idx], [answers[i] for i in train_idx], max_len, suffix
    )
    eval_prompts = [fmt(rows[i], i) for i in eval_idx]
    eval_references = [answers[i] for i in eval_idx]
    eval_examples, eval_cut = encode(tokenizer, eval_prompts, eval_references, max_len, suffix)
    prompt_ids, prompts_cut = generation_prompts(tokenizer, eval_prompts, max_len, cfg.eval.max_new_tokens)
    # A cut prompt is shown as what the model saw.
    eval_prompts = [text if len(ids) == len(full) else tokenizer.decode(ids)
                    for text, ids, full in zip(eval_prompts, prompt_ids,
                                               tokenizer(eval_prompts, add_special_tokens=False)["input_ids"]
                                               if eval_prompts else [], strict=True)]
    long_references = sum(len(ex["labels"]) - ex["labels"].count(IGNORE_INDEX) - len(suffix)
                          > cfg.eval.max_new_tokens for ex in eval_examples)
    num_train_tokens = sum(len(ex["input_ids"]) for ex in train_examples)
    if d.packing:
        train_examples = pack(train_examples, max_len)
    if train_cut or eval_cut or prompts_cut:
        log.warning("truncated %d train and %d eval examples and %d generation prompts to "
                    "train.max_seq_len=%d", train_cut, eval_cut, prompts_cut, max_len)
    if long_references:
        log.warning("%d of %d reference answers are longer than eval.max_new_tokens=%d tokens: "
                    "their generations are cut short; raise eval.max_new_tokens",
                    long_references, len(eval_examples), cfg.eval.max_new_tokens)

    stats = {"rows": len(rows) + dropped, "rows_dropped": dropped, "train_rows": len(train_idx),
             "eval_rows": len(eval_idx), "train_examples": len(train_idx),
             "train_sequences": len(train_examples),
             "train_truncated": train_cut, "eval_truncated": eval_cut,
             "eval_prompts_truncated": prompts_cut,
             "eval_references_over_max_new_tokens": long_references}
    log.info("data: %s; labels %s", stats, labels)
    return PreparedData(
        train=_to_dataset(train_examples),
        eval=_to_dataset(eval_examples),
        eval_prompts=eval_prompts,
        eval_prompt_ids=prompt_ids,
        eval_references=eval_references,
        labels=labels,
        labels_note=labels_note,
        end_of_answer_ids=end_of_answer,
        num_train_tokens=num_train_tokens,
        stats=stats,
    )
