"""Nested dicts (a parsed spec) into frozen dataclasses and back: types checked, unknown keys
named with a close match, each section's own checks run, every problem in one `ConfigError`.

The schema itself (fields, defaults, help, rules) is in `config.py`; this is the machinery.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import types
import typing
from typing import Any

# A section written as a string means its main field: `model: org/name`, `dataset: file`.
SHORTHANDS = {"model": "name", "dataset": "path"}


class ConfigError(ValueError):
    """Every problem found in a config or spec, raised once."""

    def __init__(self, problems: list[str]):
        # Keep order, drop repeats: a base-level mistake shows up once, not once per cell.
        self.problems = list(dict.fromkeys(problems))
        super().__init__(self._render())

    def _render(self) -> str:
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in the config:"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


def problem(key: str, value: Any, rule: str, fix: str) -> str:
    """One problem line: key, rule, value, fix (the format every error follows)."""
    return f"`{key}` {rule}, got {value!r}; {fix}"


def raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


def positive(out: list[str], key: str, value: Any, fix: str, *, allow_zero: bool = False) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not low_ok:
        rule = "must be >= 0" if allow_zero else "must be > 0"
        out.append(problem(key, value, rule, fix))


def at_most(out: list[str], key: str, value: Any, limit: int | float, fix: str) -> None:
    """Upper bounds: a spec is untrusted input, and a typo of 10**9 must not start a run."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > limit:
        out.append(problem(key, value, f"must be <= {limit:,}", fix))


def one_of(out: list[str], key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        out.append(
            problem(key, value, f"must be one of {', '.join(map(str, allowed))}", f"pick one{hint}")
        )


class Validated:
    """A config section that checks itself when built: `problems()`, raised together."""

    def problems(self) -> list[str]:
        return []

    def __post_init__(self) -> None:
        raise_if(self.problems())


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None else shorthand(part, child)
            node[part] = child
        node = child
    node[parts[-1]] = value


def shorthand(section: str, value: Any) -> Any:
    """`model: org/name` means `model: {name: org/name}`; `dataset: file` means `{path: file}`."""
    if isinstance(value, str) and section in SHORTHANDS:
        return {SHORTHANDS[section]: value}
    return value


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    # Resolving string annotations is the slow part of building a config; a 1,000-cell grid
    # builds ~7,000 section objects, so resolve each class once.
    return typing.get_type_hints(cls)


def is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def check_type(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, coerced value) for the small set of field types configs use."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            ok, coerced = check_type(value, arm)
            if ok:
                return True, coerced
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `2e-4` (no dot) as a string; accept it as the number it looks like.
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if isinstance(value, (list, tuple)) and all(check_type(v, item)[0] for v in value):
            return True, tuple(value)
        return False, value
    raise TypeError(f"config field type {tp!r} is not supported")


def type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             type(None): "null"}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build `cls` from nested dicts, reporting every unknown key, wrong type and bad value.

    Raises ConfigError listing all problems; keys are reported with their full dotted path.
    """
    problems: list[str] = []
    obj = _build(cls, data, prefix, problems)
    raise_if(problems)
    return obj


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    section = prefix.rstrip(".")
    if not isinstance(data, dict):
        problems.append(problem(section or "spec", data, "must be a mapping", "write key: value pairs"))
        return None
    hints = type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean `{prefix}{close[0]}`?" if close else f"known keys: {', '.join(fields)}"
            problems.append(problem(path, value, "is not a known key", hint))
            continue
        tp = hints[key]
        if is_dataclass_type(tp):
            kwargs[key] = _build(tp, shorthand(key, value), f"{path}.", problems)
            continue
        ok, coerced = check_type(value, tp)
        if not ok:
            problems.append(problem(path, value, f"must be {type_name(tp)}", "fix its type"))
            continue
        kwargs[key] = coerced
    required = [f for f in fields.values()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for f in required:
        if f.name not in data:
            what = f.metadata.get("help", "")
            problems.append(problem(f"{prefix}{f.name}", None, "is required",
                                    f"add it: {what.rstrip('.')}" if what else "add it"))
    if any(f.name not in kwargs for f in required):
        return None  # missing, or its wrong value is already recorded
    if any(v is None and is_dataclass_type(hints[k]) for k, v in kwargs.items()):
        return None  # a nested section already failed; its problems are recorded
    # Check values without raising yet, so every section's problems are collected together.
    try:
        return cls(**kwargs)
    except ConfigError as e:
        problems.extend(e.problems)
        return None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
