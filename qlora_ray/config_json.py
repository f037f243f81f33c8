"""A model's `config.json`, found without its weights: all that planning reads of a model."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qlora_ray.config import BUILTIN_PREFIX, ConfigError, problem

MODEL_CONFIGS_ENV = "QLORA_RAY_MODEL_CONFIGS"


def load_model_config(
    name: str, revision: str | None = None, search: Sequence[str | Path] = ()
) -> dict[str, Any]:
    """A model's `config.json` as a dict; never its weights.

    Looked up in order: `builtin:` models (built in memory); a local folder holding
    `config.json` (nothing else is needed) or a `.json` file; `DIR/<hub id>/config.json` for
    each DIR in `search` and in $QLORA_RAY_MODEL_CONFIGS (os.pathsep-separated); the hub,
    through huggingface_hub (its cache first, so a model used before plans offline).
    """
    if name.startswith(BUILTIN_PREFIX):
        from qlora_ray.builtin import builtin_model_config

        return dict(builtin_model_config(name))

    local = Path(name).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return _read_json(local / "config.json", name)
        raise ConfigError([problem("model.name", name, "is a folder without config.json",
                                   "point it at a model folder (config.json is all `plan` needs)")])
    if local.is_file():
        return _read_json(local, name)

    folders = [*search, *filter(None, os.environ.get(MODEL_CONFIGS_ENV, "").split(os.pathsep))]
    for folder in folders:
        for candidate in (Path(folder) / name / "config.json",
                          Path(folder) / name.replace("/", "--") / "config.json"):
            if candidate.is_file():
                return _read_json(candidate, name)

    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(name, "config.json", revision=revision)
    except Exception as e:  # offline, gated, missing: all mean the same to the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:160]
        # Gated repos (meta-llama/...) answer 401/403 without a token, even for config.json.
        token = "set" if os.environ.get("HF_TOKEN") else "not set here"
        raise ConfigError([problem(
            "model.name", name, f"has no readable config.json ({type(e).__name__}: {first})",
            f"a gated model needs its licence accepted on the hub and HF_TOKEN (now {token}); "
            "planning needs only that file: put it in a folder and set model.name to the folder, "
            f"or save it as DIR/{name}/config.json and pass --model-configs DIR "
            f"(or set {MODEL_CONFIGS_ENV}=DIR)",
        )]) from e
    return _read_json(Path(path), name)


def _read_json(path: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError([problem("model.name", name, f"has an unreadable {path} ({e})",
                                   "give a valid config.json")]) from e
    if not isinstance(data, dict):
        raise ConfigError([problem("model.name", name, f"has a {path} that is not an object",
                                   "give a model's config.json")])
    return data
