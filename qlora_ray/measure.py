"""Peak-memory probes and timers.

CUDA: `torch.cuda.max_memory_allocated` / `max_memory_reserved` after
`reset_peak_memory_stats` (what PyTorch's caching allocator holds), plus the NVML
per-process figure (what `nvidia-smi` shows, including the CUDA context) sampled in a
thread when nvidia-ml-py is installed. CPU: the process's peak resident set size, reset
through `/proc/self/clear_refs` where the kernel allows it.

`peak_memory_bytes` in a row is the reserved figure on CUDA (the memory the process really
kept from other users of the card) and peak RSS on the CPU; `memory_source` says which.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class Peaks:
    peak_memory_bytes: int | None = None
    memory_source: str | None = None
    peak_cuda_allocated_bytes: int | None = None
    peak_cuda_reserved_bytes: int | None = None
    peak_nvml_bytes: int | None = None
    peak_rss_bytes: int | None = None

    def as_row(self) -> dict[str, Any]:
        return dict(self.__dict__)


def reset_rss_peak() -> bool:
    """Reset the kernel's high-water RSS mark (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak_bytes() -> int:
    """VmHWM from /proc (resettable); else getrusage's lifetime peak (KiB on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class NvmlSampler:
    """Polls NVML for this process's GPU memory and keeps the maximum.

    NVML has no per-process peak counter, so it is sampled; a spike shorter than the
    interval can be missed, which is why the allocator figures are the primary source.
    """

    def __init__(self, device_uuid: str | None, interval_s: float = 0.05, nvml: Any = None):
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = nvml
        self._handle = None
        if nvml is None:
            try:
                import pynvml  # nvidia-ml-py

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception:
                return  # not installed, or no driver: the NVML column stays null
        try:
            # Index 0 in this process is not index 0 for NVML (CUDA_VISIBLE_DEVICES remaps),
            # so find the card by UUID.
            uuid = device_uuid
            if uuid and not uuid.startswith("GPU-"):
                uuid = f"GPU-{uuid}"  # torch drops the prefix NVML wants
            self._handle = self._nvml.nvmlDeviceGetHandleByUUID(uuid) if uuid else None
        except Exception:
            self._handle = None
        self._interval = interval_s

    def sample(self) -> None:
        if self._handle is None:
            return
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception:
            return
        pid = os.getpid()
        for p in procs:
            used = getattr(p, "usedGpuMemory", None)
            if p.pid == pid and used is not None:
                self.peak = used if self.peak is None else max(self.peak, used)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def start(self) -> None:
        if self._handle is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def stop(self) -> int | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        self.sample()
        return self.peak


class MemoryProbe:
    """Peak memory between `reset()` and `read()`, on whatever device the run uses.

    `cuda` is the `torch.cuda` module (or a thin fake with the same functions) when the run
    is on a GPU, else None.
    """

    def __init__(self, cuda: Any = None, nvml: Any = None):
        self.cuda = cuda
        self._nvml_arg = nvml
        self._sampler: NvmlSampler | None = None

    def reset(self) -> None:
        if self.cuda is not None:
            self.cuda.synchronize()
            self.cuda.reset_peak_memory_stats()
            if self._sampler is not None:
                self._sampler.stop()
            uuid = getattr(self.cuda.get_device_properties(0), "uuid", None)
            self._sampler = NvmlSampler(str(uuid) if uuid is not None else None, nvml=self._nvml_arg)
            self._sampler.start()
        reset_rss_peak()

    def read(self) -> Peaks:
        rss = rss_peak_bytes()
        if self.cuda is None:
            return Peaks(rss, "cpu_rss", peak_rss_bytes=rss)
        self.cuda.synchronize()
        allocated = int(self.cuda.max_memory_allocated())
        reserved = int(self.cuda.max_memory_reserved())
        nvml = self._sampler.stop() if self._sampler is not None else None
        self._sampler = None
        if reserved:
            primary, source = reserved, "cuda_reserved"
        elif nvml:
            primary, source = nvml, "nvml"
        else:
            primary, source = allocated, "cuda_allocated"
        return Peaks(primary, source, allocated, reserved, nvml, rss)


class Timer:
    """Wall-clock seconds of a block (perf_counter: monotonic, not affected by NTP)."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
