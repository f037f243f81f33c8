"""One fake of the CUDA-side APIs qlora-ray calls: `torch.cuda`, NVML (`pynvml`) and
bitsandbytes' paged memory. This machine has no GPU, so every CUDA-only branch is tested
against these; they are only worth it if they are no kinder than the real thing.

Each behaviour below cites the library source it mirrors (torch 2.13, bitsandbytes 0.50,
nvidia-ml-py 13). What it models:

* one visible device (Ray and `docker run --gpus device=N` expose exactly one);
* a CUDA context that appears on first use and sits outside the caching allocator;
* the caching allocator: `allocated` (live tensors) <= `reserved` (cached segments), peaks
  that `reset_peak_memory_stats` sets to the *current* values, `empty_cache` returning the
  unused part of `reserved`, and the per-process fraction cap, which only the allocator obeys;
* `cudaMallocManaged` memory (bitsandbytes' paged optimizer state), outside the allocator;
* sticky errors: after an illegal access every CUDA call raises;
* NVML: the card's UUID with its `GPU-`/`MIG-` prefix, per-process entries keyed by the
  *host* PID (what a container sees), `usedGpuMemory` None where the driver withholds it,
  and the device's used memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

GiB = 2**30
MiB = 2**20

# (name, nvidia-smi total MiB, CUDA totalGlobalMem bytes, compute capability)
# totalGlobalMem is below nvidia-smi's total by what the driver reserves for itself: a T4
# reports 15360 MiB in nvidia-smi and "14.75 GiB total capacity" in torch's OOM message.
CARDS = {
    "T4": ("Tesla T4", 15360, 15_828_320_256, (7, 5)),
    "V100": ("Tesla V100-SXM2-16GB", 16160, 16_935_682_048, (7, 0)),
    "A100-80G": ("NVIDIA A100-SXM4-80GB", 81920, 85_029_158_912, (8, 0)),
    "L4": ("NVIDIA L4", 23034, 23_580_639_232, (8, 9)),
}
# torch/cuda/__init__.py PYTORCH_RELEASES_CODE_CC["13.0"]["x86_64"]: what the CUDA 13
# wheels the image installs were built for.
CU130_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")


class FakeCudaError(RuntimeError):
    """What torch raises for a sticky CUDA error (torch.AcceleratorError is a RuntimeError)."""


@dataclass
class FakeCuda:
    """`torch.cuda` for one device. Drive it with `alloc`/`free`/`managed`/`poison`."""

    card: str = "T4"
    context_bytes: int = 420 * MiB  # a CUDA 12/13 context with torch's kernels loaded lazily
    other_process_bytes: int = 0  # someone else on the card (not under Ray, which gives it whole)
    arch_list: tuple[str, ...] = CU130_ARCHS
    uuid: str = "4a2b5c6d-0000-1111-2222-333344445555"
    mig: bool = False
    pid_namespace_offset: int = 0  # a container: NVML reports host PIDs, not ours

    allocated: int = 0
    reserved: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    managed_bytes: int = 0
    cap: int | None = None
    initialized: bool = False
    sticky: str | None = None
    calls: list[str] = field(default_factory=list)

    # -- the torch.cuda API --------------------------------------------------------------

    OutOfMemoryError = torch.cuda.OutOfMemoryError

    @property
    def name(self) -> str:
        return CARDS[self.card][0]

    @property
    def total_memory(self) -> int:
        return CARDS[self.card][2]

    @property
    def nvml_total(self) -> int:
        return CARDS[self.card][1] * MiB

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.sticky:
            # c10/cuda/CUDAException.h C10_CUDA_CHECK: once the context is corrupted every
            # runtime call returns the same error, and torch raises it again.
            raise FakeCudaError(f"CUDA error: {self.sticky}")

    def _init(self) -> None:
        # The primary context is created by the first runtime call that needs the device
        # (torch/cuda/__init__.py _lazy_init, cudaMemGetInfo): it is device memory the
        # caching allocator never sees.
        self.initialized = True

    def is_available(self) -> bool:
        self.calls.append("is_available")
        return True

    def device_count(self) -> int:
        self.calls.append("device_count")
        return 1

    def get_device_properties(self, device: Any = None) -> Any:
        self._call("get_device_properties")
        assert device in (None, 0, "cuda", "cuda:0"), device  # one visible device: index 0
        major, minor = CARDS[self.card][3]
        return SimpleNamespace(name=self.name, total_memory=self.total_memory, major=major,
                               minor=minor, uuid=self.uuid)

    def get_device_capability(self, device: Any = None) -> tuple[int, int]:
        # torch/cuda/__init__.py get_device_capability: (prop.major, prop.minor)
        props = self.get_device_properties(device)
        return props.major, props.minor

    def get_device_name(self, device: Any = None) -> str:
        return self.get_device_properties(device).name

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        # torch/cuda/__init__.py is_bf16_supported: major >= 8 is native; otherwise, with
        # including_emulation (the default), it creates a bf16 tensor on the device and says
        # True when that works, which it does on a T4 or V100 (bf16 is emulated in fp32).
        self._call("is_bf16_supported")
        return self.get_device_capability()[0] >= 8 or including_emulation

    def get_arch_list(self) -> list[str]:
        # torch/cuda/__init__.py get_arch_list: the build's TORCH_CUDA_ARCH_LIST flags
        return list(self.arch_list)

    def init(self) -> None:
        self._call("init")
        self._init()

    def current_device(self) -> int:
        self._call("current_device")
        self._init()
        return 0

    def synchronize(self, device: Any = None) -> None:
        self._call("synchronize")

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        # torch/cuda/memory.py mem_get_info -> cudaMemGetInfo: (free, total) for the whole
        # device, every process and the context included; total is totalGlobalMem.
        self._call("mem_get_info")
        self._init()
        return self.total_memory - self._device_used(), self.total_memory

    def memory_allocated(self, device: Any = None) -> int:
        self._call("memory_allocated")
        return self.allocated

    def memory_reserved(self, device: Any = None) -> int:
        self._call("memory_reserved")
        return self.reserved

    def max_memory_allocated(self, device: Any = None) -> int:
        self._call("max_memory_allocated")
        return self.peak_allocated

    def max_memory_reserved(self, device: Any = None) -> int:
        self._call("max_memory_reserved")
        return self.peak_reserved

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        # c10/cuda/CUDACachingAllocator.cpp resetPeakStats -> reset_peak_stat: peak = current.
        # Whatever is still cached counts toward the next "peak" unless freed first.
        self._call("reset_peak_memory_stats")
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    def empty_cache(self) -> None:
        # CUDACachingAllocator.cpp emptyCache -> release_cached_blocks: unused segments go
        # back to the driver; live tensors stay.
        self._call("empty_cache")
        self.reserved = self.allocated

    def set_per_process_memory_fraction(self, fraction: float, device: Any = None) -> None:
        # torch/cuda/memory.py set_per_process_memory_fraction: a float in [0, 1] or it
        # raises; CUDACachingAllocator.cpp setMemoryFraction: the limit is fraction x
        # totalGlobalMem, and only the caching allocator's own cudaMalloc calls obey it.
        self._call("set_per_process_memory_fraction")
        if not isinstance(fraction, float):
            raise TypeError("Invalid type for fraction argument, must be `float`")
        if fraction < 0 or fraction > 1:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
        self._init()
        self.cap = int(fraction * self.total_memory) if fraction < 1 else None

    # -- what the code under test would make the device do -------------------------------

    def alloc(self, nbytes: int) -> None:
        """A tensor allocation through the caching allocator (reuses cache first)."""
        self._call("alloc")
        self._init()
        needed = self.allocated + nbytes
        if needed > self.reserved:
            grow = needed - self.reserved
            # CUDACachingAllocator.cpp alloc_block: over the fraction cap, or over what the
            # device has free, is an OutOfMemoryError (after freeing the cache and retrying).
            if self.cap is not None and needed > self.cap:
                self.empty_cache()
                raise torch.cuda.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {nbytes / GiB:.2f} GiB. "
                    f"... this process has a memory fraction cap of {self.cap / GiB:.2f} GiB")
            if grow > self.total_memory - self._device_used():
                raise torch.cuda.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {nbytes / GiB:.2f} GiB")
            self.reserved = needed
        self.allocated = needed
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def free(self, nbytes: int) -> None:
        """A tensor freed: the bytes stay reserved (cached) until empty_cache."""
        self.allocated -= nbytes

    def managed(self, nbytes: int) -> None:
        """cudaMallocManaged, as bitsandbytes' get_paged does: not the allocator's, no cap."""
        self._init()
        self.managed_bytes += nbytes

    def poison(self, error: str = "an illegal memory access was encountered") -> None:
        self.sticky = error

    def _device_used(self) -> int:
        ctx = self.context_bytes if self.initialized else 0
        return ctx + self.reserved + self.managed_bytes + self.other_process_bytes


class NVMLError(Exception):
    """pynvml.NVMLError: raised by every call whose return code is not NVML_SUCCESS."""


class FakeNvml:
    """The pynvml functions qlora-ray calls, answering from a FakeCuda's state."""

    NVMLError = NVMLError

    def __init__(self, cuda: FakeCuda, per_process: bool = True):
        self.cuda = cuda
        self.per_process = per_process  # False: the driver withholds usedGpuMemory
        self.lookups: list[str] = []

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        # pynvml.py nvmlDeviceGetHandleByUUID: an exact match of the full string NVML prints
        # (`GPU-<uuid>`, or `MIG-<uuid>` for a MIG instance), else NVML_ERROR_NOT_FOUND.
        self.lookups.append(uuid)
        prefix = "MIG-" if self.cuda.mig else "GPU-"
        if uuid != prefix + self.cuda.uuid:
            raise NVMLError("Not Found")
        return "handle"

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[Any]:
        # pynvml.py nvmlDeviceGetComputeRunningProcesses: one entry per process with a
        # context, `pid` as the driver knows it (the host's PID namespace), `usedGpuMemory`
        # None where NVML_VALUE_NOT_AVAILABLE.
        ours = self.cuda._device_used() - self.cuda.other_process_bytes
        procs = [SimpleNamespace(pid=os.getpid() + self.cuda.pid_namespace_offset,
                                 usedGpuMemory=ours if self.per_process else None)]
        if self.cuda.other_process_bytes:
            procs.append(SimpleNamespace(pid=1, usedGpuMemory=self.cuda.other_process_bytes))
        return procs if self.cuda.initialized else []

    def nvmlDeviceGetMemoryInfo(self, handle: str, version: Any = None) -> Any:
        # pynvml.py c_nvmlMemory_t: total (nvidia-smi's figure), free, used for the device
        used = self.cuda._device_used()
        total = self.cuda.nvml_total
        return SimpleNamespace(total=total, free=total - used, used=used)


