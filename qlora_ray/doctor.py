"""`qlora-ray doctor [SPEC] [--address ADDR] [--results URI]`: what a grid needs, checked in seconds.

One line per check, `ok`, `warn` or `fail`, each warn and fail with its fix; the exit code
is 1 when anything fails. Nothing trains.

* **This machine**: Python; torch and its CUDA build; the visible GPUs (name, memory,
  compute capability, the profile they match); bitsandbytes' 4-bit kernels on a tiny
  layer; NVML; flash-attn when the spec asks for it.
* **The cluster**: the embedded Ray, `--address`, or the job's own under `ray job submit`:
  its nodes with their GPUs, accelerator resources and labels; whether an autoscaler can
  add nodes (and its last launch errors); the auth mode; and the GPU checks above, run on
  every node that offers GPUs.
* **With SPEC**: it loads and plans; every model's `config.json` is reachable with the
  token given; every dataset can be read; every GPU type it asks for is offered by a node
  (or could be launched).
* **With --results**: a probe object is written, read back and deleted.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qlora_ray.config import ConfigError
from qlora_ray.table import line
from qlora_ray.units import GIB

Status = Literal["ok", "warn", "fail"]
NODE_CHECK_TIMEOUT_S = 180


@dataclass(frozen=True)
class Check:
    status: Status
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = line((self.status, self.name, self.detail), (4, 12, 0))
        return text + (f" -> fix: {self.fix}" if self.fix and self.status != "ok" else "")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", help="a grid spec to check against this machine and cluster")
    p.add_argument("--address", default=None,
                   help="Ray cluster to check (default: $RAY_ADDRESS, e.g. under `ray job submit`; "
                        "else an embedded local Ray, as `run` would start)")
    p.add_argument("--results", default=None, help="results root to probe: a path or s3:// / gs:// URI")
    from qlora_ray.planner import add_model_configs_argument

    add_model_configs_argument(p)


# --------------------------------------------------------------------------- this machine


def machine_checks(cuda: Any, *, driver_only: bool = False, wants_flash: bool = False,
                   nvml: Any = None, nf4: Callable[[str], tuple[float, float]] | None = None) -> list[Check]:
    """Python, torch, GPUs, bitsandbytes, NVML, flash-attn on the machine this runs on.

    `cuda` is `torch.cuda` or a test's stand-in. `driver_only`: this machine only runs the
    driver (a cluster's head), so having no GPU is fine.
    """
    import torch

    out = [_python_check()]
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    out.append(Check("ok", "torch", f"{torch.__version__}, {build}"))
    gpus = cuda.device_count() if cuda.is_available() else 0
    if not gpus:
        if driver_only:
            out.append(Check("ok", "gpus", "none here; this machine only runs the driver (GPU nodes below)"))
        else:
            out.append(Check("warn", "gpus", "torch sees no CUDA device: GPU cells run here only with "
                             "--allow-cpu-fallback (on the CPU)",
                             "on a GPU machine: `nvidia-smi` must list the card, torch must be a CUDA build "
                             "(pip install torch, not the CPU wheel), and a container needs --gpus"))
    arch_list = list(cuda.get_arch_list()) if gpus else []
    for index in range(gpus):
        out.append(_gpu_check(index, cuda.get_device_properties(index), arch_list))
    device = "cuda:0" if gpus else "cpu"
    out.append(_bitsandbytes_check(device, nf4))
    if gpus:
        out.append(_nvml_check(nvml))
    if wants_flash:
        out.append(_flash_attn_check(cuda, gpus))
    return out


def _python_check() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    # pyproject says >= 3.10, so an older one never installs qlora-ray; the line says which one runs.
    return Check("ok", "python", f"{version} ({sys.executable})")


def _gpu_check(index: int, props: Any, arch_list: list[str]) -> Check:
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    from qlora_ray.device import Device, DeviceError, check_kernels
    from qlora_ray.profiles import profile_for_card

    label = NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(props.name)
    gib = props.total_memory / GIB
    detail = (f"{index}: {props.name}, {gib:.1f} GiB, compute capability {props.major}.{props.minor}, "
              f"Ray labels it {label}")
    try:  # what the worker checks before it loads anything (a V100 under the CUDA 13 build)
        check_kernels(Device("cuda", props.name, int(props.total_memory), (props.major, props.minor)),
                      arch_list)
    except DeviceError as e:
        return Check("fail", "gpu", f"{detail}: the installed torch has no kernels for it",
                     str(e).split("; ", 1)[-1])
    profile = profile_for_card(label, int(props.total_memory))
    if profile is None:
        return Check("warn", "gpu", detail + ", no built-in profile matches",
                     f"define one under `profiles:` in the spec with ray_accelerator_type: {label}")
    detail += f" -> profile {profile.name}"
    wanted = profile.ray_accelerator_type
    if wanted != label and f"accelerator_type:{wanted}" not in os.environ.get("RAY_OVERRIDE_RESOURCES", ""):
        return Check("warn", "gpu", detail + f", which asks Ray for accelerator_type:{wanted}",
                     f"start Ray with --resources='{{\"accelerator_type:{wanted}\": 1}}' (embedded: "
                     f"RAY_OVERRIDE_RESOURCES='{{\"accelerator_type:{wanted}\": 1}}'), or its cells never "
                     "find a node")
    return Check("ok", "gpu", detail)


def _bitsandbytes_check(device: str, nf4: Callable[[str], tuple[float, float]] | None) -> Check:
    try:
        if nf4 is None:
            from qlora_ray.modeling import nf4_matmul_error as nf4
        kernel_error, quantization_error = nf4(device)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return Check("fail", "bitsandbytes",
                     f"a 4-bit NF4 layer on {device} failed: {type(e).__name__}: {first}",
                     "install a bitsandbytes build for this device (pip install -U bitsandbytes); "
                     "`python -m bitsandbytes` prints its own diagnosis")
    import bitsandbytes

    detail = (f"{bitsandbytes.__version__}: a 4-bit NF4 layer on {device} matches its dequantized weights "
              f"(error {kernel_error:.1e}; NF4 rounding {quantization_error:.2f})")
    if kernel_error > 1e-2 or quantization_error > 0.5:
        return Check("fail", "bitsandbytes", detail.replace("matches", "does not match"),
                     "reinstall bitsandbytes for this CUDA version; results here would be wrong")
    return Check("ok", "bitsandbytes", detail)


def _nvml_check(nvml: Any) -> Check:
    try:
        if nvml is None:
            import pynvml as nvml  # nvidia-ml-py
        nvml.nvmlInit()
        count = nvml.nvmlDeviceGetCount()
        driver = nvml.nvmlSystemGetDriverVersion()
    except ImportError:
        return Check("warn", "nvml", "nvidia-ml-py is not installed: rows get no `peak_nvml_bytes`",
                     'pip install -e ".[gpu]" (the image has it)')
    except Exception as e:
        return Check("warn", "nvml", f"NVML does not answer ({type(e).__name__}: {e})",
                     "check the driver (`nvidia-smi`); in a container pass the GPUs with --gpus")
    return Check("ok", "nvml", f"driver {driver}, {count} device(s)")


def _flash_attn_check(cuda: Any, gpus: int) -> Check:
    if importlib.util.find_spec("flash_attn") is None:
        return Check("fail", "flash-attn",
                     "the spec asks for flash_attention_2 and flash-attn is not installed",
                     "pip install flash-attn --no-build-isolation, or set model.attn_implementation: sdpa")
    if gpus and cuda.get_device_properties(0).major < 8:
        return Check("fail", "flash-attn", "installed, but FlashAttention-2 needs an Ampere or newer GPU",
                     "set model.attn_implementation: sdpa for this card")
    return Check("ok", "flash-attn", "installed")


def node_checks() -> list[Check]:
    """The machine checks, run by a Ray task on a GPU node."""
    import torch

    return machine_checks(torch.cuda)


# --------------------------------------------------------------------------- the cluster


def connect(address: str | None) -> tuple[dict[str, str | None] | None, str]:
    """Join the cluster `run` would use; returns (what the embedded Ray changed or None, where)."""
    import ray

    from qlora_ray.connect import start_embedded

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return None, address
    # The same embedded Ray as `run`'s: a plain ray.init() would leave its token in ~/.ray,
    # which changes every later `ray start` of the user's.
    return start_embedded(log_to_driver=False), "embedded (this machine only, as `run` without --address)"


def disconnect(embedded: dict[str, str | None] | None) -> None:
    import ray

    from qlora_ray.connect import stop_embedded

    if embedded is None:
        ray.shutdown()
    else:
        stop_embedded(embedded)


def cluster_checks(embedded: bool, where: str) -> tuple[list[Check], list[dict[str, Any]], Any]:
    import ray

    from qlora_ray.cluster import AutoscalerView, autoscaler_view, node_summary

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    out = [Check("ok", "ray", f"{ray.__version__}, {where}, {len(nodes)} node(s)")]
    out += [Check("ok", "node", node_summary(n)) for n in nodes]
    view = (AutoscalerView("none", detail="embedded Ray") if embedded
            else autoscaler_view(ray.get_runtime_context().gcs_address))
    if view.kind == "unknown":
        out.append(Check("warn", "autoscaler", f"cannot tell whether nodes can be added: {view.detail}",
                         "`ray status` on the head shows the autoscaler; `run` waits as if one runs"))
    elif view.can_add_nodes:
        launching = ", ".join(f"{t} x{n}" for t, n in view.launching.items()) or "nothing"
        out.append(Check("ok", "autoscaler", f"{view.kind}: can add nodes; launching {launching}"))
        for node_type, why in sorted(view.failing.items()):
            out.append(Check("warn", "autoscaler", f"the last launch of {node_type} failed: {why}",
                             "a GPU quota of 0 (new AWS accounts) or no capacity in the region: see "
                             "docs/cluster.md, GPU quotas; `ray status` on the head shows more"))
    else:
        out.append(Check("ok", "autoscaler", f"none: a fixed cluster ({view.detail}); cells for a GPU "
                         "type no node has become unschedulable at once"))
    out.append(_auth_check(embedded, where))
    return out, nodes, view


def _auth_check(embedded: bool, where: str) -> Check:
    from ray._raylet import AuthenticationMode, get_authentication_mode

    if get_authentication_mode() == AuthenticationMode.TOKEN:
        return Check("ok", "auth", "token (RAY_AUTH_MODE=token): every request carries the cluster's token")
    if embedded:
        return Check("ok", "auth", "none; the embedded Ray listens on this machine only")
    host = where.split("://")[-1].rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost", "::1", "[::1]"):
        return Check("ok", "auth", "none; reached on loopback (a tunnel, or this machine)")
    return Check("warn", "auth", f"none: anyone who reaches {where} can run code on the cluster",
                 "turn on token authentication: RAY_AUTH_MODE=token (docs/cluster.md, The token)")


def gpu_node_checks(nodes: list[dict[str, Any]]) -> list[Check]:
    """`node_checks` on every node that offers a GPU, one task each, pinned to the node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_gpus=1, num_cpus=0, max_calls=1, max_retries=0)(node_checks)
    pending = {}
    for node in nodes:
        if (node.get("Resources") or {}).get("GPU", 0) >= 1:
            strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            pending[remote.options(scheduling_strategy=strategy).remote()] = node
    out: list[Check] = []
    done, late = ray.wait(list(pending), num_returns=len(pending), timeout=NODE_CHECK_TIMEOUT_S)
    for ref in done:
        where = pending[ref].get("NodeManagerAddress", "?")
        try:
            checks = ray.get(ref)
        except Exception as e:
            out.append(Check("fail", f"node {where}", f"the check task failed: {type(e).__name__}: {e}"[:300],
                             "look at the node's logs (`ray logs`), its driver and container runtime"))
            continue
        gpus = int(pending[ref]["Resources"]["GPU"])
        for c in checks:
            if c.name == "gpus" and c.status != "ok":
                c = Check("fail", "gpus", f"the node offers {gpus} GPU(s) to Ray, but torch there sees "
                          "no CUDA device", "check the node's NVIDIA driver and that its container gets the "
                          "GPUs (--gpus all / the NVIDIA runtime); a node started with --num-gpus but no "
                          "card fails every GPU cell")
            out.append(Check(c.status, f"node {where}", f"{c.name}: {c.detail}", c.fix))
    for ref in late:
        ray.cancel(ref, force=True)
        out.append(Check("warn", f"node {pending[ref].get('NodeManagerAddress', '?')}",
                         f"no GPU free within {NODE_CHECK_TIMEOUT_S}s to run the checks (a grid running?)",
                         "rerun doctor when the node is idle"))
    return out


