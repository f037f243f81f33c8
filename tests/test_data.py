"""data.py: what a row becomes (prompt, loss mask, split, packing, labels) and its errors.

Uses the builtin tiny-llama tokenizer (built once into the tests' cache: tests/conftest.py).
"""

from __future__ import annotations

import itertools
import json
import runpy
from collections import Counter
from pathlib import Path

import pytest
from conftest import DATA, ROOT

from qlora_ray.config import DEFAULT_PROMPT_TEMPLATE, ConfigError, ExperimentConfig, from_dict
from qlora_ray.data import (
    IGNORE_INDEX,
    auto_labels,
    label_set,
    load_rows,
    make_collator,
    prepare_data,
    split_indices,
    truncate,
)

CORPUS = ROOT / "qlora_ray" / "assets" / "tiny_corpus.txt"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from qlora_ray.builtin import ensure_builtin

    return AutoTokenizer.from_pretrained(ensure_builtin("builtin:tiny-llama"))


def config(path: Path | str = DATA, **dataset) -> ExperimentConfig:
    extra = {k: dataset.pop(k) for k in list(dataset) if "." in k}  # e.g. "train.max_seq_len"
    cfg = from_dict(ExperimentConfig, {"dataset": {"path": str(path), "eval_size": 64, **dataset}})
    return cfg.replace(**extra) if extra else cfg


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def response_part(example: dict) -> list[int]:
    return [t for t, lab in zip(example["input_ids"], example["labels"], strict=True) if lab != IGNORE_INDEX]


def prompt_texts(data, tokenizer) -> list[str]:
    """Every prompt, train and eval, as text: the tokens the loss mask hides."""
    train = [tokenizer.decode([t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True)
                               if lab == IGNORE_INDEX]) for ex in data.train]
    return train + data.eval_prompts


def flat(column: list[list[int]]) -> list[int]:
    return [t for seq in column for t in seq]


# ------------------------------------------------------------------------ the dataset


def test_generator_reproduces_the_committed_dataset_and_corpus(tmp_path):
    module = runpy.run_path(str(ROOT / "experiments" / "data" / "make_fin_sentiment.py"))
    module["main"](["--dataset", str(tmp_path / "d.jsonl"), "--corpus", str(tmp_path / "c.txt")])
    assert (tmp_path / "d.jsonl").read_bytes() == DATA.read_bytes()
    assert (tmp_path / "c.txt").read_bytes() == CORPUS.read_bytes()


def test_dataset_shape_balance_and_no_labels_in_the_corpus():
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    assert len(rows) == 400
    assert {tuple(r) for r in rows} == {("instruction", "input", "output", "task")}
    assert Counter(r["task"] for r in rows) == {"sentiment": 270, "company": 65, "summary": 65}
    assert Counter(r["output"] for r in rows if r["task"] == "sentiment") == {
        "negative": 90, "neutral": 90, "positive": 90}
    assert all(2 <= len(r["output"].split()) <= 5 for r in rows if r["task"] != "sentiment")
    # No headline twice: the same headline under another instruction would put an eval
    # row's input in the training split (issue 16 item 7).
    assert len({r["input"] for r in rows}) == 400
    corpus = CORPUS.read_text()
    headlines = {r["input"] for r in rows}
    assert "###" not in corpus and "Classify" not in corpus
    # No corpus line pairs a headline with a sentiment word.
    labelled = [line for line in corpus.splitlines()
                if any(w in line for w in ("negative", "neutral", "positive"))
                and any(h in line for h in headlines)]
    assert labelled == []


# ------------------------------------------------------------------------- formatting


