"""Run on the head node of a `ray up` cluster: give the workers the AMI the head booted from.

`ray_cluster.yaml` names its machine image as `resolve:ssm:<parameter>`, AWS's public SSM
parameter for the region's current Deep Learning Base AMI, so the file needs no per-region
AMI id. EC2's RunInstances resolves such a name with the rights of whoever calls it:

* the head node is launched by `ray up` on your machine, with your rights: it resolves;
* the workers are launched by the autoscaler on the head, with the head's instance role
  (`ray-autoscaler-v1`, which `ray up` creates with EC2 and S3 access only, no
  `ssm:GetParameters`), so every worker launch would fail and every GPU cell would wait.

Rather than asking every user to widen that role, the head's start command runs

    python -m qlora_ray.launcher pin-ami ~/ray_bootstrap_config.yaml ~/ray_bootstrap_config.pinned.yaml

before `ray start --autoscaling-config=~/ray_bootstrap_config.pinned.yaml`: node types whose
`ImageId` is the parameter the head itself was launched with get the head's own AMI id,
read from the instance metadata service (IMDSv2, which needs no AWS permission). Workers
then run exactly the image the head runs. A node type naming a different `resolve:ssm:`
parameter cannot be pinned this way and stops the head with a message saying what to do.

Stdlib and PyYAML only: this runs before Ray starts, in the image's Python.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import urllib.request
from pathlib import Path
from typing import Any

import yaml

SSM_PREFIX = "resolve:ssm:"
# botocore reads the same variable to reach a metadata service other than the link-local one.
IMDS_ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
IMDS_DEFAULT = "http://169.254.169.254"
AMI_ID = re.compile(r"ami-[0-9a-f]{8,17}")


class PinError(RuntimeError):
    """The config cannot be pinned as asked; the message says why and what to change."""


def instance_ami_id(endpoint: str | None = None, timeout: float = 3.0) -> str:
    """This instance's AMI id from IMDSv2 (a session token first, then the metadata item)."""
    base = (endpoint or os.environ.get(IMDS_ENDPOINT_ENV) or IMDS_DEFAULT).rstrip("/")
    token_request = urllib.request.Request(
        f"{base}/latest/api/token", method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    try:
        with urllib.request.urlopen(token_request, timeout=timeout) as r:
            token = r.read().decode()
        ami_request = urllib.request.Request(
            f"{base}/latest/meta-data/ami-id", headers={"X-aws-ec2-metadata-token": token})
        with urllib.request.urlopen(ami_request, timeout=timeout) as r:
            ami = r.read().decode().strip()
    except OSError as e:
        raise PinError(
            f"cannot read this instance's AMI id from the metadata service at {base} ({e}); "
            "this command runs on an EC2 head node (with --net=host in its container). Elsewhere, "
            "put an ami-... id into every node type's ImageId instead of resolve:ssm:") from e
    if not AMI_ID.fullmatch(ami):
        raise PinError(f"the metadata service at {base} answered {ami!r} for ami-id, not an AMI id")
    return ami


def pin_images(config: dict[str, Any], head_ami: str) -> dict[str, Any]:
    """A copy of a cluster config with the head's `resolve:ssm:` parameter replaced by `head_ami`.

    Pure: `head_ami` is what the head was launched from. Concrete `ami-...` ids stay as
    they are; a node type with another SSM parameter is an error (it cannot be resolved
    from here, and launching it would fail later, less clearly).
    """
    out = copy.deepcopy(config)
    types = out.get("available_node_types") or {}
    head_type = out.get("head_node_type")
    head_image = str(((types.get(head_type) or {}).get("node_config") or {}).get("ImageId", ""))
    problems = []
    for name, node_type in types.items():
        node_config = node_type.get("node_config") or {}
        image = str(node_config.get("ImageId", ""))
        if not image.startswith(SSM_PREFIX):
            continue
        if image == head_image:
            node_config["ImageId"] = head_ami
        else:
            problems.append(
                f"node type `{name}` has ImageId {image!r}, and the head was launched from "
                f"{head_image or 'no resolve:ssm: parameter'}: the head's role may not read SSM "
                f"parameters, so give `{name}` the head's parameter or an ami-... id")
    if problems:
        raise PinError("; ".join(problems))
    return out


def needs_pinning(config: dict[str, Any]) -> bool:
    return any(str((t.get("node_config") or {}).get("ImageId", "")).startswith(SSM_PREFIX)
               for t in (config.get("available_node_types") or {}).values())


def pin_file(source: Path, target: Path, *, endpoint: str | None = None) -> str | None:
    """Write `target` from `source`, pinned; returns the AMI used (None if nothing to pin)."""
    config = yaml.safe_load(source.read_text())
    ami = None
    if needs_pinning(config):
        ami = instance_ami_id(endpoint)
        config = pin_images(config, ami)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(target)
    return ami


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_ray.launcher", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pin = sub.add_parser("pin-ami", help="replace the head's resolve:ssm: ImageId with the head's own AMI id")
    pin.add_argument("source", type=Path,
                     help="the autoscaler config `ray up` wrote (~/ray_bootstrap_config.yaml)")
    pin.add_argument("target", type=Path, help="where to write the pinned copy")
    args = parser.parse_args(argv)
    try:
        ami = pin_file(args.source.expanduser(), args.target.expanduser())
    except PinError as e:
        print(f"qlora-ray launcher: {e}", file=sys.stderr)
        return 2
    print(f"{args.target}: " + (f"resolve:ssm: image ids pinned to {ami}" if ami else "nothing to pin"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
