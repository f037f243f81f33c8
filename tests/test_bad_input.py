"""Broken specs, datasets and models: each is one clear error before any work starts.

Every case is run through both verbs as a user would (`qlora-ray plan SPEC` and
`qlora-ray run SPEC --results DIR`) and must:

- exit non-zero with a message naming the key (or `file:line`), the value (`got ...`)
  and the fix (after `; `), with the case's expected fragments;
- start nothing: the driver's only way into Ray (`scheduler.run_cells`, which builds the
  builtin model, then connects) is replaced by a guard that fails the test if reached;
- write nothing and lose nothing: a results folder that already holds a finished row is
  byte-for-byte the same afterwards, with no new file in it.

Spec checks that existed before (tests/test_grid.py has more) are here too, beside the
dataset, model and input-bound cases.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ROOT

from qlora_ray import scheduler
from qlora_ray.cli import main as cli_main
from qlora_ray.config import MAX_NEW_TOKENS
from qlora_ray.results import empty_row
from qlora_ray.results_io import write_run

SHIPPED_DATA = ROOT / "experiments" / "data" / "fin_sentiment.jsonl"
GOOD_ROW = '{"instruction": "Sentiment?", "input": "Shares rise", "output": "positive"}\n'
GOOD_ROWS = GOOD_ROW * 8

# A 7B-class config.json: enough for the planner, which never needs weights.
BIG_MODEL = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
             "vocab_size": 128256}
GEMMA2 = {"model_type": "gemma2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 1, "head_dim": 32, "intermediate_size": 128, "vocab_size": 1024}

BILLION_LAUGHS = textwrap.dedent("""\
    name: bad
    base:
      train: {epochs: 1}
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
    grid: {lora.r: *g}
    """)


@dataclass
class Case:
    id: str
    spec: str
    """YAML; `{data}` is the dataset file, `{model}` the model folder, `{tmp}` the test folder."""
    expected: list[str]
    """Fragments of the message (placeholders as in `spec`)."""
    data: bytes | None = None
    """Content of the dataset file `{data}` (default: eight good rows)."""
    suffix: str = ".jsonl"
    model: dict | None = None
    """config.json of the model folder `{model}` (None: no folder)."""
    extra_args: list[str] = field(default_factory=list)


def spec(base: str = "", top: str = "") -> str:
    """A one-cell spec on the builtin model and `{data}`, with extra base keys / top-level keys."""
    return ("name: bad\nbase:\n  dataset: {path: '{data}', eval_size: 2}\n"
            + "".join(f"  {line}\n" for line in base.splitlines() if line) + top)


CASES = [
    # --- spec structure and values (the checks that existed before stay)
    Case("batch-size-zero", spec("train: {batch_size: 0}"),
         ["`train.batch_size` must be >= 1, got 0; use e.g. 4"]),
    Case("unknown-key-typo", spec(top="grid: {lora.rr: [8]}"),
         ["`lora.rr` is not a known key, got 8; did you mean `lora.r`?"]),
    Case("unknown-spec-key", spec(top="gird: {lora.r: [8]}"),
         ["`gird` is not a known spec key", "did you mean `grid`?"]),
    Case("dtype-spelling", spec("quant: {compute_dtype: bf16}"),
         ["`quant.compute_dtype` must be one of", "got 'bf16'", "did you mean 'bfloat16'?"]),
    Case("unknown-gpu", spec(top="grid: {gpu: [T5]}"),
         ["`gpu` is not a known GPU profile, got 'T5'", "define it under `profiles:`"]),
    Case("unsafe-spec-name", spec().replace("name: bad", "name: '../../etc'"),
         ["`name` must be a file-name-safe string, got '../../etc'"]),
    Case("not-yaml", "name: bad\nbase: {train: [}\n",
         ["`{tmp}/spec.yaml:2` is not valid YAML (expected the node content, but found '}')",
          "got 'base: {train: [}'; fix the syntax"]),
    # --- unbounded input
    Case("yaml-aliases", BILLION_LAUGHS,
         ["`{tmp}/spec.yaml:4` uses a YAML anchor or alias, got '&a'", "write the values out"]),
    Case("billion-cells", spec(top="grid: {" + ", ".join(
        f"{k}: [{', '.join(str(v) for v in vals)}]" for k, vals in [
            ("lora.r", range(1, 11)), ("lora.alpha", range(1, 11)), ("train.seed", range(10)),
            ("train.batch_size", range(1, 11)), ("train.grad_accum", range(1, 11)),
            ("eval.batch_size", range(1, 11)), ("train.max_seq_len", range(100, 110)),
            ("dataset.split_seed", range(10)), ("eval.max_new_tokens", range(1, 11))]) + "}"),
         ["`grid` expands to more than 10,000 cells", "got '1,000,000,000 cells'", "--max-cells N"]),
    Case("max-new-tokens-bound", spec("eval: {max_new_tokens: 1000000000}"),
         [f"`eval.max_new_tokens` must be <= {MAX_NEW_TOKENS:,}, got 1000000000; use e.g. 16"]),
    Case("max-seq-len-bound", spec("train: {max_seq_len: 100000000}"),
         ["`train.max_seq_len` must be <= 1,048,576, got 100000000"]),
    Case("epochs-bound", spec("train: {epochs: 1.0e+6}"), ["`train.epochs` must be <= 1,000, got 1000000.0"]),
    Case("batch-bound", spec("train: {batch_size: 1000000}"), ["`train.batch_size` must be <= 4,096, got 1000000"]),
    Case("profile-name-html", spec(top="profiles:\n  '<b>card</b>': {total_mib: 1024, bf16: true, "
                                       "flash_attention: false, ray_accelerator_type: card}\n"),
         ["`profiles` has a profile name that is not a safe name, got '<b>card</b>'", "use letters, digits"]),
    Case("profile-label-unsafe", spec(top="profiles:\n  MyCard: {total_mib: 1024, bf16: true, "
                                         "flash_attention: false, ray_accelerator_type: 'a b:c'}\n"),
         ["`profiles.MyCard.ray_accelerator_type` is not a safe name, got 'a b:c'"]),
    # A `profiles:` entry is checked like any other section: unknown keys, types, bounds, format.
    Case("profile-unknown-key", spec(top="profiles:\n  T4: {total_mb: 8000}\n"),
         ["`profiles.T4.total_mb` is not a known key, got 8000; did you mean `profiles.T4.total_mib`?"]),
    Case("profile-type", spec(top="profiles:\n  MyCard: {total_mib: lots}\n"),
         ["`profiles.MyCard.total_mib` must be an integer, got 'lots'; fix its type"]),
    Case("profile-memory-zero", spec(top="profiles:\n  MyCard: {total_mib: 0}\n"),
         ["`profiles.MyCard.total_mib` must be > 0, got 0; give the card's memory in MiB"]),
    Case("profile-memory-bound", spec(top="profiles:\n  MyCard: {total_mib: 24000000000}\n"),
         ["`profiles.MyCard.total_mib` must be <= 16,777,216, got 24000000000"]),
    Case("profile-capability", spec(top="profiles:\n  T4: {compute_capability: eight}\n"),
         ["`profiles.T4.compute_capability` must be MAJOR.MINOR, got 'eight'; write e.g. 8.6"]),
    # Without it the planner took 0.0 and refused every cell for want of kernels.
    Case("profile-new-card-without-capability", spec(top="profiles:\n  MyCard: {total_mib: 1024}\n"),
         ["`profiles.MyCard.compute_capability` is required for a card qlora-ray does not know",
          "add it: MAJOR.MINOR"]),
    Case("profile-new-card-without-memory", spec(top="profiles:\n  MyCard: {bf16: true}\n"),
         ["`profiles.MyCard.total_mib` is required, got None; add it: Card memory as nvidia-smi reports it"]),
    # --- datasets: read once, before Ray, with file, line and field
    Case("dataset-missing", spec().replace("{data}", "{tmp}/nope.jsonl"),
         ["`dataset.path` is not a file, got '{tmp}/nope.jsonl'; check the path"]),
    Case("dataset-empty", spec(), ["`dataset.path` is empty, got '{data}'; give a file with rows"], data=b""),
    Case("dataset-blank-lines-only", spec(), ["`dataset.path` is empty"], data=b"\n\n  \n"),
    Case("dataset-not-json", spec(),
         ["`{data}:2` is not valid JSON (Expecting ',' delimiter at column 21)",
          "got '{\"instruction\": \"b\" \"output\": \"y\"}'", "write one JSON object per line"],
         data=(GOOD_ROW + '{"instruction": "b" "output": "y"}\n' + GOOD_ROWS).encode()),
    Case("dataset-json-array-line", spec(), ["`{data}:3` is a JSON list, not an object, got '[1, 2]'"],
         data=(GOOD_ROW * 2 + "[1, 2]\n" + GOOD_ROWS).encode()),
    Case("dataset-not-utf8", spec(),
         ["`{data}:4` is not UTF-8 text (byte 0xe9 at column 35)", "re-save the file as UTF-8"],
         data=(GOOD_ROW * 3).encode() + b'{"instruction": "x", "input": "caf\xe9", "output": "a"}\n'),
    Case("dataset-row-without-response", spec(),
         ["`{data}:2` has no 'output' field (dataset.response_field) (is 'ouput' a typo?)",
          "got ['input', 'instruction', 'ouput']", "add 'output' to that row"],
         data=(GOOD_ROW + '{"instruction": "q", "input": "", "ouput": "a"}\n' + GOOD_ROWS).encode()),
    Case("dataset-response-field-not-a-column", spec("dataset: {path: '{data}', response_field: answer}"),
         ["`dataset.response_field` is not a column of {data}, got 'answer'",
          "the columns are: instruction, input, output"]),
    Case("dataset-template-column", spec("dataset: {path: '{data}', prompt_template: 'Q: {question}'}"),
         ["`dataset.prompt_template` uses {question}, which no row of {data} has, got 'Q: {question}'",
          "the columns are: instruction, input, output"]),
    Case("dataset-template-positional", spec("dataset: {path: '{data}', prompt_template: '{0} {instruction}'}"),
         ["`dataset.prompt_template` has a positional placeholder ({} or {0})", "name a column instead"]),
    Case("dataset-template-fails-on-a-line", spec("dataset: {path: '{data}', prompt_template: '{input[0]}'}"),
         ["`{data}:3` does not fit dataset.prompt_template (IndexError: string index out of range)",
          "fix the placeholder, or the data on that line"],
         data=(GOOD_ROW * 2 + '{"instruction": "q", "input": "", "output": "a"}\n' + GOOD_ROWS).encode()),
    Case("dataset-responses-all-null", spec(),
         ["`dataset.response_field` is null or empty in every row of {data}, got 'output'"],
         data=b'{"instruction": "q", "input": "", "output": null}\n' * 5),
    Case("dataset-eval-size-too-big", spec("dataset: {path: '{data}', eval_size: 8}"),
         ["`dataset.eval_size` must leave rows to train on ({data} has 8 usable rows), got 8"]),
    Case("dataset-csv-ragged", spec(),
         ["`{data}:3` has 2 fields, the header has 3, got 'b,c'", "one value per header column"],
         data=b"instruction,input,output\nq,i,a\nb,c\nq,i,a\nq,i,a\nq,i,a\n", suffix=".csv"),
    Case("dataset-csv-header-only", spec(), ["`dataset.path` has a header but no rows"],
         data=b"instruction,input,output\n", suffix=".csv"),
    Case("dataset-json-array-element", spec(), ["`{data} row 2` is not a JSON object, got 'oops'"],
         data=b'[{"instruction": "q", "input": "", "output": "a"}, "oops"]', suffix=".json"),
    Case("dataset-json-syntax", spec(), ["`{data}:3` is not valid JSON", "fix the syntax"],
         data=b'[\n{"instruction": "q", "input": "", "output": "a"},\n{"instruction": }\n]', suffix=".json"),
    Case("dataset-parquet-corrupt", spec(), ["`dataset.path` is not a readable Parquet file", "write it again"],
         data=b"PAR1 this is not parquet PAR1", suffix=".parquet"),
    Case("dataset-unsupported-type", spec(), ["`dataset.path` has an unsupported file type, got '{data}'"],
         data=b"hello\n", suffix=".txt"),
    # --- models and ranks, planned from config.json alone
    Case("lora-rank-above-layer-width", spec("lora: {r: 200}"),
         ["`lora.r` is larger than the adapted layer q_proj (128 -> 128 features", "got 200",
          "use lora.r <= 128"]),
    Case("gemma2-explicit-sdpa", spec("model: {name: '{model}', attn_implementation: sdpa}"),
         ["`model.attn_implementation` is not supported by gemma2 models", "got 'sdpa'", "use auto"],
         model=GEMMA2),
    Case("model-folder-without-config", spec("model: '{tmp}'"),
         ["`model.name` is a folder without config.json, got '{tmp}'"]),
    Case("target-modules-the-model-lacks", spec("lora: {target_modules: [c_attn]}"),
         ["`lora.target_modules` names modules llama does not have, got ['c_attn']", "use some of q_proj"]),
    Case("bf16-on-t4", spec("quant: {compute_dtype: bfloat16}", top="grid: {gpu: [T4]}"),
         ["`quant.compute_dtype` needs a GPU with bf16", "got 'bfloat16'; use float16 or auto"]),
    Case("does-not-fit", spec("model: '{model}'\nquant: {bits: 16, compute_dtype: float16}",
                              top="grid: {gpu: [T4]}"),
         ["does not fit: predicted peak", "against T4's 15.0 GiB", "even the low end is over"],
         model=BIG_MODEL),
    Case("flash-attention-on-t4", spec("model: {attn_implementation: flash_attention_2}\n"
                                       "quant: {compute_dtype: float16}", top="grid: {gpu: [T4]}"),
         ["`model.attn_implementation` needs an Ampere or newer GPU", "got 'flash_attention_2'; use sdpa"]),
]


def fill(text: str, paths: dict[str, str]) -> str:
    for key, value in paths.items():
        text = text.replace("{" + key + "}", value)
    return text


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started: the driver reached Ray for a spec that should be refused")

    monkeypatch.setattr(scheduler, "run_cells", started)


def test_there_are_at_least_30_cases() -> None:
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_error_and_nothing_runs(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    no_work: None,
) -> None:
    monkeypatch.chdir(tmp_path)
    data = tmp_path / f"data{case.suffix}"
    data.write_bytes(case.data if case.data is not None else GOOD_ROWS.encode())
    model = tmp_path / "model"
    if case.model is not None:
        model.mkdir()
        (model / "config.json").write_text(json.dumps(case.model))
    paths = {"data": str(data), "model": str(model), "tmp": str(tmp_path)}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(fill(case.spec, paths))

    # A results folder that already holds a finished row of this spec.
    results = tmp_path / "results"
    row = empty_row()
    row.update(experiment_id="0123456789ab", name="earlier", spec_name="bad", status="ok")
    write_run(str(results), "bad", row)
    before = snapshot(results)

    for verb in (["plan", str(spec_path)], ["run", str(spec_path), "--results", str(results)]):
        code = cli_main([*verb, *case.extra_args])
        out, err = capsys.readouterr()
        assert code != 0, f"`qlora-ray {verb[0]}` accepted it:\n{out}{err}"
        message = out + err
        for fragment in case.expected:
            assert fill(fragment, paths) in message, f"`qlora-ray {verb[0]}` said:\n{message}"
        first = fill(case.expected[0], paths)
        for line in (ln for ln in message.splitlines() if first in ln):
            # the fix follows "; "; the value follows "got " (the memory verdict gives its own numbers)
            assert "; " in line and ("got " in line or "predicted peak" in line), f"no value or fix: {line}"
    assert snapshot(results) == before, "the results folder changed"
