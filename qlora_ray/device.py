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

ALLOW_CPU_FALLBACK_ENV = "QLORA_RAY_ALLOW_CPU_FALLBACK"


class DeviceError(RuntimeError):
    """The device cannot run this cell as specified (no GPU, no bf16, no FlashAttention)."""


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" or "cpu"
    name: str
    total_memory_bytes: int | None
    bf16: bool
    cpu_fallback: bool = False  # a GPU was asked for but the run went to the CPU

    @property
    def torch_device(self) -> str:
        return "cuda:0" if self.kind == "cuda" else "cpu"

    @property
    def device_map(self) -> dict[str, Any]:
        # Ray and `docker run --gpus device=N` both expose exactly one GPU to this process,
        # so it is always index 0 here; the whole model goes onto it.
        return {"": 0} if self.kind == "cuda" else {"": "cpu"}


def fallback_allowed(flag: bool | None = None) -> bool:
    if flag:
        return True
    return os.environ.get(ALLOW_CPU_FALLBACK_ENV, "").lower() in ("1", "true", "yes")


def resolve_device(cfg: ExperimentConfig, cuda: Any, *, allow_cpu_fallback: bool = False) -> Device:
    """Pick the device for `cfg`; a GPU cell that finds no CUDA device fails unless fallback is on.

    Silently training an 8B model on a CPU for days is never what a user wants, so a node
    whose GPUs are logical only (or whose driver is broken) is an error by default.
    """
    wants_gpu = cfg.gpu is not None and cfg.gpu != "cpu"
    if cuda.is_available():
        props = cuda.get_device_properties(0)
        return Device("cuda", props.name, int(props.total_memory), bool(cuda.is_bf16_supported()))
    if wants_gpu and not fallback_allowed(allow_cpu_fallback):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise DeviceError(
            f"cell asks for gpu {cfg.gpu!r} but torch sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={visible!r}); check the node's driver, or pass "
            f"--allow-cpu-fallback / {ALLOW_CPU_FALLBACK_ENV}=1 to run it on the CPU"
        )
    return Device("cpu", cpu_name(), _ram_bytes(), bf16=True, cpu_fallback=wants_gpu)


def check_dtype(compute_dtype: str, device: Device) -> None:
    if compute_dtype == "bfloat16" and not device.bf16:
        raise DeviceError(
            problem("quant.compute_dtype", compute_dtype, f"is not supported on {device.name}",
                    "use float16, or `auto` to pick the best the card has")
        )


def check_attention(attn_implementation: str, device: Device, flash_attn_installed: bool) -> None:
    """FlashAttention-2 needs CUDA, an Ampere+ card (bf16 is the same line) and the package."""
    if attn_implementation != "flash_attention_2":
        return
    if device.kind != "cuda" or not device.bf16:
        raise DeviceError(
            problem("model.attn_implementation", attn_implementation,
                    f"needs an Ampere or newer GPU, this is {device.name}", "use sdpa")
        )
    if not flash_attn_installed:
        raise DeviceError(
            problem("model.attn_implementation", attn_implementation,
                    "needs the flash-attn package", "pip install flash-attn, or use sdpa")
        )


def emulate_profile(profile: GpuProfile, device: Device, cuda: Any) -> float | None:
    """Cap this process to the profile's memory on a bigger card; returns the fraction used."""
    if device.kind != "cuda" or not device.total_memory_bytes:
        return None
    fraction = profile.total_bytes / device.total_memory_bytes
    if fraction >= 1:
        return None
    cuda.set_per_process_memory_fraction(fraction, 0)
    return fraction


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