# --------------------------------------------------------------------------- the spec


def spec_checks(spec: Any, model_configs: list[str], nodes: list[dict[str, Any]], view: Any) -> list[Check]:
    from qlora_ray.planner import load_model_config, plan_spec
    from qlora_ray.profiles import get_profile

    out: list[Check] = []
    models = {(c.model.name, c.model.revision) for c in spec.cells}
    unreadable = False
    for name, revision in sorted(models, key=str):
        try:
            load_model_config(name, revision, model_configs)
            out.append(Check("ok", "config.json", f"{name}: readable"))
        except ConfigError as e:
            unreadable = True
            text = str(e).replace("\n", " ")
            gated = any(s in text for s in ("Gated", "gated", "401", "403", "Unauthorized"))
            if gated or not os.environ.get("HF_TOKEN"):
                fix = ("a gated model (Llama) needs its licence accepted on the hub and your token: "
                       "HF_TOKEN=hf_... (under `ray job submit`, in the env_vars of --runtime-env FILE, "
                       "docs/cluster.md); "
                       "offline: --model-configs DIR")
            else:
                fix = "a folder holding config.json as model.name, or --model-configs DIR"
            out.append(Check("fail", "config.json", text[:400], fix))
    data = _dataset_checks(spec)
    out += data
    # Planning reads the data too (token counts); a broken file is already reported above.
    if not unreadable and all(c.status != "fail" for c in data):
        plans = plan_spec(spec, model_configs=model_configs)
        bad = [p for p in plans if p.problems]
        if bad:
            shown = "; ".join(f"{p.name}: {p.problems[0]}" for p in bad[:3])
            shown += " ..." if len(bad) > 3 else ""
            out.append(Check("fail", "plan", f"{len(bad)} of {len(plans)} cells cannot run as specified: "
                             f"{shown}",
                             "`qlora-ray plan SPEC` shows every problem; fix the spec, or run with "
                             "--skip-unfit"))
        else:
            out.append(Check("ok", "plan", f"{len(plans)} cells, all fit their GPU profile"))
    # As the scheduler asks: an `emulate_profile` cell wants any GPU, not its profile's type.
    for gpu, emulate in sorted({(c.gpu, c.emulate_profile) for c in spec.cells if c.gpu and c.gpu != "cpu"}):
        out.append(_gpu_type_check(gpu, get_profile(gpu, spec.profiles), spec, nodes, view, emulate))
    return out