def test_loss_mask_covers_exactly_the_response_and_eos(tokenizer):
    data = prepare_data(config(), tokenizer)
    assert len(data.eval) == len(data.eval_prompts) == len(data.eval_references) == 64
    for example, prompt, reference in zip(data.eval, data.eval_prompts, data.eval_references, strict=True):
        ids, labels = example["input_ids"], example["labels"]
        n = labels.count(IGNORE_INDEX)
        # One ignored head, then labels equal to the tokens; read back as text (decode, not
        # the encoding data.py does), the head is the prompt and the tail the answer + eos.
        assert labels == [IGNORE_INDEX] * n + ids[n:]
        assert tokenizer.decode(ids[:n]) == prompt
        assert tokenizer.decode(ids[n:]) == reference + tokenizer.eos_token
        assert example["attention_mask"] == [1] * len(ids)
    # The tokens training sees: the real (unpadded) positions of the collated batches.
    collate = make_collator(tokenizer)
    batches = [collate([data.train[i] for i in range(s, min(s + 32, len(data.train)))])
               for s in range(0, len(data.train), 32)]
    assert data.num_train_tokens == sum(int(b["attention_mask"].sum()) for b in batches) > 336 * 20


def test_prompt_is_the_template_over_the_row_with_the_bos_token(tokenizer):
    data = prepare_data(config(), tokenizer)
    rows = {(r["instruction"], r["input"]): r for r in map(json.loads, DATA.read_text().splitlines())}
    for prompt, reference in zip(data.eval_prompts, data.eval_references, strict=True):
        instruction = prompt.split("### Instruction:\n")[1].split("\n")[0]
        headline = prompt.split("### Input:\n")[1].split("\n")[0]
        row = rows[instruction, headline]
        assert prompt == "<s>" + DEFAULT_PROMPT_TEMPLATE.format(**row)
        assert reference == row["output"]


def test_missing_or_null_columns_format_as_empty(tmp_path, tokenizer):
    rows = [{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Say yo.", "input": None, "output": "yo"},
            {"instruction": "Echo.", "input": "x", "output": "x"}]
    data = prepare_data(config(write_jsonl(tmp_path / "d.jsonl", rows), eval_size=1), tokenizer)
    assert sorted(prompt_texts(data, tokenizer)) == [
        "<s>### Instruction:\nEcho.\n### Input:\nx\n### Response:\n",
        "<s>### Instruction:\nSay hi.\n### Input:\n\n### Response:\n",
        "<s>### Instruction:\nSay yo.\n### Input:\n\n### Response:\n",
    ]


def test_chat_template_wraps_the_prompt_without_a_second_bos(tokenizer):
    data = prepare_data(config(chat_template=True), tokenizer)
    prompt = data.eval_prompts[0]
    assert prompt.startswith("<s><|user|>\n### Instruction:\n") and prompt.endswith("<|assistant|>\n")
    for example in data.train:
        assert example["input_ids"][0] == tokenizer.bos_token_id != example["input_ids"][1]
        assert response_part(example)[-1] == tokenizer.eos_token_id


def test_chat_answers_end_with_the_templates_end_of_turn(tokenizer):
    """Issue 16 item 6: with a chat template an answer ends the way the template closes an
    assistant turn (Gemma `<end_of_turn>`), not with the eos token, and that is a stop token."""
    import copy

    gemma = copy.deepcopy(tokenizer)
    gemma.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)
    gemma.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == "
        "'assistant' else m['role']) + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
    end_of_turn = gemma.convert_tokens_to_ids("<end_of_turn>")
    data = prepare_data(config(chat_template=True), gemma)
    assert data.eval_prompts[0].endswith("<end_of_turn>\n<start_of_turn>model\n")
    for example in list(data.train) + list(data.eval):
        assert response_part(example)[-1] == end_of_turn
        assert gemma.eos_token_id not in response_part(example)
    assert data.end_of_answer_ids == [end_of_turn]
    # the built-in template closes a turn with its eos token
    assert prepare_data(config(chat_template=True), tokenizer).end_of_answer_ids == [tokenizer.eos_token_id]


