"""`doctor`'s machine checks: Python, torch, GPUs, bitsandbytes, NVML, flash-attn.

Run here, and by one Ray task on every GPU node of the cluster (`gpu_node_checks`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

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
        text = f"{self.status:<4}  {self.name:<13} {self.detail}"
        return text + (f" -> fix: {self.fix}" if self.fix and self.status != "ok" else "")


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

