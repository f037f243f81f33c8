"""The image, built from the Dockerfile and run the way users and Ray's launcher run it.

Marker `container`. Builds the CPU smoke image with `docker/build-cpu-image.sh` (podman,
a debootstrapped Debian base and a local wheelhouse, all cached under
~/.cache/qlora-ray-ci, so a rebuild with unchanged dependencies takes seconds), then:

* `--help`, Ray's AWS node provider (the head's autoscaler runs in the image) and
  `plan experiments/gpu_profiles.yaml` inside the container;
* the single-GPU path without a GPU: `run experiments/quickstart.yaml` with a mounted
  results folder, as another host user (`--user`), rows read back on the host with pandas;
  then the README's Docker block as written (`docker` being podman without `--gpus`);
* the cluster path: a head node started with the command Ray's cluster launcher builds
  from ray_cluster.yaml, with the token the README's step makes: the quickstart submitted
  with `ray job submit --working-dir .`; KubeRay's health probes; KubeRay's submitter
  command for k8s/rayjob/rayjob.yaml; the README's cluster block as written (`ray up`,
  `ray dashboard`, `ray down` stood in for); a regenerated token reaching the container.
  Results of the GPU grid go to an S3 server (moto) on loopback.

Containers get no network (`--network none`) except the head node, which shares the
host's (as under the launcher) and binds 127.0.0.1 on free, non-default ports only, and
the README block's tunnel, which needs 127.0.0.1:8265.
Skips with the reason when podman cannot build here; on CI (CI=true) that is a failure.

Do not run Ray tests on the host at the same time: `ray stop` matches Ray processes by
name across the whole machine, containers' included, and takes these tests' Ray down.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import BIN, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.container, pytest.mark.timeout(2400)]

TAG = "localhost/qlora-ray:ci-test"
CACHE = Path(os.environ.get("QLORA_RAY_CI_CACHE", Path.home() / ".cache" / "qlora-ray-ci"))
# A host user other than the image's own (1000): what `--user "$(id -u):$(id -g)"` passes.
HOST_UID = 4321
IMAGE_UID = 1000
# What docs/cluster.md's build passes as QLORA_RAY_SOURCE: GHCR links (and shows) a new
# package through the image's org.opencontainers.image.source label.
SOURCE = "https://github.com/example-org/qlora-ray"


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
        proc = subprocess.run([str(ROOT / "docker" / "build-cpu-image.sh"), TAG], cwd=ROOT,
                              env={**_env(), "QLORA_RAY_SOURCE": SOURCE},
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


def test_the_image_loads_rays_aws_node_provider_and_the_head_start_helper(image: str) -> None:
    # The head's autoscaler runs in this image: without boto3, Ray's AWS provider does not
    # import and no worker node is ever launched (ray/autoscaler/_private/providers.py).
    python = ["run", "--rm", "--network", "none", "--entrypoint", "python", image]
    provider = podman(*python, "-c", "from ray.autoscaler._private.providers import _get_node_provider_cls; "
                                     "print(_get_node_provider_cls({'type': 'aws'}).__name__)")
    assert provider.stdout.strip().endswith("AWSNodeProvider")
    assert "pin-ami" in podman(*python, "-m", "qlora_ray.launcher", "--help").stdout


def test_help_works_inside_the_image(image: str) -> None:
    from qlora_ray.cli import VERBS  # every verb of this checkout, so a new one is checked too

    top = podman("run", "--rm", "--network", "none", image, "--help")
    assert "{" + ",".join(VERBS) + "}" in top.stdout, top.stdout
    for verb in VERBS:
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
    labels = config.get("Labels") or {}
    assert labels.get("org.opencontainers.image.source") == SOURCE, labels
    assert labels.get("org.opencontainers.image.revision") == built.commit, labels


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


@pytest.fixture(scope="module")
def quickstart_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Filled by the quickstart test; the README's Docker block then resumes from a copy."""
    return tmp_path_factory.mktemp("quickstart") / "results"


def test_quickstart_in_the_container_writes_rows_the_host_reads(image: str, built: Built,
                                                                 quickstart_results: Path) -> None:
    # docs/docker.md: mkdir -p results; docker run --user "$(id -u):$(id -g)" -v "$PWD/results:/workspace/results" IMAGE run ...
    results = _host_dir(quickstart_results, HOST_UID)
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
# One head node in the image for the tests below, started the way `ray up ray_cluster.yaml`
# starts one, with the token the README's step makes, and an S3 server (moto, in this
# process, on loopback) standing in for the bucket.

