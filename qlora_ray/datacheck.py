"""Local dataset files, read and checked once before any model load or Ray: file, line, field.

    rows = read_rows("experiments/data/fin_sentiment.jsonl")    # list of dicts, or ConfigError
    found = check_dataset(cfg.dataset)                            # rows + what a run will use
    check_spec_datasets(spec)                                     # every distinct dataset of a grid

Formats and checks: docs/data.md. Only json, csv and pyarrow: planning stays fast.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import logging
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_ray.config import ConfigError, DatasetConfig, problem

if TYPE_CHECKING:
    from qlora_ray.grid import Spec

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# How many bad lines one problem quotes before it says "and N more".
SHOWN_LINES = 3
SNIPPET_CHARS = 60


@dataclass(frozen=True)
class Row:
    """Where a row came from, for messages: `data.jsonl:17` or `data.parquet row 17`."""

    file: str
    number: int
    is_line: bool

    def __str__(self) -> str:
        return f"{self.file}:{self.number}" if self.is_line else f"{self.file} row {self.number}"


@dataclass
class DatasetCheck:
    """What `check_dataset` found: the rows, and how many a run will train and evaluate on."""

    rows: list[dict[str, Any]]
    columns: list[str]
    # Rows with a non-empty response (the others are dropped, as data.py does).
    usable: int
    dropped: int
    notes: list[str] = field(default_factory=list)


def is_local(path: str) -> bool:
    """Whether `dataset.path` names a local file (checked here) rather than a hub dataset."""
    p = Path(path).expanduser()
    if p.is_dir():
        return False
    return p.is_file() or p.suffix.lower() in LOCAL_SUFFIXES or path.startswith((".", "/", "~"))


# ---------------------------------------------------------------------------------------
# reading


def read_rows(path: str | Path, key: str = "dataset.path") -> list[dict[str, Any]]:
    """Every row of a local .jsonl/.json/.csv/.parquet file, as dicts; ConfigError otherwise.

    Each message names the file and line (or row), what is wrong there, and the fix.
    """
    return _read(str(path), key)[0]


def _read(path: str, key: str) -> tuple[list[dict[str, Any]], list[Row]]:
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if not p.is_file():
        where = "" if p.is_absolute() else (
            f" (a relative path is read from the working directory, {Path.cwd()})")
        raise ConfigError([problem(key, path, "is not a file", f"check the path{where}")])
    if suffix not in LOCAL_SUFFIXES:
        raise ConfigError([problem(key, path, "has an unsupported file type",
                                   f"use one of {', '.join(LOCAL_SUFFIXES)}")])
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError([problem(key, path, f"cannot be read ({e.strerror})",
                                   "check the file's permissions")]) from e
    if not data.strip():
        raise ConfigError([problem(key, path, "is empty", "give a file with rows")])
    if suffix == ".parquet":
        return _read_parquet(path, data, key)
    text = _decode(path, data, key)
    if suffix == ".csv":
        return _read_csv(path, text, key)
    if suffix == ".json" and text.lstrip()[:1] == "[":
        return _read_json_document(path, text, key)
    if suffix == ".json" and text.lstrip()[:1] == "{":
        # An object of column lists, or JSON Lines saved as .json: try the first, then the second.
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            return _read_jsonl(path, text, key)
        return _read_json_document(path, text, key, doc)
    return _read_jsonl(path, text, key)


def _decode(path: str, data: bytes, key: str) -> str:
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark is not data
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError([problem(
            f"{path}:{line}", data[e.start : e.start + 4],
            f"is not UTF-8 text (byte {data[e.start]:#04x} at column {column})",
            "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
        )]) from e


def _snippet(text: str) -> str:
    text = text.strip()
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1] + "…"


def _read_jsonl(path: str, text: str, key: str) -> tuple[list[dict[str, Any]], list[Row]]:
    rows: list[dict[str, Any]] = []
    where: list[Row] = []
    bad: list[tuple[int, str, str]] = []  # (line, snippet, why)
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) are not rows
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append((number, _snippet(line), f"is not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(value, dict):
            bad.append((number, _snippet(line), f"is a JSON {type(value).__name__}, not an object"))
            continue
        rows.append(value)
        where.append(Row(path, number, True))
    return _all_good(path, key, rows, where, bad, "write one JSON object per line, e.g. "
                     '{"instruction": "...", "output": "..."}')


def _all_good(
    path: str, key: str, rows: list[dict[str, Any]], where: list[Row], bad: list[tuple[int, str, str]],
    fix: str, empty: tuple[str, str] = ("has no rows", "give a file with rows"),
) -> tuple[list[dict[str, Any]], list[Row]]:
    """The rows a line-by-line reader kept, or one error naming every bad line (or no rows)."""
    if bad:
        raise ConfigError(_line_problems(path, bad, fix))
    if not rows:
        raise ConfigError([problem(key, path, *empty)])
    return rows, where


def _line_problems(path: str, bad: list[tuple[int, str, str]], fix: str) -> list[str]:
    out = [problem(f"{path}:{line}", snippet, why, fix) for line, snippet, why in bad[:SHOWN_LINES]]
    if len(bad) > SHOWN_LINES:
        more = ", ".join(str(line) for line, _, _ in bad[SHOWN_LINES : SHOWN_LINES + 10])
        out.append(problem(path, f"{len(bad) - SHOWN_LINES} more lines", "has the same problem on "
                           f"lines {more}{', ...' if len(bad) > SHOWN_LINES + 10 else ''}", fix))
    return out


def _read_json_document(
    path: str, text: str, key: str, doc: Any = None
) -> tuple[list[dict[str, Any]], list[Row]]:
    if doc is None:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            at = text.splitlines()[e.lineno - 1] if e.lineno <= len(text.splitlines()) else ""
            raise ConfigError([problem(f"{path}:{e.lineno}", _snippet(at),
                                       f"is not valid JSON ({e.msg} at column {e.colno})",
                                       "fix the syntax, or save one object per line as .jsonl")]) from e
    if isinstance(doc, dict):
        lengths = {len(v) if isinstance(v, list) else -1 for v in doc.values()}
        if not doc or -1 in lengths or len(lengths) != 1:
            raise ConfigError([problem(path, sorted(doc)[:8], "is a JSON object but not one of "
                                       "equal-length column lists",
                                       "write a JSON array of row objects, or one object per line")])
        n = lengths.pop()
        doc = [{k: v[i] for k, v in doc.items()} for i in range(n)]
    rows, where, bad = [], [], []
    for i, value in enumerate(doc, start=1):
        if isinstance(value, dict):
            rows.append(value)
            where.append(Row(path, i, False))
        else:
            bad.append(problem(f"{path} row {i}", value, "is not a JSON object",
                               "make every array element an object of columns"))
    if bad:
        raise ConfigError(bad[:SHOWN_LINES])
    if not rows:
        raise ConfigError([problem(key, path, "has no rows", "give a file with rows")])
    return rows, where


def _read_csv(path: str, text: str, key: str) -> tuple[list[dict[str, Any]], list[Row]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        records = [(reader.line_num, record) for record in reader]
    except csv.Error as e:
        raise ConfigError([problem(f"{path}:{reader.line_num}", path, f"is not valid CSV ({e})",
                                   "quote fields that hold commas, quotes or newlines")]) from e
    names = [h.strip() for h in header]
    if not any(names) or len(set(names)) != len(names) or "" in names:
        raise ConfigError([problem(f"{path}:1", header, "is not a header of distinct column names",
                                   "start the file with a line naming every column")])
    rows, where, bad = [], [], []
    for line, record in records:
        if not any(cell.strip() for cell in record):
            continue
        if len(record) != len(names):
            bad.append((line, _snippet(",".join(record)),
                        f"has {len(record)} fields, the header has {len(names)}"))
            continue
        rows.append({n: (v if v != "" else None) for n, v in zip(names, record, strict=True)})
        where.append(Row(path, line, True))
    return _all_good(path, key, rows, where, bad,
                     "give every line one value per header column (quote values that contain commas)",
                     empty=("has a header but no rows", "add rows under the header"))


def _read_parquet(path: str, data: bytes, key: str) -> tuple[list[dict[str, Any]], list[Row]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise ConfigError([problem(key, path, f"is not a readable Parquet file ({e})",
                                   "write it again with pandas.DataFrame.to_parquet or pyarrow")]) from e
    rows = table.to_pylist()
    if not rows:
        raise ConfigError([problem(key, path, "has no rows", "give a file with rows")])
    return rows, [Row(path, i, False) for i in range(1, len(rows) + 1)]


# ---------------------------------------------------------------------------------------
# checking


def template_columns(template: str) -> list[str]:
    """Column names a prompt template refers to (`{a}`, `{a[0]}` and `{a.b}` all name `a`)."""
    names = []
    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name is not None:
            names.append(field_name.replace("[", ".").split(".", 1)[0])
    return list(dict.fromkeys(names))


def template_problems(template: str, columns: list[str], rows_of: str, listed: str) -> list[str]:
    """Placeholders of the prompt template that are positional or name no column.

    `rows_of` names the data (" of FILE", or "" for data without a file name); `listed` ends
    each fix with the columns (the plan-time check and the worker word it differently).
    """
    problems = []
    for name in template_columns(template):
        if name == "" or name.isdigit():
            problems.append(problem("dataset.prompt_template", template,
                                    "has a positional placeholder ({} or {0})",
                                    f"name a column instead{listed}"))
        elif name not in columns:
            problems.append(problem("dataset.prompt_template", template,
                                    f"uses {{{name}}}, which no row{rows_of} has",
                                    f"use the dataset's columns{listed}"))
    return problems


class _BlankMissing(dict):
    """A row for `format_map`: a column the row lacks formats as empty (as data.py does)."""

    def __missing__(self, key: str) -> str:
        return ""


def has_response(row: dict[str, Any], response_field: str) -> bool:
    value = row.get(response_field)
    return value is not None and bool(str(value).strip())


def check_dataset(
    cfg: DatasetConfig, _cache: dict[str, tuple[list[dict[str, Any]], list[Row]]] | None = None
) -> DatasetCheck:
    """Read `cfg.path` and check it against the config; raises ConfigError with every problem.

    Checks: the file reads (see `read_rows`); every row has `response_field` (a row that
    lacks the key is an error naming its line; a null or empty answer is dropped by the run,
    and noted here); the template names only columns the data has and formats every row;
    `eval_size` leaves rows to train on.
    """
    cache = {} if _cache is None else _cache
    if cfg.path not in cache:
        cache[cfg.path] = _read(cfg.path, "dataset.path")
    rows, where = cache[cfg.path]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    fix_columns = f"the columns are: {', '.join(columns)}"
    problems = template_problems(cfg.prompt_template, columns, f" of {cfg.path}", f"; {fix_columns}")
    if not problems:
        for row, at in zip(rows, where, strict=True):
            try:
                cfg.prompt_template.format_map(_BlankMissing({k: "" if v is None else v
                                                              for k, v in row.items()}))
            except (IndexError, KeyError, AttributeError, ValueError, TypeError) as e:
                problems.append(problem(f"{at}", _snippet(json.dumps(row, default=str)),
                                        f"does not fit dataset.prompt_template ({type(e).__name__}: {e})",
                                        "fix the placeholder, or the data on that line"))
                break

    response = cfg.response_field
    if response not in columns:
        problems.append(problem("dataset.response_field", response,
                                f"is not a column of {cfg.path}",
                                f"set it to the answer column; {fix_columns}"))
    else:
        lacking = [(row, at) for row, at in zip(rows, where, strict=True) if response not in row]
        for row, at in lacking[:SHOWN_LINES]:
            close = difflib.get_close_matches(response, list(row), n=1)
            typo = f" (is {close[0]!r} a typo?)" if close else ""
            problems.append(problem(f"{at}", sorted(row), f"has no {response!r} field "
                                    f"(dataset.response_field){typo}",
                                    f"add {response!r} to that row, or remove the row"))
        if len(lacking) > SHOWN_LINES:
            problems.append(problem(cfg.path, len(lacking) - SHOWN_LINES,
                                    f"has more rows without \"{response}\"", "add it to every row"))
    if problems:
        raise ConfigError(problems)

    usable = sum(has_response(row, response) for row in rows)
    if usable == 0:
        raise ConfigError([problem("dataset.response_field", response,
                                   f"is null or empty in every row of {cfg.path}",
                                   "point it at the column with the answers")])
    notes = []
    dropped = len(rows) - usable
    if dropped:
        notes.append(f"{cfg.path}: {dropped} of {len(rows)} rows have a null or empty "
                     f"{response!r} and will be dropped")
    held_out = max(1, round(usable * cfg.eval_size)) if isinstance(cfg.eval_size, float) else cfg.eval_size
    if held_out >= usable:
        raise ConfigError([problem("dataset.eval_size", cfg.eval_size,
                                   f"must leave rows to train on ({cfg.path} has {usable} usable rows)",
                                   "hold out fewer rows, or a fraction such as 0.1")])
    return DatasetCheck(rows=rows, columns=columns, usable=usable, dropped=dropped, notes=notes)


def check_spec_datasets(spec: Spec) -> list[str]:
    """Check every distinct local dataset of a grid once; raise all problems together.

    Returns notes worth printing (rows that a run will drop). Hub datasets and folders are
    skipped (see the module docstring).
    """
    problems: list[str] = []
    notes: list[str] = []
    seen: set[DatasetConfig] = set()
    # A file read once, whatever the cells vary (eval_size, template) around it.
    cache: dict[str, tuple[list[dict[str, Any]], list[Row]]] = {}
    failed: set[str] = set()
    for cell in spec.cells:
        d = cell.dataset
        if d in seen or not is_local(d.path):
            continue
        seen.add(d)
        if d.path in failed:
            continue  # its read error is reported once
        try:
            notes.extend(check_dataset(d, cache).notes)
        except ConfigError as e:
            problems.extend(e.problems)
            if d.path not in cache:
                failed.add(d.path)
    if problems:
        raise ConfigError(problems)
    return list(dict.fromkeys(notes))
