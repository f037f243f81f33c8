"""Grid specs (YAML) -> validated experiment configs. Pure: no I/O beyond reading the spec.

`load_spec(path)` expands `base` over `grid`, `paired`, `seeds`, `preset`, `runs` and
`exclude` (README, "Grid specs") and raises every problem at once as one `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qlora_ray.config import (
    SAFE_NAME,
    UNSAFE_NAME_CHAR,
    ConfigError,
    ExperimentConfig,
    from_dict,
    problem,
    set_dotted,
)
from qlora_ray.profiles import GpuProfile, get_profile, new_card_defaults, preset_overrides

SPEC_KEYS = ("name", "base", "grid", "paired", "seeds", "exclude", "runs", "profiles", "description",
             "preset")
# Bounds on what a spec may ask for (see load_spec / expand).
DEFAULT_MAX_CELLS = 10_000
MAX_SPEC_BYTES = 1024 * 1024

# Short tokens for the human-readable cell name, e.g. r8-bs4-bf16-T4.
_AXIS_TOKENS = {
    "lora.r": "r{}",
    "lora.alpha": "a{}",
    "lora.dropout": "do{}",
    "train.batch_size": "bs{}",
    "train.grad_accum": "ga{}",
    "train.learning_rate": "lr{}",
    "train.epochs": "ep{}",
    "train.max_seq_len": "len{}",
    "train.seed": "s{}",
    "quant.bits": "{}bit",
    "quant.type": "{}",
    "gpu": "{}",
}
_DTYPE_TOKENS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "auto": "autodtype"}


@dataclass(frozen=True)
class Spec:
    """A loaded, expanded and validated grid spec."""

    name: str
    cells: list[ExperimentConfig]
    profiles: dict[str, GpuProfile] = field(default_factory=dict)


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.safe_load without anchors and aliases.

    Nested aliases make a few hundred bytes expand into gigabytes (the "billion laughs"),
    and a spec has `grid`, `paired` and `runs` for repetition, so `&name` / `*name` are
    refused where the parser meets them, before anything is built.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            kind = "*" if isinstance(event, yaml.AliasEvent) else "&"
            raise _AliasError(event.start_mark.line + 1, f"{kind}{event.anchor}")
        return super().compose_node(parent, index)


class _AliasError(Exception):
    def __init__(self, line: int, token: str):
        super().__init__(token)
        self.line = line
        self.token = token


def load_spec(path: str | Path, *, max_cells: int = DEFAULT_MAX_CELLS) -> Spec:
    """Read a YAML spec and expand it; every problem is raised at once."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([problem("SPEC", str(path), "is not a file", "pass the path of a YAML spec")])
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise ConfigError([problem("SPEC", str(path), f"is {size:,} bytes, more than a spec needs "
                                   f"(the limit is {MAX_SPEC_BYTES:,})",
                                   "describe the grid with `grid:` axes instead of listing cells")])
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass
    except _AliasError as e:
        raise ConfigError([problem(
            f"{path}:{e.line}", e.token, "uses a YAML anchor or alias",
            "write the values out; use `grid`, `paired` or `runs` for repetition")]) from e
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 0
        what = " ".join(str(e.problem or e.context or "syntax error").split())
        source = text.splitlines()[line - 1] if 0 < line <= len(text.splitlines()) else ""
        raise ConfigError([problem(f"{path}:{line}", source.strip(), f"is not valid YAML ({what})",
                                   "fix the syntax on that line")]) from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        what = " ".join(str(e).split())
        raise ConfigError([problem("SPEC", str(path), f"is not valid YAML ({what})",
                                   "fix the syntax, and save the file as UTF-8")]) from e
    return expand(data, max_cells=max_cells)


