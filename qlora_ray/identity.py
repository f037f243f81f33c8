"""What `experiment_id` hashes, and the ids qlora-ray 0.1.0 gave the same cells.

A rerun finds a cell's row by its id; the rules below keep that id fixed whatever the
spec's spelling or the installed version (docs/reliability.md, "Identity").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import TYPE_CHECKING, Any

from qlora_ray.fromdict import check_type, is_dataclass_type, to_dict, type_hints

if TYPE_CHECKING:
    from qlora_ray.config import ExperimentConfig

# The id must depend only on what the cell *is*, never on how the spec spells it or on the
# version. Each config field is declared with `config._f`, whose keywords carry these rules:
#
# 1. Every value is first converted to its field's declared type (`alpha: 16` and the
#    default 16 are both the float 16.0; `2e-4` written as a string is the float 0.0002).
# 2. Only fields that change what is trained or measured count; a field declared with
#    `identity=False` (the cell's `name`, a label) is left out.
# 3. A field added after the first release MUST be declared with `since="<version>"`: it is
#    left out of the hash while it holds its default, so adding it changes no existing id
#    and an upgrade reruns nothing.
# 4. Changing a field's default changes the id of every cell that left it out. Only when
#    the new default trains exactly what the old one did, declare `same_as={new: old}`:
#    the hash then reads the new value as the old one.
# tests/golden/experiment_ids.json pins the id of every cell of every shipped spec, so a
# change that breaks these rules fails a test. Ids written by 0.1.0, which hashed values
# as spelled, are found again through `legacy_experiment_id`.
FIRST_RELEASE = "0.1.0"


def experiment_id(cfg: Any) -> str:
    """12 hex digits of the sha256 of `canonical(cfg)`."""
    return _hash(canonical(cfg))


def canonical(cfg: Any) -> dict[str, Any]:
    """The part of a config that is its identity, each value in its declared type (JSON-able)."""
    hints = type_hints(type(cfg))
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if not f.metadata.get("identity", True):
            continue
        value = getattr(cfg, f.name)
        if is_dataclass_type(hints[f.name]):
            out[f.name] = canonical(value)
            continue
        value = _as_declared(value, hints[f.name], f)
        if f.metadata.get("since", FIRST_RELEASE) != FIRST_RELEASE and value == _as_declared(
            field_default(f), hints[f.name], f
        ):
            continue  # added later and at its default: the cell is what it was before
        out[f.name] = value
    return out


def legacy_experiment_id(cfg: ExperimentConfig) -> str | None:
    """The id qlora-ray 0.1.0 gave this cell, or None if 0.1.0 could not have run it.

    0.1.0 hashed every field but `name` with each value as spelled (`alpha: 16` written out
    was 16.0, left out it was the integer default 16), so the same cell written two ways had
    two ids. This is used only to find rows 0.1.0 wrote; `run` moves them to their new ids.
    """
    payload = to_dict(cfg)
    payload.pop("name")
    if not _as_first_release(cfg, payload):
        return None
    return _hash(payload)


def field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _as_first_release(cfg: Any, payload: dict[str, Any]) -> bool:
    """Make `payload` what 0.1.0 hashed: later fields dropped, changed defaults put back.

    False if a later field holds a non-default value (0.1.0 could not have run the cell).
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("since", FIRST_RELEASE) != FIRST_RELEASE:
            if value != field_default(f):
                return False
            payload.pop(f.name, None)
        elif dataclasses.is_dataclass(value):
            if not _as_first_release(value, payload[f.name]):
                return False
        elif f.name in payload and isinstance(payload[f.name], (str, int, float, bool)):
            payload[f.name] = (f.metadata.get("same_as") or {}).get(payload[f.name], payload[f.name])
    return True


def _hash(payload: dict[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _as_declared(value: Any, tp: Any, f: dataclasses.Field[Any]) -> Any:
    """`value` converted to the declared type `tp` (tuples as lists, for JSON), aliases resolved."""
    ok, coerced = check_type(value, tp)
    if not ok:  # only a config built in Python, bypassing from_dict, can hold such a value
        coerced = value
    if isinstance(coerced, tuple):
        return list(coerced)
    same_as = f.metadata.get("same_as") or {}
    return same_as.get(coerced, coerced) if isinstance(coerced, (str, int, float, bool)) else coerced
