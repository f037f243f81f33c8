"""ray_cluster.yaml is a config `ray up` accepts and that scales the right node for each card.

Checked with what ships inside the `ray` package, no cloud account needed: the launcher's
JSON schema, its own config preparation and validation (`prepare_config`,
`validate_config`, what `ray up` runs before it talks to AWS), and the autoscaler's
node-selection function fed with the resource request qlora-ray makes for each card.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from conftest import ROOT

from qlora_ray.grid import load_spec
from qlora_ray.profiles import BUILTIN_PROFILES, get_profile
from qlora_ray.tasks import requirement

CLUSTER_YAML = ROOT / "ray_cluster.yaml"
# The cards the issue asks for: one worker type each, A100 split by memory size.
CARDS = {"T4", "L4", "A10G", "A100-40G", "A100-80G", "H100"}


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(config: dict[str, Any]) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    # The same two steps `ray up` runs on the file before any cloud call.
    out = prepare_config(copy.deepcopy(config))
    validate_config(out)
    return out


def _gpu_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in config["available_node_types"].items() if t["resources"].get("GPU")}


def _card(node_type: dict[str, Any]) -> str:
    labels = [k.split(":", 1)[1] for k in node_type["resources"] if k.startswith("accelerator_type:")]
    assert len(labels) == 1, node_type["resources"]
    return labels[0]


def test_matches_the_launcher_schema_shipped_with_ray(config: dict[str, Any]) -> None:
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)


def test_passes_rays_own_config_preparation_and_validation(prepared: dict[str, Any]) -> None:
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"
    # prepare_config filled per-type limits; every worker type scales from zero.
    for name, node_type in prepared["available_node_types"].items():
        if name != "head":
            assert node_type["min_workers"] == 0, name
            assert node_type["max_workers"] >= 1, name


def test_one_worker_type_per_card_each_advertising_gpu_and_its_accelerator_label(config: dict[str, Any]) -> None:
    gpu_types = _gpu_types(config)
    cards = [_card(t) for t in gpu_types.values()]
    assert sorted(cards) == sorted(CARDS)
    for name, node_type in gpu_types.items():
        assert node_type["resources"]["GPU"] >= 1, name
        assert node_type["resources"]["CPU"] >= 1, name
        # The label is the one the card's profile asks Ray for (qlora_ray/profiles.py).
        assert get_profile(_card(node_type)).ray_accelerator_type == _card(node_type), name
        assert "--gpus all" in node_type["docker"]["worker_run_options"], name
    # The head only coordinates: no experiment may be scheduled on it.
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}


@pytest.mark.parametrize("card", sorted(CARDS))
def test_the_autoscaler_starts_the_matching_node_for_a_queued_experiment(
    prepared: dict[str, Any], card: str
) -> None:
    from functools import partial

    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import (
        _default_utilization_scorer,
        get_nodes_for,
    )

    demand = requirement(BUILTIN_PROFILES[card], cpus_per_task=1)
    to_add, unfulfilled = get_nodes_for(
        prepared["available_node_types"], existing_nodes={"head": 1}, head_node_type="head",
        max_to_add=5, resources=[demand],
        utilization_scorer=partial(_default_utilization_scorer,
                                   node_availability_summary=NodeAvailabilitySummary({})))
    assert unfulfilled == []
    assert [_card(prepared["available_node_types"][t]) for t in to_add] == [card]


def test_every_cell_of_the_shipped_gpu_grid_has_a_node_type(config: dict[str, Any]) -> None:
    spec = load_spec(ROOT / "experiments" / "gpu_profiles.yaml")
    offered = [t["resources"] for t in config["available_node_types"].values()]
    for cell in spec.cells:
        demand = requirement(get_profile(cell.gpu, spec.profiles), cpus_per_task=1,
                              emulate=cell.emulate_profile)
        assert any(all(res.get(k, 0) >= v for k, v in demand.items()) for res in offered), (cell.name, demand)


def test_every_node_runs_the_project_image_with_token_auth_and_no_secret_in_the_file(
    config: dict[str, Any],
) -> None:
    docker = config["docker"]
    assert re.fullmatch(r"[\w.\-/]+/qlora-ray:[\w.\-]+", docker["image"])
    options = shlex.split(" ".join(docker["run_options"]))
    assert "RAY_AUTH_MODE=token" in options
    # The image's ENTRYPOINT runs qlora-ray; the launcher's `docker run ... IMAGE bash` must run
    # bash instead, under tini (tests/test_container.py starts a head node this way).
    assert options[options.index("--entrypoint") + 1] == "tini"
    # The token reaches the nodes from the user's own ~/.ray/auth_token, as a folder: a file
    # bind mount would pin the old inode and a regenerated token would never arrive.
    assert config["file_mounts"] == {"~/.ray/": "~/.ray/"}
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"(AKIA[0-9A-Z]{16}|hf_[A-Za-z0-9]{20,}|aws_secret_access_key)", text, re.I)


def test_start_commands_keep_the_dashboard_on_loopback_and_need_no_input(config: dict[str, Any]) -> None:
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "--head" in head
    assert "$RAY_HEAD_IP" in " ".join(config["worker_start_ray_commands"])
    every = [*config["initialization_commands"], *config["setup_commands"], *config["head_start_ray_commands"],
             *config["worker_start_ray_commands"]]
    assert not [c for c in every if re.search(r"\b(read|passwd|sudo -S)\b|--interactive|-it\b", c)]


def test_the_launchers_docker_command_for_this_config_is_well_formed(config: dict[str, Any]) -> None:
    from ray.autoscaler._private.docker import docker_start_cmds

    cmd = docker_start_cmds(
        "ubuntu", config["docker"]["image"], config["file_mounts"],
        config["docker"]["container_name"], config["docker"]["run_options"], config["cluster_name"],
        "/home/qlora", "docker")
    argv = shlex.split(cmd)
    image_at = argv.index(config["docker"]["image"])
    assert argv[image_at + 1:] == ["bash"]
    assert argv[argv.index("--entrypoint") + 1] == "tini"
    volumes = [argv[i + 1] for i, a in enumerate(argv) if a == "-v"]
    assert any(v.endswith(":/home/qlora/.ray/") for v in volumes), volumes


def test_no_file_is_bind_mounted_into_the_containers(config: dict[str, Any]) -> None:
    # Ray bind-mounts every file_mounts entry into the container (docker_start_cmds) and means
    # to warn about files (`_check_docker_file_mounts`, which misses `~/` paths): a file mount
    # would not see the next `ray up` replace it. Folders only.
    assert all(remote.endswith("/") and local.endswith("/") for remote, local in config["file_mounts"].items())


def test_the_head_pins_the_workers_image_before_its_autoscaler_starts(config: dict[str, Any]) -> None:
    # Workers are launched with the head's IAM role, which cannot resolve resolve:ssm: (see
    # qlora_ray/launcher.py and tests/test_aws_launch.py): the autoscaler must read the pinned copy.
    commands = config["head_start_ray_commands"]
    (pin_at,) = [i for i, c in enumerate(commands) if "qlora_ray.launcher pin-ami" in c]
    (start_at,) = [i for i, c in enumerate(commands) if "ray start --head" in c]
    assert pin_at < start_at
    source, target = shlex.split(commands[pin_at])[-2:]
    assert source == "~/ray_bootstrap_config.yaml"
    assert f"--autoscaling-config={target}" in commands[start_at]
    images = {t["node_config"]["ImageId"] for t in config["available_node_types"].values()}
    assert len(images) == 1  # one parameter for every type: the one the head is launched from


# --------------------------------------------------------------------------- KubeRay manifests
# Checked as YAML with the right kinds and the same per-card layout as ray_cluster.yaml
# (no KubeRay CRD schema ships in a Python package; a cluster would be needed for more).


K8S = {"raycluster.yaml": ROOT / "k8s" / "raycluster" / "raycluster.yaml",
       "rayjob.yaml": ROOT / "k8s" / "rayjob" / "rayjob.yaml"}


def _k8s(name: str) -> dict[str, Any]:
    docs = list(yaml.safe_load_all(K8S[name].read_text()))
    assert len(docs) == 1
    return docs[0]


def test_applying_any_one_k8s_folder_starts_exactly_one_cluster() -> None:
    # `kubectl apply -f DIR` applies every manifest directly in DIR: with the RayCluster and the
    # RayJob side by side it would start two clusters. Each folder holds one; k8s/ itself none.
    assert not [p.name for p in (ROOT / "k8s").iterdir() if p.suffix in (".yaml", ".yml", ".json")]
    for folder in (ROOT / "k8s").iterdir():
        if folder.is_dir():
            kinds = [d["kind"] for p in folder.glob("*.y*ml") for d in yaml.safe_load_all(p.read_text()) if d]
            assert len([k for k in kinds if k in ("RayCluster", "RayJob", "RayService")]) == 1, (folder, kinds)


def _cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


@pytest.mark.parametrize(("name", "kind"), [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifest_has_one_autoscaling_group_per_card(config: dict[str, Any], name: str, kind: str) -> None:
    manifest = _k8s(name)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", kind)
    spec = _cluster_spec(manifest)
    assert spec["authOptions"] == {"mode": "token"} and spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    cards = []
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["replicas"] == 0, group["groupName"]
        resources = json.loads(json.loads(group["rayStartParams"]["resources"]))
        (label,) = resources
        cards.append(label.split(":", 1)[1])
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, group["groupName"]
    assert sorted(cards) == sorted(CARDS)
    for pod in [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]:
        # Same image as the launcher config; the image's numeric non-root user.
        assert [c["image"] for c in pod["containers"]] == [config["docker"]["image"]]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 1000


def test_the_rayjob_runs_a_grid_on_the_same_cluster_as_the_raycluster() -> None:
    job, cluster = _k8s("rayjob.yaml"), _k8s("raycluster.yaml")
    assert _cluster_spec(job) == _cluster_spec(cluster)
    assert "qlora-ray run experiments/" in job["spec"]["entrypoint"]
    assert "--results s3://" in job["spec"]["entrypoint"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_kuberays_submitter_passes_the_whole_entrypoint_to_ray_job_submit(tmp_path: Path) -> None:
    # The submitter pod runs `bash -ce "<ray job submit ... -- ENTRYPOINT ; fi ; ...>"` (tests/kuberay.py,
    # ported from KubeRay). Stand-in `ray` and `qlora-ray` executables record how bash split
    # it; tests/test_container.py runs the same command against a real head.
    from kuberay import submitter_argv

    calls = tmp_path / "calls.jsonl"
    record = f"import json, sys; open({str(calls)!r}, 'a').write(json.dumps(sys.argv) + '\\n')"
    for name, code in (("ray", "sys.exit(1 if sys.argv[1:3] == ['job', 'status'] else 0)"), ("qlora-ray", "")):
        exe = tmp_path / name
        exe.write_text(f"#!{sys.executable}\n{record}\n{code}\n")
        exe.chmod(0o755)
    job = _k8s("rayjob.yaml")
    argv = submitter_argv(job, "qlora-ray-head-svc.default.svc.cluster.local:8265", "qlora-ray-grid-abc12")
    proc = subprocess.run(argv, env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = [json.loads(line) for line in calls.read_text().splitlines()]
    programs = [Path(r[0]).name for r in runs]
    assert "qlora-ray" not in programs, "the submitter pod itself ran the grid"
    (submit,) = [r for r in runs if r[1:3] == ["job", "submit"]]
    entrypoint = submit[submit.index("--") + 1:]
    assert entrypoint == shlex.split(job["spec"]["entrypoint"])
    assert entrypoint[:2] == ["bash", "-c"] and "qlora-ray run experiments/" in entrypoint[2]
