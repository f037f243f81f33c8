"""The image, built from the Dockerfile and run the way users and Ray's launcher run it.

Marker `container`. Builds the CPU smoke image with `docker/build-cpu-image.sh` (podman,
a debootstrapped Debian base and a local wheelhouse, all cached under
~/.cache/qlora-ray-ci, so a rebuild with unchanged dependencies takes seconds), then:

* `--help` and `plan experiments/gpu_profiles.yaml` inside the container;
* the single-GPU path without a GPU: `run experiments/quickstart.yaml` with a mounted
  results folder, as another host user (`--user`), rows read back on the host with pandas;
* the cluster path: a head node started with the command Ray's cluster launcher builds
  from ray_cluster.yaml, token authentication on, and the quickstart submitted to it with
  `ray job submit --working-dir .` from the host, as docs/cluster.md does.

Containers get no network (`--network none`) except the head node, which shares the
host's (as under the launcher) and binds 127.0.0.1 on free, non-default ports only.
Skips with the reason when podman cannot build here; on CI (CI=true) that is a failure.

Do not run Ray tests on the host at the same time: `ray stop` matches Ray processes by
name across the whole machine, containers' included, and takes these tests' Ray down.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.container, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TAG = "localhost/qlora-ray:ci-test"
CACHE = Path(os.environ.get("QLORA_RAY_CI_CACHE", Path.home() / ".cache" / "qlora-ray-ci"))
# A host user other than the image's own (1000): what `--user "$(id -u):$(id -g)"` passes.
HOST_UID = 4321
IMAGE_UID = 1000


def _unusable() -> str | None:
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return (f"{', '.join(missing)} not installed: `scripts/setup.sh --test` installs podman, runc "
                "and debootstrap when run as root")
    if os.geteuid() != 0:
        return "the smoke image's base is made with debootstrap and run with rootful podman: run as root"
    return None


def _env() -> dict[str, str]:
    # runc and no rlimits: what works on the CI machine (docker/containers.conf says why).
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(ROOT / "docker" / "containers.conf"))}


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=_env())
    if check:
        assert proc.returncode == 0, f"podman {' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _git_commit() -> str:
    # As docker/build-cpu-image.sh computes it.
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return f"{commit}-dirty" if dirty else commit


@dataclass(frozen=True)
class Built:
    tag: str
    commit: str  # as the build recorded it; others may commit while these tests run


@pytest.fixture(scope="module")
def built() -> Built:
    reason = _unusable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the container smoke test must run on CI, but: {reason}")
        pytest.skip(reason)
    CACHE.mkdir(parents=True, exist_ok=True)
    commit = _git_commit()
    started = time.monotonic()
    log = CACHE / "last-build.log"
    with log.open("w") as out:
        proc = subprocess.run([str(ROOT / "docker" / "build-cpu-image.sh"), TAG], cwd=ROOT, env=_env(),
                              stdout=out, stderr=subprocess.STDOUT, timeout=1800)
    assert proc.returncode == 0, f"image build failed (full log: {log}):\n{log.read_text()[-6000:]}"
    print(f"\nimage {TAG} built in {time.monotonic() - started:.0f} s")
    return Built(TAG, commit)


@pytest.fixture(scope="module")
def image(built: Built) -> str:
    return built.tag


def builtin_cache(uid: int) -> Path:
    """The built-in model's cache for one container user, kept across CI runs.

    One per uid: a cache is only ever shared by one user (builtin.py writes
    model.safetensors readable by its owner alone).
    """
    return _host_dir(CACHE / f"qlora-ray-cache-uid{uid}", uid)


def _host_dir(path: Path, uid: int) -> Path:
    """A bind-mount source owned by `uid`, as `mkdir results` by that user would make it."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    return path


def test_help_works_inside_the_image(image: str) -> None:
    top = podman("run", "--rm", "--network", "none", image, "--help")
    assert "{plan,run,report,doctor}" in top.stdout
    for verb in ("plan", "run", "report", "doctor"):
        assert f"usage: qlora-ray {verb}" in podman("run", "--rm", "--network", "none", image, verb, "--help").stdout


