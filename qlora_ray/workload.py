"""How many tokens a cell trains and evaluates on, read from its data at plan time.

The same pass the worker makes (`data.check_rows`, `split_indices`, `PromptFormatter`,
`encode`, `pack`), with the model's own `tokenizer.json` through the `tokenizers` library
(neither torch nor transformers: planning stays fast). Where the tokenizer is looked for:
the built-in model's cache folder, a local model folder, `--model-configs DIR/<hub id>/`,
then the Hugging Face cache. Without one, lengths are estimated at 4 bytes of text per token
(`BYTES_PER_TOKEN`, English BPE) and `DataLengths.estimated` says so. Hub datasets are not
read at plan time (that would download them): such cells get no time prediction.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_ray.config import BUILTIN_PREFIX, ConfigError, DatasetConfig, ExperimentConfig, ModelConfig
from qlora_ray.data import (
    PromptFormatter,
    check_rows,
    encode,
    generation_prompts,
    label_set,
    label_strata,
    pack,
    split_indices,
)
from qlora_ray.datacheck import is_local, read_rows
from qlora_ray.throughput import expected_batch_max, grouped_batch_max

log = logging.getLogger(__name__)

BYTES_PER_TOKEN = 4
# Stands in for a chat template the planner cannot find (the worker's tokenizer is the one
# that decides whether it exists): a role header around the message, as most templates do.
GENERIC_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class DataLengths:
    """Token counts of one cell's data, as training and evaluation will see them."""

    # Tokens per training sequence after truncation (and packing): one epoch.
    train: tuple[int, ...]
    # Prompt tokens of each evaluated row (generation input).
    eval_prompts: tuple[int, ...]
    # Prompt + answer tokens of each evaluated row (the eval loss pass).
    eval_examples: tuple[int, ...]
    # Tokens of each reference answer (embedded for the similarity score).
    references: tuple[int, ...]
    # True when no tokenizer was found and lengths are bytes / BYTES_PER_TOKEN.
    estimated: bool
    _memo: dict[tuple[str, int, bool], float] = field(default_factory=dict, compare=False, repr=False)

    @property
    def train_tokens(self) -> int:
        return sum(self.train)

    def batch_max(self, which: str, batch_size: int, grouped: bool = False) -> float:
        """Expected padded length of a random batch of `which` (`train`, `eval_prompts`, ...);
        `grouped`: of a length-grouped one (`train.group_by_length`).

        Memoized: a grid asks the same few questions of the same data for every cell.
        """
        key = (which, batch_size, grouped)
        if key not in self._memo:
            rule = grouped_batch_max if grouped else expected_batch_max
            self._memo[key] = rule(getattr(self, which), batch_size)
        return self._memo[key]


