"""datacache.py: a cell whose data an earlier cell tokenized reads it back, identical; any
change to what the tokens depend on builds anew; racing cells never see half an entry."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from qlora_ray import datacache
from qlora_ray.config import ExperimentConfig, from_dict
from qlora_ray.data import prepare_data

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "experiments" / "data" / "fin_sentiment.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from qlora_ray.builtin import ensure_builtin

    return AutoTokenizer.from_pretrained(ensure_builtin("builtin:tiny-llama"))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(datacache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(datacache.ENABLED_ENV, raising=False)
    return tmp_path / "cache" / "data"


def config(path: Path = DATA, **changes) -> ExperimentConfig:
    cfg = from_dict(ExperimentConfig, {"dataset": {"path": str(path), "eval_size": 16},
                                       "train": {"max_seq_len": 48}})
    return cfg.replace(**changes) if changes else cfg


def counting_build():
    calls = []

    def build(cfg, tok):
        calls.append(cfg)
        return prepare_data(cfg, tok)

    return build, calls


def test_the_second_cell_reads_what_the_first_built_and_says_the_same(tokenizer, cache, caplog):
    build, calls = counting_build()
    with caplog.at_level(logging.INFO, logger="qlora_ray"):
        first = datacache.prepared(config(), tokenizer, build)
        said_first = [r.getMessage() for r in caplog.records if r.name == "qlora_ray.data"]
        caplog.clear()
        # Another cell of the grid: a different rank and batch size, the same data.
        second = datacache.prepared(config(**{"lora.r": 64, "train.batch_size": 8}), tokenizer, build)
        said_second = [r.getMessage() for r in caplog.records if r.name == "qlora_ray.data"]
    assert len(calls) == 1 and not first.cached and second.cached
    assert second.train.to_list() == first.train.to_list() and second.eval.to_list() == first.eval.to_list()
    assert second.train.features == first.train.features
    for field in ("eval_prompts", "eval_prompt_ids", "eval_references", "labels", "labels_note",
                  "end_of_answer_ids", "num_train_tokens", "stats"):
        assert getattr(second, field) == getattr(first, field), field
    # The truncation warning (max_seq_len 48 cuts these rows) is in each cell's log.
    assert any("truncated" in m for m in said_first) and said_second == said_first
    assert len(list(cache.iterdir())) == 1


@pytest.mark.parametrize("change", [{"train.max_seq_len": 64}, {"dataset.eval_size": 8},
                                    {"dataset.prompt_template": "Q: {instruction} {input}\nA:"}, {"eval.max_samples": 4},
                                    {"dataset.packing": True}])
def test_what_the_tokens_depend_on_is_in_the_key(tokenizer, change):
    build, calls = counting_build()
    datacache.prepared(config(), tokenizer, build)
    assert not datacache.prepared(config(**change), tokenizer, build).cached
    assert len(calls) == 2


def test_an_edited_file_or_another_tokenizer_builds_anew(tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(DATA.read_text())
    build, calls = counting_build()
    datacache.prepared(config(path), tokenizer, build)
    path.write_text(DATA.read_text().replace("positive", "upbeat"))
    assert not datacache.prepared(config(path), tokenizer, build).cached
    other = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    other.chat_template = "{{ messages[0]['content'] }}"
    assert not datacache.prepared(config(path), other, build).cached
    assert len(calls) == 3


def test_a_cell_that_loses_the_race_keeps_the_winners_entry(tokenizer, cache):
    data = prepare_data(config(), tokenizer)
    entry = cache / datacache.key(config(), tokenizer)
    datacache._write(entry, data, [])
    before = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    datacache._write(entry, data, [])  # the rename onto a whole entry fails; nothing changes
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == before
    assert [p.name for p in cache.iterdir()] == [entry.name]  # no staging folder left behind


def test_off_or_not_a_local_file_means_no_cache(tokenizer, cache, monkeypatch):
    build, calls = counting_build()
    monkeypatch.setenv(datacache.ENABLED_ENV, "0")
    datacache.prepared(config(), tokenizer, build)
    datacache.prepared(config(), tokenizer, build)
    assert len(calls) == 2 and not cache.exists()
    assert datacache.key(config(**{"dataset.path": "someone/some-hub-dataset"}), tokenizer) is None
