"""Which device an experiment runs on, and what that device can do.

Every CUDA-only branch of qlora-ray is here or in `measure.py`, written against the
documented `torch.cuda` API and taking the `cuda` module as a parameter, so tests pass a
thin fake (this machine has no GPU) and the CPU path runs the same code.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Any

from qlora_ray.config import ExperimentConfig, problem
from qlora_ray.profiles import GpuProfile
from qlora_ray.units import GIB

ALLOW_CPU_FALLBACK_ENV = "QLORA_RAY_ALLOW_CPU_FALLBACK"
# totalGlobalMem / nvidia-smi's total when NVML cannot say: the driver keeps 1-2% for itself
# (a T4: torch's "14.74 GiB total capacity" of nvidia-smi's 15360 MiB).
DRIVER_SHARE = 0.98


class DeviceError(RuntimeError):
    """The device cannot run this cell as specified (no GPU, no bf16, no FlashAttention)."""


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" or "cpu"
    name: str
    total_memory_bytes: int | None  # CUDA: totalGlobalMem, what the caching allocator counts
    capability: tuple[int, int] | None = None  # CUDA compute capability
    cpu_fallback: bool = False  # a GPU was asked for but the run went to the CPU

    @property
    def bf16(self) -> bool:
        return self.kind == "cpu" or bf16_native(self.capability)

    @property
    def torch_device(self) -> str:
        return "cuda:0" if self.kind == "cuda" else "cpu"

    @property
    def device_map(self) -> dict[str, Any]:
        # Ray and `docker run --gpus device=N` both expose exactly one GPU to this process,
        # so it is always index 0 here; the whole model goes onto it.
        return {"": 0} if self.kind == "cuda" else {"": "cpu"}


def bf16_native(capability: tuple[int, int] | None) -> bool:
    """bfloat16 in hardware: Ampere (8.0) and newer.

    Not `torch.cuda.is_bf16_supported()`: by default it also says yes when bf16 merely
    *works* through emulation (it allocates a bf16 tensor to find out), which it does on a
    T4 or V100, at a fraction of fp16's speed and with no bf16 tensor cores.
    """
    return capability is not None and capability >= (8, 0)


def fallback_allowed(flag: bool | None = None) -> bool:
    if flag:
        return True
    return os.environ.get(ALLOW_CPU_FALLBACK_ENV, "").lower() in ("1", "true", "yes")


def wants_gpu(cfg: ExperimentConfig) -> bool:
    return cfg.gpu is not None and cfg.gpu != "cpu"


def resolve_device(cfg: ExperimentConfig, cuda: Any, *, allow_cpu_fallback: bool = False) -> Device:
    """Pick the device for `cfg`; a GPU cell that finds no CUDA device fails unless fallback is on.

    A cell that asks for no GPU never asks CUDA anything: on a GPU node that would create a
    context on a card Ray gave to another task. Silently training an 8B model on a CPU for
    days is never what a user wants, so a GPU cell on a node whose GPUs are logical only (or
    whose driver is broken) is an error by default.
    """
    if not wants_gpu(cfg):
        return cpu_device()
    if cuda.is_available():
        return cuda_device(cuda)
    if not fallback_allowed(allow_cpu_fallback):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise DeviceError(
            f"cell asks for gpu {cfg.gpu!r} but torch sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={visible!r}); check the node's driver, or pass "
            f"--allow-cpu-fallback / {ALLOW_CPU_FALLBACK_ENV}=1 to run it on the CPU"
        )
    return cpu_device(cpu_fallback=True)


def cuda_device(cuda: Any) -> Device:
    """The one visible CUDA device, as torch describes it."""
    props = cuda.get_device_properties(0)
    return Device("cuda", props.name, int(props.total_memory), tuple(cuda.get_device_capability(0)))


def cpu_device(cpu_fallback: bool = False) -> Device:
    return Device("cpu", cpu_name(), _ram_bytes(), cpu_fallback=cpu_fallback)


def check_kernels(device: Device, arch_list: list[str]) -> None:
    """Fail early, by name, on a card the installed torch has no kernels for.

    Mirrors torch/cuda/__init__.py `_check_capability`: code built for compute capability X
    runs on devices of capability >= X (PTX is JIT-compiled forward, never backward). torch
    only warns; the first kernel launch then fails with "no kernel image is available".
    """
    if device.kind != "cuda" or not arch_list or device.capability is None:
        return
    have = sorted({int(a.split("_")[1].rstrip("af")) for a in arch_list if "_" in a})
    cc = device.capability[0] * 10 + device.capability[1]
    if not any(code <= cc for code in have):
        lowest = f"{have[0] // 10}.{have[0] % 10}" if have else "?"
        raise DeviceError(
            f"{device.name} has compute capability {device.capability[0]}.{device.capability[1]}, "
            f"and the installed torch has kernels for {lowest} and newer only "
            f"({' '.join(arch_list)}); use a newer card (the default image serves T4 and newer), "
            "or a torch build for this card (CUDA 12.6 wheels still include sm_70; docs/docker.md)"
        )


def check_dtype(compute_dtype: str, device: Device) -> None:
    if compute_dtype == "bfloat16" and not device.bf16:
        raise DeviceError(
            problem("quant.compute_dtype", compute_dtype, f"is not supported on {device.name}",
                    "use float16, or `auto` to pick the best the card has")
        )


def check_attention(attn_implementation: str, device: Device, flash_attn_installed: bool) -> None:
    """FlashAttention-2 needs CUDA, an Ampere+ card and the package."""
    if attn_implementation != "flash_attention_2":
        return
    if device.kind != "cuda" or device.capability is None or device.capability < (8, 0):
        raise DeviceError(
            problem("model.attn_implementation", attn_implementation,
                    f"needs an Ampere or newer GPU, this is {device.name}", "use sdpa")
        )
    if not flash_attn_installed:
        raise DeviceError(
            problem("model.attn_implementation", attn_implementation,
                    "needs the flash-attn package", "pip install flash-attn, or use sdpa")
        )


def emulate_profile(
    profile: GpuProfile, device: Device, cuda: Any, *, context_bytes: int, nvml_total: int | None
) -> int | None:
    """Cap this process to what a real `profile` card would leave to PyTorch; returns the cap.

    A real card's allocator gets its totalGlobalMem (below nvidia-smi's total, which the
    profile holds, by what the driver keeps; taken in the same proportion as on this card
    when NVML can say) minus the CUDA context (as measured here). The cap is
    `set_per_process_memory_fraction`, which binds the caching allocator only: it cannot
    cap the context's later growth (cuBLAS/cuDNN handles, kernels loaded on first use) or
    bitsandbytes' paged optimizer state (cudaMallocManaged), which on the real card would
    be paged out to the host under pressure and here stays resident. The row's
    `cuda_context_bytes` and `paged_optimizer_bytes` show how much of each there was.
    """
    if device.kind != "cuda" or not device.total_memory_bytes:
        return None
    share = device.total_memory_bytes / nvml_total if nvml_total else DRIVER_SHARE
    profile_total = int(profile.total_bytes * share)
    if profile_total > device.total_memory_bytes:
        raise DeviceError(problem(
            "emulate_profile", True,
            f"cannot make {device.name} ({device.total_memory_bytes / GIB:.1f} GiB) act like "
            f"the bigger {profile.name} ({profile_total / GIB:.1f} GiB)",
            f"run it where every GPU is at least {profile.name}'s size, or drop emulate_profile"))
    cap = profile_total - context_bytes
    fraction = cap / device.total_memory_bytes
    if fraction >= 1:
        return None  # the same card: nothing to cap
    cuda.set_per_process_memory_fraction(max(fraction, 0.0), 0)
    return cap


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