def test_image_user_entry_point_volumes_and_provenance(image: str, built: Built) -> None:
    config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["Entrypoint"] == ["tini", "--", "qlora-ray"]
    assert set(config["Volumes"]) == {"/workspace/results", "/cache"}
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["QLORA_RAY_IMAGE"] == image
    assert env["QLORA_RAY_GIT_COMMIT"] == built.commit
    assert not {k for k in env if "TOKEN" in k or "SECRET" in k}


def test_plan_of_the_gpu_grid_inside_the_image_matches_the_host(image: str) -> None:
    # Planning needs only config.json: offline it comes from a mounted folder.
    configs = ROOT / "tests" / "fixtures" / "configs"
    inside = podman("run", "--rm", "--network", "none", "-v", f"{configs}:/configs:ro", image,
                    "plan", "experiments/gpu_profiles.yaml", "--model-configs", "/configs", "--json")
    host = subprocess.run([str(BIN / "qlora-ray"), "plan", "experiments/gpu_profiles.yaml", "--model-configs",
                           str(configs), "--json"], cwd=ROOT, capture_output=True, text=True, check=True)
    cells = json.loads(inside.stdout)
    assert len(cells) > 1 and all(c["fits"] for c in cells)
    assert [(c["experiment_id"], c["predicted_peak_bytes"]) for c in cells] == [
        (c["experiment_id"], c["predicted_peak_bytes"]) for c in json.loads(host.stdout)]


def _quickstart_cells() -> int:
    from qlora_ray.grid import load_spec

    return len(load_spec(ROOT / "experiments" / "quickstart.yaml").cells)


def test_quickstart_in_the_container_writes_rows_the_host_reads(image: str, built: Built, tmp_path: Path) -> None:
    # docs/docker.md: mkdir -p results; docker run --user "$(id -u):$(id -g)" -v "$PWD/results:/workspace/results" IMAGE run ...
    results = _host_dir(tmp_path / "results", HOST_UID)
    run = ["run", "--rm", "--network", "none", "--user", f"{HOST_UID}:{HOST_UID}",
           "-v", f"{results}:/workspace/results", "-v", f"{builtin_cache(HOST_UID)}:/cache/qlora-ray",
           image, "run", "experiments/quickstart.yaml"]
    started = time.monotonic()
    proc = podman(*run, timeout=1200)
    print(f"\nquickstart in the container: {time.monotonic() - started:.0f} s")

    runs = results / "quickstart" / "runs"
    df = pd.read_parquet(runs)
    assert len(df) == _quickstart_cells() and (df["status"] == "ok").all(), proc.stdout[-3000:]
    assert (df["image"] == image).all() and (df["git_commit"] == built.commit).all()
    assert (df["memory_source"] == "cpu_rss").all() and (df["peak_memory_bytes"] > 0).all()
    assert (df["similarity_score"] < df["similarity_score_before"]).all()
    # Owned by the user who ran it, not root and not the image's user.
    for path in [results / "quickstart", runs, *runs.iterdir()]:
        assert path.stat().st_uid == HOST_UID, path
    assert any((results / "quickstart" / "samples").iterdir())

    # A second run resumes from the mounted folder: nothing to do.
    again = podman(*run, timeout=600)
    assert f"{_quickstart_cells()} already have a row, 0 to run" in again.stdout