class _Tokenizer:
    """The slice of a transformers tokenizer that `data.py` calls, over `tokenizers`."""

    def __init__(self, backend: Any | None, config: dict[str, Any], chat_template: str | None):
        self.backend = backend
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = self._id(self.bos_token)
        self.eos_token_id = self._id(self.eos_token)
        self.chat_template = chat_template or config.get("chat_template") or GENERIC_CHAT_TEMPLATE
        self.name_or_path = "tokenizer.json"

    def _id(self, token: str | None) -> int | None:
        if token is None:
            return None
        if self.backend is None:
            return 0
        return self.backend.token_to_id(token)

    def __call__(self, texts: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        batch = [texts] if isinstance(texts, str) else list(texts)
        if self.backend is None:
            ids = [[0] * max(1, -(-len(t.encode()) // BYTES_PER_TOKEN)) for t in batch]
        else:
            ids = [e.ids for e in self.backend.encode_batch(batch, add_special_tokens=add_special_tokens)]
        return {"input_ids": ids[0] if isinstance(texts, str) else ids}

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        import jinja2

        template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(
            self.chat_template or "")
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # older tokenizer_config.json: {"content": "<s>", ...}
        return value.get("content")
    return value if isinstance(value, str) else None


def _tokenizer_folder(model: str, revision: str | None, search: Sequence[str | Path]) -> Path | None:
    """The folder holding the model's tokenizer.json, without downloading anything."""
    candidates: list[Path] = []
    if model.startswith(BUILTIN_PREFIX):
        from qlora_ray.builtin import builtin_dir

        candidates.append(builtin_dir(model))
    else:
        candidates.append(Path(model).expanduser())
        for folder in search:
            candidates += [Path(folder) / model, Path(folder) / model.replace("/", "--")]
    for folder in candidates:
        if (folder / "tokenizer.json").is_file():
            return folder
    if model.startswith(BUILTIN_PREFIX) or Path(model).expanduser().exists():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "tokenizer.json", revision=revision)
    except Exception:  # not a valid repo id, no cache: no tokenizer, an estimate
        return None
    return Path(found).parent if isinstance(found, str) else None


def load_tokenizer(model: str, revision: str | None, search: Sequence[str | Path]) -> _Tokenizer:
    folder = _tokenizer_folder(model, revision, search)
    if folder is None:
        return _Tokenizer(None, {"bos_token": None, "eos_token": "</s>"}, None)
    from tokenizers import Tokenizer

    config: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text())
    jinja = folder / "chat_template.jinja"
    template = jinja.read_text() if jinja.is_file() else None
    return _Tokenizer(Tokenizer.from_file(str(folder / "tokenizer.json")), config, template)


def read_local_rows(path: str) -> list[dict[str, Any]] | None:
    """Rows of a local .jsonl/.json/.csv/.parquet file; None for anything else (hub names).

    The reader `plan` checks files with and the worker trains from (`datacheck.read_rows`),
    so the counted rows are the trained ones; a broken file raises its ConfigError.
    """
    if not Path(path).expanduser().is_file() or not is_local(path):
        return None
    return read_rows(path)


@functools.lru_cache(maxsize=64)
def _cached(model: ModelConfig, d: DatasetConfig, max_len: int, eval_max: int | None,
            search: tuple[str, ...], labels_setting: tuple[str, ...] | str = "auto",
            max_new_tokens: int = 0) -> DataLengths | None:
    rows = read_local_rows(d.path)
    if rows is None:
        return None
    rows, _ = check_rows(rows, d)
    answers = [str(row[d.response_field]) for row in rows]
    labels, _ = label_set(labels_setting, answers)  # the worker stratifies the split on them
    train_idx, eval_idx = split_indices(len(rows), d.eval_size, d.split_seed, label_strata(answers, labels))
    if d.max_train_samples is not None:
        train_idx = train_idx[: d.max_train_samples]
    if eval_max is not None:
        eval_idx = eval_idx[:eval_max]
    tokenizer = load_tokenizer(model.name, model.revision, search)
    fmt = PromptFormatter(d, tokenizer)
    train, _ = encode(tokenizer, [fmt(rows[i], i) for i in train_idx],
                      [answers[i] for i in train_idx], max_len)
    if d.packing:
        train = pack(train, max_len)
    prompts = [fmt(rows[i], i) for i in eval_idx]
    references = [answers[i] for i in eval_idx]
    examples, _ = encode(tokenizer, prompts, references, max_len)

    def sizes(texts: list[str]) -> tuple[int, ...]:
        return tuple(sorted(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]))

    prompt_ids, _ = generation_prompts(tokenizer, prompts, max_len, max_new_tokens)  # cut like the worker's
    return DataLengths(
        train=tuple(sorted(len(ex["input_ids"]) for ex in train)),
        eval_prompts=tuple(sorted(len(ids) for ids in prompt_ids)),
        eval_examples=tuple(sorted(len(ex["input_ids"]) for ex in examples)),
        references=sizes(references),
        estimated=tokenizer.backend is None,
    )


def data_lengths(cfg: ExperimentConfig, search: Sequence[str | Path] = ()) -> DataLengths | None:
    """Token lengths of `cfg`'s data; None when the data is not a readable local file.

    Only the fields that decide lengths key the cache, so a 1,000-cell grid over ranks and
    GPUs tokenizes its data once. A spec error in the data (a template column no row has)
    raises ConfigError, as it would in the worker, but before any GPU is used.
    """
    try:
        return _cached(cfg.model, cfg.dataset, cfg.train.max_seq_len, cfg.eval.max_samples,
                       tuple(str(s) for s in search), cfg.eval.labels, cfg.eval.max_new_tokens)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("could not read %s for the time prediction: %s", cfg.dataset.path, e)
        return None
