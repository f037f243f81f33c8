"""ray_cluster.yaml on AWS: Ray's own AWS code bootstraps it and launches every worker type.

No cloud account: moto's server (EC2 and IAM, in a thread on 127.0.0.1) answers the AWS
API, reached through `AWS_ENDPOINT_URL` by the same boto3 calls Ray makes against AWS.
What runs is Ray's code, unchanged:

* `_bootstrap_config` (what `ray up` runs on your machine: IAM role and instance profile,
  key pair, subnets, security groups);
* the head launched as `ray up` launches it (`provider.create_node` with the head's
  merged node config);
* on the head, `python -m qlora_ray.launcher pin-ami` (ray_cluster.yaml's start command);
* the autoscaler's node launcher (`BaseNodeLauncher.launch_node`) with Ray's
  `AWSNodeProvider`, for every worker type of the shipped file, then termination.

Two things cannot exist here and are stood in for, thinly: EC2 resolves a
`resolve:ssm:` ImageId server-side (moto keeps the string), and the instance metadata
service (a 30-line HTTP server speaking the IMDSv2 calls launcher.py makes).
"""

from __future__ import annotations

import copy
import fnmatch
import http.server
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from conftest import ROOT

from qlora_ray import launcher

moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the dev extra: pip install -e '.[dev]'")

REGION = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())["provider"]["region"]


@pytest.fixture(scope="module")
def aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An AWS API on loopback; dummy credentials; a private HOME for Ray's key pair file."""
    home = tmp_path_factory.mktemp("home")
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "HOME": str(home),
        # AWS's managed policies (AmazonEC2FullAccess, ...), which `ray up` attaches to the head's role.
        "MOTO_IAM_LOAD_MANAGED_POLICIES": "true",
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL", "AWS_PROFILE"]}
    os.environ.update(env)
    os.environ.pop("AWS_PROFILE", None)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    try:
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def bootstrapped(aws: str) -> dict[str, Any]:
    """The config `ray up` would upload to the head as ~/ray_bootstrap_config.yaml."""
    import ray.autoscaler._private.aws.config as aws_config
    from ray.autoscaler._private.commands import _bootstrap_config

    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    # Ray sleeps 15 s twice after creating the instance profile and role, for IAM's
    # eventual consistency on AWS (aws/config.py `time.sleep(15)  # wait for propagation`);
    # moto is consistent at once.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aws_config.time, "sleep", lambda s: None)
        return _bootstrap_config(config, no_config_cache=True)


def _allows(document: dict[str, Any], action: str) -> bool:
    statements = document["Statement"]
    for st in statements if isinstance(statements, list) else [statements]:
        actions = st.get("Action", [])
        for pattern in [actions] if isinstance(actions, str) else actions:
            if st.get("Effect") == "Allow" and fnmatch.fnmatch(action.lower(), pattern.lower()):
                return True
    return False


@pytest.mark.slow  # moto's EC2/IAM/SSM server
def test_the_head_role_ray_up_creates_cannot_read_ssm_parameters(bootstrapped: dict[str, Any]) -> None:
    # Why the workers cannot be launched with `resolve:ssm:` as their ImageId: RunInstances
    # resolves it with the caller's rights, and the autoscaler calls it with this role.
    profile_arn = bootstrapped["head_node"]["IamInstanceProfile"]["Arn"]
    iam = boto3.client("iam")
    profile = iam.get_instance_profile(InstanceProfileName=profile_arn.rsplit("/", 1)[1])["InstanceProfile"]
    (role,) = profile["Roles"]
    attached = iam.list_attached_role_policies(RoleName=role["RoleName"])["AttachedPolicies"]
    assert {p["PolicyName"] for p in attached} >= {"AmazonEC2FullAccess", "AmazonS3FullAccess"}
    for policy in attached:
        version = iam.get_policy(PolicyArn=policy["PolicyArn"])["Policy"]["DefaultVersionId"]
        document = iam.get_policy_version(PolicyArn=policy["PolicyArn"], VersionId=version)["PolicyVersion"]["Document"]
        if isinstance(document, str):
            document = json.loads(document)
        assert not _allows(document, "ssm:GetParameters"), policy["PolicyName"]
        assert _allows(document, "ec2:RunInstances") or policy["PolicyName"] != "AmazonEC2FullAccess"
    # ... and the shipped worker types do name their AMI that way.
    workers = {n: t for n, t in bootstrapped["available_node_types"].items() if n != bootstrapped["head_node_type"]}
    assert all(t["node_config"]["ImageId"].startswith(launcher.SSM_PREFIX) for t in workers.values())


class _FakeIMDS(http.server.BaseHTTPRequestHandler):
    """IMDSv2 as documented for EC2: PUT /latest/api/token with a TTL header returns a session
    token; GET /latest/meta-data/ami-id needs that token in X-aws-ec2-metadata-token (401
    without it). Only what launcher.instance_ami_id calls."""

    ami = ""
    token = "imds-session-token"

    def do_PUT(self) -> None:
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self._reply(200, self.token)
        else:
            self._reply(400, "")

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            self._reply(401, "")
        elif self.path == "/latest/meta-data/ami-id":
            self._reply(200, self.ami)
        else:
            self._reply(404, "")

    def _reply(self, code: int, body: str) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def imds() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeIMDS)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def _instances(ec2: Any, cluster: str) -> list[dict[str, Any]]:
    found = ec2.describe_instances(Filters=[{"Name": "tag:ray-cluster-name", "Values": [cluster]}])
    return [i for r in found["Reservations"] for i in r["Instances"]]