# --------------------------------------------------------------------------- the cluster path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node(image: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A Ray head node in the image, started like `ray up ray_cluster.yaml` starts one."""
    from ray.autoscaler._private.docker import docker_start_cmds
    from ray.autoscaler.sdk import get_docker_host_mount_location

    cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    name = f"qlora-ray-ci-{os.getpid()}"
    container = f"{cluster['docker']['container_name']}_{os.getpid()}"
    token = secrets.token_hex(24)
    # file_mounts: the launcher rsyncs ~/.ray/auth_token to this host folder (owned by the
    # node's ssh user, uid 1000 on the AMIs) and bind-mounts it into the container.
    mount_root = Path(get_docker_host_mount_location(name))
    token_file = mount_root / "~" / ".ray" / "auth_token"
    shutil.rmtree(mount_root, ignore_errors=True)
    token_file.parent.mkdir(parents=True)
    token_file.write_text(token)
    token_file.chmod(0o600)
    os.chown(token_file, IMAGE_UID, IMAGE_UID)
    results = _host_dir(tmp_path / "results", IMAGE_UID)

    options = []
    for option in cluster["docker"]["run_options"]:
        # The CI machine's hard nofile limit is below 65536 and podman may not raise it
        # (docker/containers.conf); the AMI's cache folder is replaced by this test's.
        if option.startswith(("--ulimit", "--volume /home/ubuntu")):
            continue
        options.append(option)
    options += [f"--volume {builtin_cache(IMAGE_UID)}:/cache/qlora-ray", f"--volume {results}:/workspace/results"]
    start = docker_start_cmds("ubuntu", image, cluster["file_mounts"], container, options, name,
                              "/home/qlora", "podman")
    subprocess.run(["bash", "-c", start], env=_env(), check=True, capture_output=True, text=True, timeout=120)

    ports = {p: _free_port() for p in ("port", "dashboard-port", "ray-client-server-port", "node-manager-port",
                                       "object-manager-port", "dashboard-agent-grpc-port",
                                       "dashboard-agent-listen-port", "metrics-export-port",
                                       "runtime-env-agent-port")}
    # ray_cluster.yaml's head command, on loopback and free ports (the node shares the
    # host's network) and with CPUs for the experiments (there are no worker nodes here).
    ray_start = ("ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 "
                 "--disable-usage-stats --num-cpus=2 --min-worker-port=20000 --max-worker-port=20999 "
                 + " ".join(f"--{k}={v}" for k, v in ports.items()))
    # Its output goes to a file: Ray's daemons inherit ray start's stdout, and a pipe that
    # closes when `podman exec` returns would kill them with SIGPIPE (the launcher's
    # `docker exec -it` gives them a terminal instead).
    ray_start += " > /tmp/ray-start.log 2>&1 || { cat /tmp/ray-start.log; exit 1; }"
    try:
        podman("exec", container, "/bin/bash", "-c", ray_start, timeout=180)
        yield {"dashboard": f"http://127.0.0.1:{ports['dashboard-port']}", "token": token,
               "results": str(results), "container": container}
    finally:
        podman("exec", container, "ray", "stop", "--force", check=False, timeout=120)
        podman("rm", "-f", "-t", "5", container, check=False, timeout=120)
        shutil.rmtree(mount_root, ignore_errors=True)


def _ray(*args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "ray"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_head_node_started_like_the_launcher_runs_a_submitted_grid_with_token_auth(
    head_node: dict[str, str],
) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base["RAY_USAGE_STATS_ENABLED"] = "0"

    # Without the token the dashboard refuses the request.
    anonymous = _ray("job", "list", "--address", head_node["dashboard"], env=base, timeout=120)
    assert anonymous.returncode != 0
    assert "401" in anonymous.stdout + anonymous.stderr or "uthentication" in anonymous.stdout + anonymous.stderr

    # docs/cluster.md: RAY_AUTH_MODE=token, the token, `ray job submit --working-dir .`.
    env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head_node["token"]}
    started = time.monotonic()
    submit = _ray("job", "submit", "--address", head_node["dashboard"], "--working-dir", ".", "--",
                  "qlora-ray", "run", "experiments/quickstart.yaml", "--results", "/workspace/results", env=env)
    print(f"\nquickstart as a job on the containerized head: {time.monotonic() - started:.0f} s")
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
    assert "succeeded" in submit.stdout.lower()

    df = pd.read_parquet(Path(head_node["results"]) / "quickstart" / "runs")
    assert len(df) == _quickstart_cells() and (df["status"] == "ok").all()
    assert df["ray_node_id"].notna().all() and (df["image"] == TAG).all()
    # `ray job logs` (how docs/cluster.md follows progress) shows the driver's lines.
    job_id = re.search(r"raysubmit_\w+", submit.stdout).group(0)
    logs = _ray("job", "logs", job_id, "--address", head_node["dashboard"], env=env, timeout=120)
    assert "progress:" in logs.stdout and "quickstart" in logs.stdout