def test_generation_prompts_are_cut_like_training_prompts(tokenizer):
    """Issue 16 item 8: training prompts were cut to max_seq_len, eval prompts never."""
    data = prepare_data(config(**{"train.max_seq_len": 24, "eval.max_new_tokens": 8}), tokenizer)
    cue = tokenizer("\n### Response:\n", add_special_tokens=False)["input_ids"]
    for ids, text in zip(data.eval_prompt_ids, data.eval_prompts, strict=True):
        assert len(ids) <= 24 - 8 and ids[0] == tokenizer.bos_token_id and ids[-len(cue):] == cue
        assert text == tokenizer.decode(ids)  # the sample shows what the model saw
    assert data.stats["eval_prompts_truncated"] > 0
    whole = prepare_data(config(), tokenizer)
    assert whole.stats["eval_prompts_truncated"] == 0
    assert [tokenizer.decode(ids) for ids in whole.eval_prompt_ids] == whole.eval_prompts


@pytest.mark.parametrize("spec", ["quickstart.yaml", "example.yaml"])
def test_shipped_specs_generate_long_enough_for_every_reference(tokenizer, spec):
    """Issue 16 item 8: the quickstart's max_new_tokens: 8 cut 20% of the summaries short."""
    from qlora_ray.grid import load_spec

    cell = load_spec(ROOT / "experiments" / spec).cells[0]
    data = prepare_data(cell, tokenizer)
    assert data.stats["eval_references_over_max_new_tokens"] == 0, cell.eval.max_new_tokens


# ------------------------------------------------------------------------------ split


def test_split_is_deterministic_disjoint_and_seeded(tokenizer):
    first, again = prepare_data(config(), tokenizer), prepare_data(config(), tokenizer)
    assert first.eval_prompts == again.eval_prompts
    assert first.train["input_ids"] == again.train["input_ids"]
    train_prompts = set(prompt_texts(first, tokenizer)[: len(first.train)])
    assert len(train_prompts) == 336 and not train_prompts & set(first.eval_prompts)
    other = prepare_data(config(split_seed=1), tokenizer)
    assert set(other.eval_prompts) != set(first.eval_prompts)
    train, held_out = split_indices(400, 0.1, seed=0)
    assert len(held_out) == 40 and sorted(train + held_out) == list(range(400))


def test_eval_split_is_stratified_on_the_label(tokenizer):
    # Issue 16 item 5: a plain shuffle gave the quickstart's 64 eval rows 7/19/18 labels.
    data = prepare_data(config(), tokenizer)
    counts = Counter(r for r in data.eval_references if r in data.labels)
    assert sum(counts.values()) in (43, 44)  # 270 of 400 rows are labelled: 64 * 0.675
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    # Every prefix (what `eval.max_samples` keeps) stays close to balanced too.
    first = Counter(r for r in data.eval_references[:16] if r in data.labels)
    assert max(first.values()) - min(first.values()) <= 1, first
    train_labels = Counter(response for ex in data.train
                           if (response := tokenizer.decode(response_part(ex)[:-1])) in data.labels)
    assert sum(train_labels.values()) + sum(counts.values()) == 270
    assert max(train_labels.values()) - min(train_labels.values()) <= 1


def test_stratified_split_is_deterministic_and_disjoint():
    strata = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    train, held_out = split_indices(100, 10, seed=3, strata=strata)
    assert sorted(train + held_out) == list(range(100))
    assert Counter(strata[i] for i in held_out) == {"a": 5, "b": 3, "c": 2}
    assert split_indices(100, 10, seed=3, strata=strata) == (train, held_out)
    assert split_indices(100, 10, seed=4, strata=strata)[1] != held_out


def test_caps_take_a_prefix_of_the_same_split(tokenizer):
    full = prepare_data(config(), tokenizer)
    capped = prepare_data(config(**{"max_train_samples": 10, "eval.max_samples": 5}), tokenizer)
    assert len(capped.train) == 10 and capped.train["input_ids"] == full.train["input_ids"][:10]
    assert capped.eval_prompts == full.eval_prompts[:5] and len(capped.eval) == 5


# ------------------------------------------------------------------ truncation, packing


