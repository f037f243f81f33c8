"""The tokenized data of a cell, kept on disk for the next cell that needs the same.

A grid's cells mostly differ in what they do with the data (rank, batch size, dtype, GPU),
not in the data: each one read, checked, split, formatted and tokenized the same file
again. `prepared` builds the data once per key and hands every later cell a copy from
`$QLORA_RAY_CACHE/data/<key>/` (default ~/.cache/qlora-ray).

The key is a content hash of everything `data.prepare_data` reads: the dataset file's
bytes, the `dataset` and `eval` sections and `train.max_seq_len` as resolved, the
tokenizer (its serialized vocabulary, merges, normalizer and pre/post-processing, special
tokens and chat template), and the source of the modules that turn rows into tokens, so
an edit to any of them builds anew. Datasets from the hub or a folder are not cached
(their content is not known without loading them).

Concurrent cells: a cell writes a new entry into a private folder and renames it into
place; a rename onto an existing entry fails and the loser drops its copy, so a reader
only ever sees a whole entry. `QLORA_RAY_DATA_CACHE=0` turns the cache off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlora_ray import builtin
from qlora_ray.config import ExperimentConfig, to_dict
from qlora_ray.datacheck import is_local

log = logging.getLogger(__name__)

CACHE_ENV = builtin.CACHE_ENV
ENABLED_ENV = "QLORA_RAY_DATA_CACHE"
# The modules whose code decides the tokens: a change to any of them changes the key.
CODE = ("data.py", "encoding.py", "datacheck.py", "datacache.py")
TABLES = ("train", "eval")


def cache_root() -> Path:
    return builtin.cache_root() / "data"  # the same $QLORA_RAY_CACHE as the built-in models


def key(cfg: ExperimentConfig, tokenizer: Any) -> str | None:
    """The entry's name, or None when the data cannot be cached (not a local file)."""
    path = Path(cfg.dataset.path).expanduser()
    if not is_local(cfg.dataset.path) or not path.is_file():
        return None
    h = hashlib.sha256()
    h.update(hashlib.sha256(path.read_bytes()).digest())
    config = to_dict(cfg)
    h.update(json.dumps({"dataset": config["dataset"], "eval": config["eval"],
                         "max_seq_len": cfg.train.max_seq_len}, sort_keys=True, default=str).encode())
    h.update(_tokenizer_fingerprint(tokenizer).encode())
    here = Path(__file__).parent
    for name in CODE:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:32]


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return json.dumps([type(tokenizer).__name__, body, tokenizer.chat_template, tokenizer.padding_side,
                       tokenizer.truncation_side, sorted(tokenizer.special_tokens_map.items(), key=str)],
                      default=str)


def prepared(cfg: ExperimentConfig, tokenizer: Any, build: Callable[[ExperimentConfig, Any], Any]) -> Any:
    """`build(cfg, tokenizer)` (a `data.PreparedData`), from the cache when it holds the key.

    The result's `cached` says which. A cache that cannot be read or written costs the build,
    never the cell.
    """
    name = key(cfg, tokenizer) if os.environ.get(ENABLED_ENV, "1") != "0" else None
    if name is None:
        return build(cfg, tokenizer)
    entry = cache_root() / name
    if (entry / "meta.json").exists():
        try:
            return _read(entry)
        except Exception:
            log.warning("could not read the cached data %s; building it", entry, exc_info=True)
    # What the build logs (truncation, label notes) is kept with the entry and said again
    # on every hit: each cell's log tells its own story.
    said = _Said()
    logging.getLogger("qlora_ray").addHandler(said)
    try:
        data = build(cfg, tokenizer)
    finally:
        logging.getLogger("qlora_ray").removeHandler(said)
    try:
        _write(entry, data, said.records)
    except Exception:
        log.warning("could not cache the tokenized data in %s", entry, exc_info=True)
    return data


class _Said(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))


def _write(entry: Path, data: Any, said: list[tuple[str, int, str]]) -> None:
    import pyarrow.parquet as pq

    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = entry.parent / f".{entry.name}.{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        meta = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)
                if f.name not in (*TABLES, "cached")}
        (staging / "meta.json").write_text(json.dumps({"data": meta, "said": said}))
        for table in TABLES:
            pq.write_table(getattr(data, table).data.table, staging / f"{table}.parquet")
        with contextlib.suppress(OSError):  # another cell put the same entry in place first
            os.rename(staging, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read(entry: Path) -> Any:
    import datasets
    import pyarrow.parquet as pq

    from qlora_ray.data import PreparedData

    meta = json.loads((entry / "meta.json").read_text())
    tables = {t: datasets.Dataset(pq.read_table(entry / f"{t}.parquet")) for t in TABLES}
    data = PreparedData(**tables, **meta["data"], cached=True)
    for name, level, message in meta["said"]:
        logging.getLogger(name).log(level, "%s", message)
    return data