def _gpu_type_check(gpu: str, profile: Any, spec: Any, nodes: list[dict[str, Any]], view: Any,
                    emulate: bool = False) -> Check:
    from qlora_ray.cluster import describe_request
    from qlora_ray.tasks import feasible, requirement

    request = requirement(profile, 1, emulate)
    cells = sum(1 for c in spec.cells if c.gpu == gpu and c.emulate_profile == emulate)
    if emulate:
        gpu += f" (emulate_profile: any GPU; the worker refuses one smaller than {gpu})"
    offering = [n for n in nodes if feasible(request, [n])]
    if offering:
        return Check("ok", "gpu type", f"{gpu}: {len(offering)} node(s) offer {describe_request(request)}")
    if view.can_add_nodes:
        if any(all(abs(b.get(k, 0) - v) < 1e-9 for k, v in request.items()) for b in view.infeasible):
            return Check("fail", "gpu type", f"{gpu}: the autoscaler says no node type offers "
                         f"{describe_request(request)}",
                         "add a node type with this resource, or drop the cells")
        return Check("warn", "gpu type", f"{gpu}: no node offers {describe_request(request)} yet; the "
                     f"autoscaler can add nodes, and {cells} cell(s) will wait for one",
                     "make sure a node type advertises it (ray_cluster.yaml `resources`, k8s "
                     "rayStartParams) and the GPU quota allows it")
    return Check("fail", "gpu type", f"{gpu}: no node offers {describe_request(request)} and this cluster "
                 f"cannot add one: {cells} cell(s) would be unschedulable",
                 "run on a cluster with this card (or an autoscaler that has it), or exclude it from "
                 "the spec")


