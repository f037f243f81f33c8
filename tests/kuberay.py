"""The submitter pod's command for a RayJob, built the way KubeRay builds it.

A line-by-line port of KubeRay v1.5.1 (the version the manifests target):
`BuildJobSubmitCommand` in ray-operator/controllers/ray/common/job.go (K8sJobMode) and
`configureSubmitterContainer` in ray-operator/controllers/ray/rayjob_controller.go, which
joins the list with single spaces and runs it as `/bin/bash -ce -- "<joined>"`, with
RAY_DASHBOARD_ADDRESS, RAY_JOB_SUBMISSION_ID, PYTHONUNBUFFERED and (with
`authOptions: {mode: token}`) RAY_AUTH_MODE / RAY_AUTH_TOKEN in its environment.
Later KubeRay (ray-project/kuberay#4798, merged 2026-05) puts a wait loop in front,
`until <python GET of the dashboard's api/gcs_healthz> ; do ... ; done ;`, and splices the
entrypoint the same way; that endpoint answers without the token (the wget probe of
tests/test_container.py reaches it).
"""

from __future__ import annotations

import json
from typing import Any

import yaml


def _go_quote(text: str) -> str:
    # strconv.Quote: a double-quoted Go string literal (JSON's escaping, for ASCII text).
    return json.dumps(text)


def submit_command(rayjob: dict[str, Any], dashboard_url: str, job_id: str) -> list[str]:
    spec = rayjob["spec"]
    address = dashboard_url if dashboard_url.startswith("http://") else "http://" + dashboard_url
    entrypoint = spec["entrypoint"].strip()
    cmd = ["if", "!", "ray", "job", "status", "--address", address, job_id, ">/dev/null", "2>&1", ";", "then"]
    cmd += ["ray", "job", "submit", "--address", address, "--no-wait"]
    if spec.get("runtimeEnvYAML"):
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        cmd += ["--runtime-env-json", _go_quote(json.dumps(runtime_env, separators=(",", ":")))]
    if spec.get("metadata"):
        cmd += ["--metadata-json", _go_quote(json.dumps(spec["metadata"], separators=(",", ":")))]
    cmd += ["--submission-id", job_id]
    if spec.get("entrypointNumCpus", 0) > 0:
        cmd += ["--entrypoint-num-cpus", f"{float(spec['entrypointNumCpus']):f}"]
    if spec.get("entrypointNumGpus", 0) > 0:
        cmd += ["--entrypoint-num-gpus", f"{float(spec['entrypointNumGpus']):f}"]
    if spec.get("entrypointResources"):
        cmd += ["--entrypoint-resources", _go_quote(spec["entrypointResources"])]
    cmd += ["--", entrypoint, ";", "fi", ";", "ray", "job", "logs", "--address", address, "--follow", job_id]
    return cmd


def submitter_argv(rayjob: dict[str, Any], dashboard_url: str, job_id: str) -> list[str]:
    return ["/bin/bash", "-ce", "--", " ".join(submit_command(rayjob, dashboard_url, job_id))]


def submitter_env(dashboard_url: str, job_id: str, token: str | None) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1", "RAY_DASHBOARD_ADDRESS": dashboard_url, "RAY_JOB_SUBMISSION_ID": job_id}
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env