def count_cells(data: dict[str, Any]) -> int:
    """Cells the spec's axes and runs make before exclude rules: len(runs) x every axis."""
    axes: list[int] = []
    grid = data.get("grid")
    if isinstance(grid, dict):
        axes += [len(v) for v in grid.values() if isinstance(v, list)]
    paired = data.get("paired")
    if isinstance(paired, list):
        for group in paired:
            if isinstance(group, dict):
                axes.append(max((len(v) for v in group.values() if isinstance(v, list)), default=1))
    if isinstance(data.get("seeds"), list):
        axes.append(len(data["seeds"]))
    runs = data.get("runs")
    n = len(runs) if isinstance(runs, list) and runs else 1
    return n * math.prod(max(a, 1) for a in axes)


def expand(data: Any, *, max_cells: int = DEFAULT_MAX_CELLS) -> Spec:
    """Spec mapping -> Spec with one ExperimentConfig per cell, in a stable order.

    A spec whose axes multiply out to more than `max_cells` cells is refused before any
    cell is built (the CLI's `--max-cells` raises the cap).
    """
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([problem("spec", data, "must be a mapping", "start from experiments/example.yaml")])
    total = count_cells(data)
    if total > max_cells:
        raise ConfigError([problem("grid", f"{total:,} cells", f"expands to more than {max_cells:,} cells "
                                   "(the cap that keeps a typo from queueing millions of experiments)",
                                   "narrow the axes, or pass --max-cells N to allow more")])
    for key in data:
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(str(key), SPEC_KEYS, n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"known keys: {', '.join(SPEC_KEYS)}"
            problems.append(problem(str(key), data[key], "is not a known spec key", hint))

    name = data.get("name")
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        problems.append(problem("name", name, "must be a file-name-safe string",
                                "use letters, digits and . _ + = - (e.g. rank-vs-gpu)"))
    base = data.get("base", {}) or {}
    if not isinstance(base, dict):
        problems.append(problem("base", base, "must be a mapping", "write base: {model: ..., lora: ...}"))
        base = {}
    if "name" in base:
        problems.append(problem("base.name", base["name"], "is set by the grid",
                                "name cells with `runs:` entries instead"))

    profiles = _profiles(data.get("profiles"), problems)
    defined = set(data["profiles"]) if isinstance(data.get("profiles"), dict) else set()
    axes = _axes(data, problems)
    runs = _runs(data.get("runs"), problems)
    excludes = _excludes(data.get("exclude"), problems)
    # Go on expanding with whatever parts are valid, so one run reports every problem.
    # Checks that depend on the whole grid (duplicates, unused rules) would only echo the
    # problems above, so they wait until the spec's structure is right.
    structural = bool(problems)

    cells: list[ExperimentConfig] = []
    matched_rules: set[int] = set()
    for run_name, overrides in runs:
        for combo in itertools.product(*axes):
            values: dict[str, Any] = {**overrides}
            for group in combo:
                values.update(group)
            hits = [i for i, rule in enumerate(excludes) if _matches(rule, values, base)]
            if hits:
                matched_rules.update(hits)
                continue
            cell = _nested_copy(base)
            try:
                # A preset sits between the base and the axes: an axis or run value still wins.
                preset = preset_overrides(data.get("preset"), values.get("gpu", base.get("gpu")), profiles)
            except ConfigError as e:
                problems.extend(e.problems)
                continue
            for key, value in {**preset, **values}.items():
                set_dotted(cell, key, value)
            cell["name"] = _cell_name(run_name, combo)
            try:
                cfg = from_dict(ExperimentConfig, cell)
            except ConfigError as e:
                problems.extend(e.problems)
                continue
            if cfg.gpu is not None and cfg.gpu not in defined:  # a bad entry says what is wrong itself
                try:
                    get_profile(cfg.gpu, profiles)
                except ConfigError as e:
                    problems.extend(e.problems)
            cells.append(cfg)

    for i, rule in enumerate(excludes):
        if i not in matched_rules and not structural:
            problems.append(problem(f"exclude[{i}]", rule, "matches no cell",
                                    "fix the key or value, or remove the rule"))
    if not structural:
        problems.extend(_duplicates(cells))
    if not cells and not problems:
        problems.append(problem("exclude", data.get("exclude"), "removes every cell",
                                "loosen the exclude rules"))
    if problems:
        raise ConfigError(problems)
    return Spec(name=name, cells=cells, profiles=profiles)


def _axes(data: dict[str, Any], problems: list[str]) -> list[list[dict[str, Any]]]:
    """Each axis is a list of {dotted key: value} groups; the product of axes is the grid."""
    axes: list[list[dict[str, Any]]] = []
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        problems.append(problem("grid", grid, "must be a mapping of dotted keys to lists",
                                "write e.g. grid: {lora.r: [8, 16]}"))
        grid = {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            problems.append(problem(f"grid.{key}", values, "must be a non-empty list",
                                    f"write e.g. {key}: [value1, value2]"))
            continue
        if len(_unique(values)) != len(values):
            problems.append(problem(f"grid.{key}", values, "repeats a value", "list each value once"))
        axes.append([{key: v} for v in values])

    paired = data.get("paired") or []
    if not isinstance(paired, list):
        problems.append(problem("paired", paired, "must be a list of groups",
                                "write paired: [{train.batch_size: [1, 2], train.grad_accum: [2, 1]}]"))
        paired = []
    for i, group in enumerate(paired):
        if not isinstance(group, dict) or not group:
            problems.append(problem(f"paired[{i}]", group, "must be a mapping of dotted keys to lists",
                                    "write {train.batch_size: [1, 2], train.grad_accum: [2, 1]}"))
            continue
        bad = {k: v for k, v in group.items() if not isinstance(v, list) or not v}
        for k, v in bad.items():
            problems.append(problem(f"paired[{i}].{k}", v, "must be a non-empty list", "list its values"))
        lengths = {k: len(v) for k, v in group.items() if k not in bad}
        if len(set(lengths.values())) > 1:
            problems.append(problem(f"paired[{i}]", lengths, "has lists of different lengths",
                                    "give every key in a group the same number of values"))
            continue
        if bad:
            continue
        n = next(iter(lengths.values()))
        axes.append([{k: group[k][j] for k in group} for j in range(n)])

    seeds = data.get("seeds")
    if seeds is not None:
        if (
            not isinstance(seeds, list)
            or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        ):
            problems.append(problem("seeds", seeds, "must be a non-empty list of integers",
                                    "write e.g. seeds: [0, 1, 2]"))
        elif len(set(seeds)) != len(seeds):
            problems.append(problem("seeds", seeds, "repeats a seed", "list each seed once"))
        else:
            axes.append([{"train.seed": s} for s in seeds])
    return axes


def _runs(runs: Any, problems: list[str]) -> list[tuple[str | None, dict[str, Any]]]:
    if runs is None:
        return [(None, {})]
    if not isinstance(runs, list) or not runs:
        problems.append(problem("runs", runs, "must be a non-empty list", "write runs: [{name: a}, ...]"))
        return []
    out: list[tuple[str | None, dict[str, Any]]] = []
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or not isinstance(run.get("name"), str):
            problems.append(problem(f"runs[{i}]", run, "needs a `name`", "write {name: my-run, lora.r: 8}"))
            continue
        overrides = {k: v for k, v in run.items() if k != "name"}
        out.append((run["name"], overrides))
    return out


def _excludes(rules: Any, problems: list[str]) -> list[dict[str, Any]]:
    if rules is None:
        return []
    if not isinstance(rules, list) or not all(isinstance(r, dict) and r for r in rules):
        problems.append(problem("exclude", rules, "must be a list of mappings",
                                "write exclude: [{gpu: T4, quant.compute_dtype: bfloat16}]"))
        return []
    return rules


def _profiles(raw: Any, problems: list[str]) -> dict[str, GpuProfile]:
    """`profiles: {MyCard: {total_mib: 24576, bf16: true, ...}}` adds or overrides profiles.

    An entry for a built-in card changes only the keys it gives; a new card needs `total_mib`
    and `compute_capability` (`profiles.new_card_defaults`).
    Each is built by `from_dict`, so it is checked like every other section.
    """
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(problem("profiles", raw, "must be a mapping of name to profile",
                                "write profiles: {MyCard: {total_mib: 24576, bf16: true}}"))
        return {}
    out: dict[str, GpuProfile] = {}
    for name, fields in raw.items():
        if not isinstance(name, str):
            problems.append(problem("profiles", name, "has a profile name that is not a safe name",
                                    "use letters, digits and . _ + = - (e.g. RTX-4090)"))
            continue
        key = f"profiles.{name}"
        if isinstance(fields, dict) and "name" in fields:
            problems.append(problem(f"{key}.name", fields["name"], "is the entry's key already",
                                    "remove it (rename the entry instead)"))
            continue
        if isinstance(fields, dict) and isinstance(fields.get("compute_capability"), int | float) and not \
                isinstance(fields["compute_capability"], bool):
            # YAML reads `compute_capability: 8.9` as a number; it means the string.
            fields = {**fields, "compute_capability": str(fields["compute_capability"])}
        try:
            base = dataclasses.asdict(get_profile(name, key=key))
        except ConfigError:  # a new card: from_dict asks for what has no default (total_mib)
            base, missing = new_card_defaults(name, fields, key)
            problems.extend(missing)
        merged = {**base, **fields, "name": name} if isinstance(fields, dict) else fields
        try:
            out[name] = from_dict(GpuProfile, merged, prefix=f"{key}.")
        except ConfigError as e:
            problems.extend(e.problems)
    return out


def _get_dotted(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _matches(rule: dict[str, Any], values: dict[str, Any], base: dict[str, Any]) -> bool:
    for key, want in rule.items():
        have = values.get(key, _MISSING)
        if have is _MISSING:
            have = _get_dotted(base, key)
        if have != want:
            return False
    return True


def _cell_name(run_name: str | None, combo: tuple[dict[str, Any], ...]) -> str:
    tokens = [run_name] if run_name else []
    for group in combo:
        for key, value in group.items():
            tokens.append(_token(key, value))
    name = "-".join(t for t in tokens if t) or "base"
    return UNSAFE_NAME_CHAR.sub("_", name)[:128]


def _token(key: str, value: Any) -> str:
    if key == "quant.compute_dtype":
        return _DTYPE_TOKENS.get(str(value), str(value))
    if key in _AXIS_TOKENS:
        return _AXIS_TOKENS[key].format(value)
    if key == "model" or key == "model.name":
        return str(value).rstrip("/").split("/")[-1]
    if isinstance(value, bool):
        return key.split(".")[-1] if value else "no-" + key.split(".")[-1]
    if isinstance(value, (list, dict)):
        return key.split(".")[-1] + str(len(value))
    return f"{key.split('.')[-1]}{value}"


def _duplicates(cells: list[ExperimentConfig]) -> list[str]:
    out: list[str] = []
    by_id: dict[str, str] = {}
    names: set[str] = set()
    for cfg in cells:
        eid = cfg.experiment_id
        if eid in by_id:
            out.append(problem("grid", [by_id[eid], cfg.name],
                               "has two cells that resolve to the same experiment",
                               "remove the repeated axis value or run, or make the cells differ"))
        elif cfg.name in names:
            out.append(problem("runs", cfg.name, "names two different cells",
                               "give each run a distinct name"))
        by_id.setdefault(eid, cfg.name)
        names.add(cfg.name)
    return out


def _unique(values: list[Any]) -> list[Any]:
    seen: list[Any] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def _nested_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _nested_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_nested_copy(v) for v in data]
    return data
