"""What every test module shares: where things are, and a model cache of the tests' own.

Test modules import the paths (`from conftest import ROOT, DATA`). The `builtin:tiny-llama`
model the tests load is built into `QLORA_RAY_CACHE`, which the whole run (and every
process it starts: CLI subprocesses, Ray workers) points at a folder of the run's own, never
the user's `~/.cache/qlora-ray`: pytest's cache folder (`.pytest_cache/d/qlora-ray` in the
checkout, kept between runs so the ~15 s build happens once; `pytest --cache-clear` drops
it), or a temporary folder when the cache plugin is off. A `QLORA_RAY_CACHE` you set
yourself wins (CI can keep one between jobs).

Tiers: `pytest -m "not slow"` is the quick loop; `slow` marks anything that trains a whole
cell, starts Ray, a server, a browser or a container (README "Tests" has the timings).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's console scripts: qlora-ray, ray
DATA = ROOT / "experiments" / "data" / "fin_sentiment.jsonl"  # the shipped dataset
CONFIGS = ROOT / "tests" / "fixtures" / "configs"  # config.json of hub models, for offline planning

CACHE_ENV = "QLORA_RAY_CACHE"  # qlora_ray.builtin.CACHE_ENV (not imported: keep conftest light)
_temporary: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get(CACHE_ENV):
        return
    cache = getattr(config, "cache", None)  # None under `-p no:cacheprovider`
    if cache is not None:
        folder = str(cache.mkdir("qlora-ray"))
    else:
        folder = tempfile.mkdtemp(prefix="qlora-ray-cache-")
        _temporary.append(folder)
    os.environ[CACHE_ENV] = folder


def pytest_unconfigure(config: pytest.Config) -> None:
    for folder in _temporary:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A folder for RAY_TMPDIR/TMPDIR, directly under /tmp: Ray's socket paths under it must
    fit AF_UNIX's 107 bytes, which pytest's tmp_path can exceed."""
    folder = Path(tempfile.mkdtemp(prefix="qlr-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