def _dataset_checks(spec: Any) -> list[Check]:
    from qlora_ray.datacheck import check_dataset

    out = []
    for path in sorted({c.dataset.path for c in spec.cells}):
        local = Path(path).expanduser()
        if local.is_file():
            # The check `plan` and `run` make: every line parsed, fields and template checked.
            problems: list[str] = []
            usable = set()
            for d in dict.fromkeys(c.dataset for c in spec.cells if c.dataset.path == path):
                try:
                    usable.add(check_dataset(d).usable)
                except ConfigError as e:
                    problems += [p for p in e.problems if p not in problems]
            if problems:
                out += [Check("fail", "dataset", p.split("; ")[0], p.split("; ", 1)[-1]) for p in problems]
            else:
                out.append(Check("ok", "dataset", f"{path}: {max(usable)} rows with an answer"))
        elif local.exists():
            try:
                with open(local, "rb") as f:
                    f.read(1)
                out.append(Check("ok", "dataset", f"{path}: readable (a folder, loaded by the workers)"))
            except OSError as e:
                out.append(Check("fail", "dataset", f"{path}: {e}", "make it readable by this user"))
        elif "/" in path and not path.startswith((".", "/", "~")) and path.count("/") == 1:
            out.append(Check("ok", "dataset", f"{path}: a hub dataset id (loaded by the workers)"))
        else:
            out.append(Check("fail", "dataset", f"{path}: not found from {os.getcwd()}",
                             "paths in a spec are relative to the working directory (under `ray job submit`, "
                             "the --working-dir); run from the checkout, or give an absolute path"))
    return out


# --------------------------------------------------------------------------- results


def results_check(uri: str) -> Check:
    """Write, read back and delete a probe object where `run` would write its rows."""
    import pyarrow.fs as pafs

    from qlora_ray.results import redact, resolve
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


# --------------------------------------------------------------------------- the command


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

    try:
        embedded, where = connect(args.address)
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