def paged_tensor(nbytes: int) -> torch.Tensor:
    """A stand-in for bitsandbytes.functional.get_paged's result: a tensor marked `is_paged`
    (functional.py get_paged sets it, and optim/optimizer.py get_state_buffer appends the
    buffer to GlobalPageManager.paged_tensors, which nothing ever empties)."""
    t = torch.zeros(nbytes // 4, dtype=torch.float32)
    t.is_paged = True
    t.page_deviceid = 0
    return t


def install(monkeypatch: Any, fake: FakeCuda) -> FakeCuda:
    """Make `torch.cuda` the fake for the test, with the real module behind it for the rest."""
    real = torch.cuda

    class Module:
        def __getattr__(self, name: str) -> Any:
            if hasattr(fake, name):
                return getattr(fake, name)
            return getattr(real, name)

    monkeypatch.setattr(torch, "cuda", Module())
    return fake


# --------------------------------------------------------------------------- doctor

class MultiCardCuda:
    """The few `torch.cuda` calls `qlora-ray doctor` makes on a machine with several cards:
    is_available, device_count, get_device_properties(i) with name, total_memory, major and
    minor (the fields of torch's _CudaDeviceProperties, torch/_C/__init__.pyi), get_arch_list.
    The one-device `FakeCuda` above is what a worker sees under Ray."""

    def __init__(self, *cards: tuple[str, int, int, int]):
        self.cards = [SimpleNamespace(name=n, total_memory=m, major=a, minor=b) for n, m, a, b in cards]

    def is_available(self) -> bool:
        return bool(self.cards)

    def device_count(self) -> int:
        return len(self.cards)

    def get_device_properties(self, index: int) -> SimpleNamespace:
        return self.cards[index]

    def get_arch_list(self) -> list[str]:
        return list(CU130_ARCHS)  # the CUDA 13 build's kernels (see CU130_ARCHS)


class FakeNvmlDriver:
    """nvidia-ml-py's nvmlInit / nvmlDeviceGetCount / nvmlSystemGetDriverVersion (doctor's driver line)."""

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.65.06"


def card(key: str) -> tuple[str, int, int, int]:
    """A `MultiCardCuda` card from CARDS: (name, totalGlobalMem, major, minor)."""
    name, _, total, (major, minor) = CARDS[key]
    return name, total, major, minor


A100_80, T4 = card("A100-80G"), card("T4")