RAYJOB_BUCKET, README_BUCKET = "rayjob-results", "readme-results"
GPU_GRID = "llama31-8b-gpu-profiles"  # experiments/gpu_profiles.yaml


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 with the two buckets; the env to reach it."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    for bucket in (RAYJOB_BUCKET, README_BUCKET):
        client.create_bucket(Bucket=bucket)
    try:
        yield env
    finally:
        server.stop()


def _rows(s3: dict[str, str], bucket: str) -> pd.DataFrame:
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=s3["AWS_ENDPOINT_URL"].split("://")[1], scheme="http",
                           access_key="testing", secret_key="testing", region="us-east-1")
    return pd.read_parquet(f"{bucket}/qlora-ray/{GPU_GRID}/runs", filesystem=fs)


def _gpu_grid_cells() -> int:
    from qlora_ray.grid import load_spec

    return len(load_spec(ROOT / "experiments" / "gpu_profiles.yaml").cells)


@pytest.fixture(scope="module")
def head_node(image: str, tmp_path_factory: pytest.TempPathFactory, s3: dict[str, str]) -> Iterator[dict[str, str]]:
    """A Ray head node in the image, started like `ray up ray_cluster.yaml` starts one."""
    from ray.autoscaler._private.docker import docker_start_cmds
    from ray.autoscaler.sdk import get_docker_host_mount_location

    tmp = tmp_path_factory.mktemp("head")
    cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    name = f"qlora-ray-ci-{os.getpid()}"
    container = f"{cluster['docker']['container_name']}_{os.getpid()}"
    # Your machine: the README's token step, for real, in a HOME of its own.
    home = tmp / "home"
    home.mkdir()
    local = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "HOME": str(home),
             "RAY_AUTH_MODE": "token"}
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=local, check=True, capture_output=True)
    token = (home / ".ray" / "auth_token").read_text().strip()
    # file_mounts: the launcher rsyncs ~/.ray/ to this host folder (owned by the node's ssh
    # user, uid 1000 on the AMIs), which docker_start_cmds bind-mounts as the container's ~/.ray/.
    mount_root = Path(get_docker_host_mount_location(name))
    shutil.rmtree(mount_root, ignore_errors=True)
    shutil.copytree(home / ".ray", mount_root / "~" / ".ray")
    for path in [mount_root / "~" / ".ray", *(mount_root / "~" / ".ray").iterdir()]:
        os.chown(path, IMAGE_UID, IMAGE_UID)
    results = _host_dir(tmp / "results", IMAGE_UID)

    options = []
    for option in cluster["docker"]["run_options"]:
        # The CI machine's hard nofile limit is below 65536 and podman may not raise it
        # (docker/containers.conf); the AMI's cache folder is replaced by this test's.
        if option.startswith(("--ulimit", "--volume /home/ubuntu")):
            continue
        options.append(option)
    options += [f"--volume {builtin_cache(IMAGE_UID)}:/cache/qlora-ray", f"--volume {results}:/workspace/results",
                f"--volume {ROOT / 'tests' / 'fixtures' / 'configs'}:/configs:ro"]
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
    # What the head's environment has here and a real one would get elsewhere: the bucket's
    # endpoint and credentials (an instance role on AWS), the Llama config.json offline.
    node_env = [f"--env={k}={v}" for k, v in {**s3, "QLORA_RAY_MODEL_CONFIGS": "/configs",
                                              "HF_HUB_OFFLINE": "1"}.items()]
    try:
        podman("exec", *node_env, container, "/bin/bash", "-c", ray_start, timeout=180)
        yield {"dashboard": f"http://127.0.0.1:{ports['dashboard-port']}", "token": token,
               "results": str(results), "container": container, "home": str(home),
               "dashboard_port": str(ports["dashboard-port"]),
               "agent_port": str(ports["dashboard-agent-listen-port"]),
               "token_file": str(mount_root / "~" / ".ray" / "auth_token")}
    finally:
        podman("exec", container, "ray", "stop", "--force", check=False, timeout=120)
        podman("rm", "-f", "-t", "5", container, check=False, timeout=120)
        shutil.rmtree(mount_root, ignore_errors=True)


def _ray(*args: str, env: dict[str, str], timeout: float = 900, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "ray"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _host_env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**base, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **extra}


def test_a_head_node_started_like_the_launcher_runs_a_submitted_grid_with_token_auth(
    head_node: dict[str, str],
) -> None:
    base = _host_env(HOME=head_node["home"])

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