@pytest.mark.slow  # moto's EC2/IAM/SSM server
def test_rays_aws_provider_launches_and_terminates_every_shipped_worker_type(
    bootstrapped: dict[str, Any], imds: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.event_summarizer import EventSummarizer
    from ray.autoscaler._private.node_launcher import BaseNodeLauncher
    from ray.autoscaler._private.node_provider_availability_tracker import NodeProviderAvailabilityTracker
    from ray.autoscaler._private.util import ConcurrentCounter
    from ray.autoscaler.tags import (
        NODE_KIND_HEAD,
        TAG_RAY_NODE_KIND,
        TAG_RAY_NODE_NAME,
        TAG_RAY_NODE_STATUS,
        TAG_RAY_USER_NODE_TYPE,
    )

    cluster = bootstrapped["cluster_name"]
    ec2 = boto3.client("ec2")
    provider = AWSNodeProvider(bootstrapped["provider"], cluster)

    # `ray up` launches the head with your rights; EC2 resolves its `resolve:ssm:` ImageId
    # server-side to the region's current AMI. moto stores the string as given, so the
    # test resolves it the way EC2 would, to one of the region's images.
    head_type = bootstrapped["head_node_type"]
    head_config = {**copy.deepcopy(bootstrapped["head_node"]), **bootstrapped["available_node_types"][head_type]["node_config"]}
    assert head_config["ImageId"].startswith(launcher.SSM_PREFIX)
    region_ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    head_config["ImageId"] = region_ami
    provider.create_node(head_config, {TAG_RAY_NODE_KIND: NODE_KIND_HEAD, TAG_RAY_USER_NODE_TYPE: head_type,
                                       TAG_RAY_NODE_NAME: f"ray-{cluster}-head", TAG_RAY_NODE_STATUS: "uninitialized"}, 1)
    (head,) = provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_HEAD})

    # On the head: the start command pins the workers to the AMI the head booted from,
    # which the head's metadata service reports.
    _FakeIMDS.ami = provider._get_cached_node(head).image_id
    monkeypatch.setenv(launcher.IMDS_ENDPOINT_ENV, imds)
    source, pinned_path = tmp_path / "ray_bootstrap_config.yaml", tmp_path / "ray_bootstrap_config.pinned.yaml"
    source.write_text(json.dumps(bootstrapped))  # `ray up` uploads it as JSON
    assert launcher.main(["pin-ami", str(source), str(pinned_path)]) == 0
    pinned = yaml.safe_load(pinned_path.read_text())
    assert launcher.SSM_PREFIX not in pinned_path.read_text()

    # The autoscaler's launcher, one node of every worker type, as for a queued experiment.
    pending = ConcurrentCounter()
    node_launcher = BaseNodeLauncher(provider=provider, pending=pending, event_summarizer=EventSummarizer(),
                                     node_provider_availability_tracker=NodeProviderAvailabilityTracker(),
                                     node_types=pinned["available_node_types"])
    workers = [n for n in pinned["available_node_types"] if n != head_type]
    assert len(workers) == 6
    for node_type in workers:
        pending.inc(node_type, 1)  # the autoscaler counts a launch as pending before it starts
        node_launcher.launch_node(pinned, 1, node_type)
        (node_id,) = provider.non_terminated_nodes({TAG_RAY_USER_NODE_TYPE: node_type})
        node = provider._get_cached_node(node_id)
        assert node.instance_type == pinned["available_node_types"][node_type]["node_config"]["InstanceType"]
        assert node.image_id == region_ami, node_type
        assert node.iam_instance_profile is None  # only the head gets the autoscaler's role
    running = {i["InstanceId"] for i in _instances(ec2, cluster) if i["State"]["Name"] in ("pending", "running")}
    assert len(running) == 1 + len(workers)

    worker_ids = [n for n in provider.non_terminated_nodes({}) if n != head]
    provider.terminate_nodes(worker_ids)
    states = {i["InstanceId"]: i["State"]["Name"] for i in _instances(ec2, cluster)}
    assert {states[w] for w in worker_ids} <= {"shutting-down", "terminated"}
    assert provider.non_terminated_nodes({}) == [head]
    provider.terminate_node(head)


def test_pinning_refuses_a_parameter_the_head_was_not_launched_from() -> None:
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    config["available_node_types"]["gpu_t4"]["node_config"]["ImageId"] = "resolve:ssm:/some/other/parameter"
    with pytest.raises(launcher.PinError, match=r"`gpu_t4`.*/some/other/parameter"):
        launcher.pin_images(config, "ami-0123456789abcdef0")
    # Concrete ids stay; nothing to pin means no metadata call at all.
    plain = {"head_node_type": "h", "available_node_types": {"h": {"node_config": {"ImageId": "ami-0aaaaaaaaaaaaaaaa"}}}}
    assert launcher.pin_images(plain, "ami-0123456789abcdef0") == plain
    assert not launcher.needs_pinning(plain)


def test_without_a_metadata_service_the_error_says_what_to_do(tmp_path: Path) -> None:
    source = tmp_path / "in.yaml"
    source.write_text((ROOT / "ray_cluster.yaml").read_text())
    with pytest.raises(launcher.PinError, match=r"metadata service .* ami-\.\.\. id"):
        launcher.pin_file(source, tmp_path / "out.yaml", endpoint="http://127.0.0.1:9")
    assert not (tmp_path / "out.yaml").exists()