def test_truncation_keeps_bos_the_prompt_end_and_the_response(tokenizer):
    data = prepare_data(config(**{"train.max_seq_len": 24}), tokenizer)
    cue = tokenizer("\n### Response:\n", add_special_tokens=False)["input_ids"]
    for example, reference in zip(data.eval, data.eval_references, strict=True):
        ids = example["input_ids"]
        assert len(ids) <= 24 and ids[0] == tokenizer.bos_token_id
        answer = tokenizer(reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(answer) <= 12:  # short answers are kept whole, right after the cue
            assert response_part(example) == answer
            assert ids[len(ids) - len(answer) - len(cue) : len(ids) - len(answer)] == cue
    assert data.stats["eval_truncated"] > 0


def test_truncate_cuts_a_long_response_only_after_keeping_half_for_the_prompt():
    prompt, response = [1, *range(100, 130)], list(range(200, 240))
    p, r = truncate(prompt, response, max_len=32, head=1)
    assert p == [1, *range(115, 130)] and r == list(range(200, 216))
    assert truncate([1, 2], [3, 4], max_len=8, head=1) == ([1, 2], [3, 4])


def test_packing_keeps_every_token_and_its_label_in_order(tokenizer):
    plain = prepare_data(config(), tokenizer)
    packed = prepare_data(config(packing=True), tokenizer)
    assert len(packed.train) < len(plain.train) / 3
    assert all(len(ids) <= 256 for ids in packed.train["input_ids"])
    assert flat(packed.train["input_ids"]) == flat(plain.train["input_ids"])
    assert flat(packed.train["labels"]) == flat(plain.train["labels"])
    assert packed.num_train_tokens == plain.num_train_tokens
    assert packed.eval["input_ids"] == plain.eval["input_ids"]  # eval is never packed
    assert packed.stats["train_examples"] == plain.stats["train_examples"] == len(plain.train)
    assert packed.stats["train_sequences"] == len(packed.train)
    # positions restart at every example, so each one is where it would be alone
    first = packed.train[0]
    starts = [i for i, pos in enumerate(first["position_ids"]) if pos == 0]
    assert len(starts) > 1 and first["input_ids"][starts[1]] == tokenizer.bos_token_id


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_example_sees_only_itself(tokenizer, attn):
    """Issue 16 item 4: the logits of an example inside a packed batch are those of the same
    example run alone (no attention across the example boundary, positions from 0)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_ray.builtin import ensure_builtin

    model = AutoModelForCausalLM.from_pretrained(ensure_builtin("builtin:tiny-llama"),
                                                 attn_implementation=attn).eval()
    data = prepare_data(config(packing=True, **{"train.max_seq_len": 96}), tokenizer)
    batch = make_collator(tokenizer)([data.train[0], data.train[1]])  # two packed sequences
    assert "attention_mask" not in batch  # transformers builds the block mask from positions
    ids, positions = batch["input_ids"][0], batch["position_ids"][0].tolist()
    starts = [i for i, pos in enumerate(positions) if pos == 0] + [len(positions)]
    assert len(starts) >= 4  # at least two examples from each of the two sequences
    with torch.no_grad():
        # As in training: transformers looks for packed positions only without a KV cache.
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        for a, b in itertools.pairwise(starts):
            alone = model(input_ids=ids[a:b].unsqueeze(0)).logits[0]
            torch.testing.assert_close(packed_logits[a:b], alone, rtol=1e-4, atol=1e-4)


def test_collator_pads_right_with_pad_id_zero_mask_and_ignored_labels(tokenizer):
    collate = make_collator(tokenizer)
    batch = collate([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
                     {"input_ids": [8], "attention_mask": [1], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, tokenizer.pad_token_id, tokenizer.pad_token_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


# ----------------------------------------------------------------------------- labels


def test_auto_labels_need_a_few_short_answers_covering_most_rows():
    labels, note = auto_labels(["yes"] * 6 + ["no"] * 4 + ["up to three"] * 3 + ["a long free answer"] * 5)
    assert labels == ["no", "up to three", "yes"] and note is None  # 13 of 18 rows
    assert auto_labels(["a", "b"])[0] is None
    assert label_set("none", ["yes"] * 9)[0] is None
    assert label_set(("b", "a"), ["yes"] * 9) == (["b", "a"], None)


def test_auto_labels_are_not_invented_on_free_text_answers():
    # Issue 16 item 3: QA-style answers where a few values repeat, most rows are unique.
    answers = (["1990"] * 3 + ["Paris"] * 4 + ["Yes"] * 3 + ["two"] * 3
               + [f"The treaty was signed in {1800 + i}" for i in range(60)])
    labels, note = auto_labels(answers)
    assert labels is None
    assert "cover 13 of 73 rows" in note and "`eval.labels`" in note  # says why and the fix


def test_auto_labels_count_case_insensitively_and_keep_the_common_spelling():
    labels, _ = auto_labels(["Positive", "positive", "positive", "negative", "NEGATIVE", "negative"])
    assert labels == ["negative", "positive"]  # each seen 3 times once case is ignored
    assert auto_labels([f"label {i % 30}" for i in range(90)])[0] is None  # 30 values are not "a few"


def test_shipped_dataset_auto_labels_are_the_three_sentiments(tokenizer):
    assert prepare_data(config(), tokenizer).labels == ["negative", "neutral", "positive"]
    none = prepare_data(config().replace(**{"eval.labels": "none"}), tokenizer)
    assert none.labels is None


# ---------------------------------------------------------------------- loading, errors


def test_csv_and_parquet_load_the_same_rows(tmp_path):
    import pandas as pd

    rows = [json.loads(line) for line in DATA.read_text().splitlines()][:20]
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        assert load_rows(config(tmp_path / name).dataset) == rows


def test_rows_without_a_response_are_dropped(tmp_path, tokenizer):
    rows = [{"instruction": f"q{i}", "input": "", "output": "a" if i % 4 else None} for i in range(40)]
    data = prepare_data(config(write_jsonl(tmp_path / "d.jsonl", rows), eval_size=5), tokenizer)
    assert data.stats["rows_dropped"] == 10 and len(data.train) == 25


def error_of(cfg: ExperimentConfig, tokenizer) -> str:
    with pytest.raises(ConfigError) as err:
        prepare_data(cfg, tokenizer)
    return str(err.value)


def test_template_column_no_row_has_names_key_value_and_columns(tokenizer):
    message = error_of(config(prompt_template="Q: {question}\nA: "), tokenizer)
    assert "`dataset.prompt_template` uses {question}, which no row has" in message
    assert "'Q: {question}\\nA: '" in message and "instruction, input, output, task" in message


def test_missing_response_field_names_key_value_and_columns(tokenizer):
    message = error_of(config(response_field="answer"), tokenizer)
    assert "`dataset.response_field` is not a column of the dataset, got 'answer'" in message
    assert "instruction, input, output, task" in message


def test_missing_file_names_key_value_and_where_it_looked(tokenizer):
    message = error_of(config("experiments/data/nope.jsonl"), tokenizer)
    assert "`dataset.path` is not a file, got 'experiments/data/nope.jsonl'" in message
    assert str(Path.cwd()) in message


def test_unsupported_file_type_and_oversized_eval_split_are_explained(tmp_path, tokenizer):
    (tmp_path / "d.txt").write_text("hello\n")
    assert "`dataset.path` has an unsupported file type" in error_of(config(tmp_path / "d.txt"), tokenizer)
    small = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "input": "", "output": "a"}] * 10)
    message = error_of(config(small, eval_size=10), tokenizer)
    assert "`dataset.eval_size` must leave rows to train on (the dataset has 10 usable rows), got 10" in message


def test_chat_template_without_one_in_the_tokenizer_is_explained(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    message = error_of(config(chat_template=True), plain)
    assert "`dataset.chat_template` needs a tokenizer with a chat template" in message
    assert "set it to false" in message