def test_kuberays_health_probes_pass_in_the_ray_container(head_node: dict[str, str]) -> None:
    # KubeRay 1.5.x injects these into every Ray container of the head pod (BaseWgetHealthCommand
    # and initLivenessAndReadinessProbe in ray-operator, v1.5.1): raylet through the dashboard
    # agent, then the GCS through the dashboard, joined with && and run by `bash -c`.
    wget = "wget --tries 1 -T {timeout} -q -O- http://localhost:{port}/{path} | grep success"
    probe = " && ".join([
        wget.format(timeout=2, port=head_node["agent_port"], path="api/local_raylet_healthz"),
        wget.format(timeout=10, port=head_node["dashboard_port"], path="api/gcs_healthz"),
    ])
    proc = podman("exec", head_node["container"], "bash", "-c", probe, check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # KubeRay >= 1.6 with Ray >= 2.53 probes over HTTP instead: GET /api/healthz on the agent port.
    with urllib.request.urlopen(f"http://127.0.0.1:{head_node['agent_port']}/api/healthz", timeout=10) as r:
        assert r.status == 200


def test_kuberays_submitter_command_runs_the_rayjob_grid_on_the_head(
    head_node: dict[str, str], s3: dict[str, str], tmp_path: Path
) -> None:
    from kuberay import submitter_argv, submitter_env

    job = yaml.safe_load((ROOT / "k8s" / "rayjob" / "rayjob.yaml").read_text())
    entrypoint = job["spec"]["entrypoint"].replace("YOUR-BUCKET", RAYJOB_BUCKET)  # the edit users make
    job["spec"]["entrypoint"] = entrypoint
    job_id = f"qlora-ray-grid-{secrets.token_hex(3)}"  # KubeRay: the RayJob's name and a random suffix
    # The submitter pod runs the head's image; here the host's venv has the same ray and
    # qlora-ray. Its working directory holds no spec: the grid cannot run in it.
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0",
           **submitter_env(f"127.0.0.1:{head_node['dashboard_port']}", job_id, head_node["token"])}
    started = time.monotonic()
    proc = subprocess.run(submitter_argv(job, f"127.0.0.1:{head_node['dashboard_port']}", job_id), env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    print(f"\nKubeRay submitter command, gpu_profiles grid on the head: {time.monotonic() - started:.0f} s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # `ray job logs --follow` streamed the driver's lines: the grid ran as the job, on the head.
    assert f"{GPU_GRID}: {_gpu_grid_cells()} cells" in proc.stdout, proc.stdout[-4000:]
    listed = _ray("job", "list", "--address", head_node["dashboard"], timeout=120,
                  env=_host_env(HOME=str(tmp_path), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head_node["token"]))
    assert job_id in listed.stdout and "qlora-ray run experiments/gpu_profiles.yaml" in listed.stdout
    # No GPU node and no autoscaler: every cell is an `unschedulable` row at once, in the bucket.
    df = _rows(s3, RAYJOB_BUCKET)
    assert len(df) == _gpu_grid_cells() and (df["status"] == "unschedulable").all()
    assert df["error"].str.contains("cannot add one").all()


def test_the_readme_cluster_block_runs_as_written(head_node: dict[str, str], s3: dict[str, str]) -> None:
    from readme_blocks import bash_block, commands, forward, port_is_free

    block = bash_block("## On a Ray cluster")
    steps = commands(block)
    # What cannot run here is checked for being there, in an order that works.
    at = {name: next(i for i, c in enumerate(steps) if c.startswith(prefix)) for name, prefix in [
        ("token mode", "export RAY_AUTH_MODE=token"), ("token", "ray get-auth-token --generate"),
        ("up", "ray up"), ("tunnel", "ray dashboard ray_cluster.yaml &"),
        ("address", "export RAY_ADDRESS=http://127.0.0.1:8265"), ("hf", "export HF_TOKEN="),
        ("doctor", "ray job submit"), ("down", "ray down")]}
    assert at["token mode"] < at["token"] < at["up"] < at["tunnel"] < at["address"] < at["doctor"] < at["down"]
    # HF_TOKEN reaches the driver on the head through each job's runtime environment, from a
    # file only the user can read (never an expanded command-line argument).
    (env_file,) = [c for c in steps if "HF_TOKEN" in c and "> ~/.qlora-ray-job-env.yaml" in c]
    assert at["hf"] < steps.index(env_file) < at["doctor"] and "umask 077" in env_file
    assert all("--runtime-env ~/.qlora-ray-job-env.yaml" in c for c in steps if c.startswith("ray job submit"))

    # The rest runs as written: `ray up` / `ray dashboard` / `ray down` are stand-ins (the head
    # is the container above; the SSH tunnel is a plain forward of 127.0.0.1:8265 to it).
    if not port_is_free(8265):
        pytest.fail("127.0.0.1:8265 is taken (another Ray dashboard?): the README's tunnel port is needed")
    standins = (
        'ray() {\n  case "$1" in\n'
        '    up) echo "[stand-in] ray up: the head node runs in podman";;\n'
        '    dashboard) echo "[stand-in] ray dashboard: 127.0.0.1:8265 is forwarded to the head";;\n'
        '    down) echo "[stand-in] ray down";;\n'
        '    *) command ray "$@";;\n  esac\n}\n')
    script = standins + block.replace("YOUR-BUCKET", README_BUCKET)
    with forward(8265, int(head_node["dashboard_port"])):
        started = time.monotonic()
        proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env=_host_env(HOME=head_node["home"]),
                              capture_output=True, text=True, timeout=1200)
        print(f"\nREADME cluster block: {time.monotonic() - started:.0f} s")
    out = proc.stdout + proc.stderr
    # doctor ran on the head with the token: no GPU node and no autoscaler, so the GPU types fail.
    assert "ok    auth          token" in out, out[-5000:]
    assert "ok    config.json   meta-llama/Llama-3.1-8B-Instruct: readable" in out
    assert "fail  gpu type      T4: no node offers" in out
    # The grid ran as a job: one `unschedulable` row per cell in the bucket, at once.
    df = _rows(s3, README_BUCKET)
    assert len(df) == _gpu_grid_cells() and (df["status"] == "unschedulable").all(), out[-5000:]
    assert "[stand-in] ray down" in out


def test_a_regenerated_token_reaches_the_running_node(head_node: dict[str, str]) -> None:
    # `ray up` after `ray get-auth-token --generate` rsyncs the new file over the old one
    # (a new inode). The folder mount shows it; a single-file mount would keep the old one.
    token_file = Path(head_node["token_file"])
    old = token_file.read_text()
    new = secrets.token_hex(32)
    for content in (new, old):
        staged = token_file.with_name(".auth_token.rsync-tmp")
        staged.write_text(content)
        os.chown(staged, IMAGE_UID, IMAGE_UID)
        os.replace(staged, token_file)
        seen = podman("exec", head_node["container"], "cat", "/home/qlora/.ray/auth_token").stdout
        assert seen.strip() == content.strip()


def test_the_readme_docker_block_runs_as_written(image: str, quickstart_results: Path, tmp_path: Path) -> None:
    from readme_blocks import bash_block, commands

    block = bash_block("## On one GPU box with Docker")
    steps = commands(block)
    mkdir = next(i for i, c in enumerate(steps) if c.startswith("mkdir -p results"))
    run = next(i for i, c in enumerate(steps) if c.startswith("docker run"))
    assert mkdir < run  # a results folder Docker makes is root's: the run could not write it
    assert '--user "$(id -u):$(id -g)"' in steps[run] and "--shm-size=" in steps[run]
    assert '-v "$PWD/results:/workspace/results"' in steps[run]

    # Resume from the quickstart test's rows when there are some (then nothing trains).
    if (quickstart_results / "quickstart" / "runs").is_dir():
        shutil.copytree(quickstart_results / "quickstart", tmp_path / "results" / "quickstart")
    # `docker` is podman here: the image is the one the fixture built from this Dockerfile,
    # there is no GPU to pass (--gpus is dropped) and no network.
    shim = (
        'docker() {\n'
        '  if [ "$1" = build ]; then echo "[stand-in] docker $*: built by the test fixture"; return 0; fi\n'
        '  local args=() skip=0\n'
        '  for a in "$@"; do\n'
        '    if [ "$skip" = 1 ]; then skip=0; continue; fi\n'
        '    case "$a" in --gpus) skip=1; continue;; qlora-ray) a=' + image + ';; esac\n'
        '    args+=("$a")\n'
        '  done\n'
        '  podman "${args[0]}" --network none -v ' + str(builtin_cache(0)) + ':/cache/qlora-ray "${args[@]:1}"\n'
        '}\n')
    proc = subprocess.run(["bash", "-c", shim + block], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    df = pd.read_parquet(tmp_path / "results" / "quickstart" / "runs")
    assert len(df) == _quickstart_cells() and (df["status"] == "ok").all()
