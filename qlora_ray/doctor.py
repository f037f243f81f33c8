"""`qlora-ray doctor [SPEC] [--address ADDR] [--results URI]`: what a grid needs, checked in seconds.

One line per check, `ok`, `warn` or `fail`, each warn and fail with its fix; exit code 1
when anything fails; nothing trains. Checks this machine and every GPU node
(doctor_machine.py), the cluster and the spec against it (doctor_cluster.py), and the
results folder (here).
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Iterable
from typing import Any

from qlora_ray.config import ConfigError
from qlora_ray.doctor_cluster import cluster_checks, spec_checks
from qlora_ray.doctor_machine import Check, gpu_node_checks, machine_checks

EMBEDDED = "embedded (this machine only, as `run` without --address)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", help="a grid spec to check against this machine and cluster")
    p.add_argument("--address", default=None,
                   help="Ray cluster to check (default: $RAY_ADDRESS, e.g. under `ray job submit`; "
                        "else an embedded local Ray, as `run` would start)")
    p.add_argument("--results", default=None, help="results root to probe: a path or s3:// / gs:// URI")
    from qlora_ray.planner import add_model_configs_argument

    add_model_configs_argument(p)


def results_check(uri: str) -> Check:
    """Write, read back and delete a probe object where `run` would write its rows."""
    import pyarrow.fs as pafs

    from qlora_ray.results_io import redact, resolve
    from qlora_ray.resume import scrub

    shown = redact(uri)  # keys in the URI are used, never printed
    probe = f".qlora-ray-doctor-{uuid.uuid4().hex[:12]}"
    try:
        fs, root = resolve(uri)
        # A local folder is made as `run` would make it, and removed again if the probe made
        # it. Object stores need no folders (deleting the probe may leave pyarrow's empty
        # folder marker where the rows will go).
        made = fs.type_name == "local" and fs.get_file_info(root).type == pafs.FileType.NotFound
        if made:
            fs.create_dir(root, recursive=True)
        path = f"{root.rstrip('/')}/{probe}"
        with fs.open_output_stream(path) as f:
            f.write(b"qlora-ray doctor probe\n")
        with fs.open_input_stream(path) as f:
            assert f.read() == b"qlora-ray doctor probe\n", "read back different bytes"
        fs.delete_file(path)
        if made:
            fs.delete_dir(root)
    except Exception as e:
        text = scrub(f"{type(e).__name__}: {e}".replace("\n", " "), uri)[:300]
        low = text.lower()
        if "credential" in low or "security token" in low or "signature" in low:
            fix = ("give this process credentials for the bucket (aws configure, an instance role, "
                   "or AWS_* variables)")
        elif "nosuchbucket" in low or "bucket does not exist" in low or "not found" in low:
            fix = "create the bucket first, or fix its name in --results"
        elif "access denied" in low or "permission" in low or "read-only" in low or "forbidden" in low:
            fix = "use a folder or bucket this user may write (on a cluster: the head node's role)"
        else:
            fix = "check the --results URI and that this machine reaches it"
        return Check("fail", "results", f"cannot write a probe under {shown}: {text}", fix)
    return Check("ok", "results", f"{shown}: wrote, read back and deleted a probe object")



def main(args: argparse.Namespace, *, cuda: Any = None, out: Any = None) -> int:
    out = out or sys.stdout
    checks: list[Check] = []

    def emit(new: Iterable[Check]) -> None:
        for c in new:
            checks.append(c)
            print(c.line(), file=out, flush=True)

    spec = None
    if args.spec:
        from qlora_ray.grid import load_spec

        try:
            spec = load_spec(args.spec)
            emit([Check("ok", "spec", f"{args.spec}: {spec.name}, {len(spec.cells)} cells")])
        except ConfigError as e:
            emit([Check("fail", "spec", f"{args.spec}: " + str(e).replace("\n", " "),
                        "fix the keys it names")])
    if cuda is None:
        import torch

        cuda = torch.cuda
    joined = bool(args.address or os.environ.get("RAY_ADDRESS"))
    wants_flash = bool(spec and any(c.model.attn_implementation == "flash_attention_2" for c in spec.cells))
    emit(machine_checks(cuda, driver_only=joined, wants_flash=wants_flash))

    from qlora_ray.connect import connect, disconnect

    address = args.address or os.environ.get("RAY_ADDRESS")
    where = address or EMBEDDED
    try:
        # The same embedded Ray as `run`'s: a plain ray.init() would leave its token in
        # ~/.ray, which changes every later `ray start` of the user's.
        embedded = connect(address, log_to_driver=False)
    except Exception as e:
        emit([Check("fail", "ray", f"cannot connect: {type(e).__name__}: {e}".replace("\n", " ")[:400],
                    "is the cluster up (`ray status`)? the address right? with token auth: "
                    "RAY_AUTH_MODE=token and the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN "
                    "(a 401 means it is missing)")])
        nodes, view = [], None
    else:
        try:
            found, nodes, view = cluster_checks(embedded is not None, where)
            emit(found)
            if not embedded:
                emit(gpu_node_checks(nodes))
        finally:
            if spec is None:
                disconnect(embedded)
    if spec is not None:
        if view is not None:
            emit(spec_checks(spec, args.model_configs, nodes, view))
        disconnect(embedded)
    if args.results:
        emit([results_check(args.results)])
    failed = [c for c in checks if c.status == "fail"]
    warned = [c for c in checks if c.status == "warn"]
    print(f"\n{len(checks)} checks: {len(failed)} failed, {len(warned)} warnings", file=out)
    return 1 if failed else 0
