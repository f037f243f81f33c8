"""Where a row came from: package versions, git commit, container image, host, Ray node."""

from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from typing import Any

PACKAGES = {
    "qlora_ray_version": "qlora-ray",
    "torch_version": "torch",
    "transformers_version": "transformers",
    "peft_version": "peft",
    "bitsandbytes_version": "bitsandbytes",
    "accelerate_version": "accelerate",
    "datasets_version": "datasets",
    "ray_version": "ray",
}

# Set by the Dockerfile (build args) so rows made inside the image name it and its commit.
IMAGE_ENV = "QLORA_RAY_IMAGE"
GIT_COMMIT_ENV = "QLORA_RAY_GIT_COMMIT"


@functools.cache  # a process sees one installed version; reading it costs ~1 ms
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def git_commit() -> str | None:
    """The project's commit: from the image's env, else `git` in the working directory."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"{out}-dirty" if dirty else out
    except (OSError, subprocess.SubprocessError):
        return None


def hub_commit(name: str, revision: str | None = None) -> str | None:
    """The hub commit whose files `name` at `revision` loads from the local cache.

    transformers (5.x) resolves a branch to a commit before loading but no longer records it
    on the config, so it is read back from where the files are: the cache's
    `snapshots/<commit>/` folder. None for a local folder or a repo not in the cache.
    """
    if os.path.isdir(os.path.expanduser(name)):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # an id that is not a repo name, a cache that cannot be read
        return None
    if not isinstance(path, str):
        return None
    parts = path.replace(os.sep, "/").split("/")
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def ray_node_id() -> str | None:
    # A process that never imported Ray is not in a Ray cluster (an experiment's own process,
    # fresh.py: its Ray task adds the node), and importing Ray to find that out takes seconds.
    if "ray" not in sys.modules:
        return None
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:
        pass
    return None


def collect(cuda_version: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {col: _version(dist) for col, dist in PACKAGES.items()}
    row.update(
        python_version=platform.python_version(),
        cuda_version=cuda_version,
        git_commit=git_commit(),
        image=os.environ.get(IMAGE_ENV),
        hostname=socket.gethostname(),
        ray_node_id=ray_node_id(),
    )
    return row
