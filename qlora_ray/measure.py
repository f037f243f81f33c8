"""Peak-memory probes (CUDA allocator, NVML, CPU RSS) and timers, one window per phase.

docs/memory.md ("What a row measures") says how a window opens and how the columns add up.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Peaks:
    """One window's peaks. `bytes`/`source` is the primary figure, the rest what was seen."""

    bytes: int | None = None
    source: str | None = None  # cuda_reserved, cuda_allocated, nvml or cpu_rss
    cuda_allocated: int | None = None
    cuda_reserved: int | None = None
    nvml: int | None = None
    nvml_scope: str | None = None  # "process", or "device" when NVML cannot name our PID
    rss: int | None = None


# ------------------------------------------------------------------------------ CPU


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


# ------------------------------------------------------------------------------ NVML


class NvmlDevice:
    """The NVML handle of this process's one CUDA device, found by UUID.

    Index 0 in this process is not index 0 for NVML (CUDA_VISIBLE_DEVICES remaps), so the
    card is looked up by the UUID torch reports. torch prints it bare; NVML wants the prefix
    `nvidia-smi -L` shows: `GPU-` for a whole card, `MIG-` for a MIG instance.
    """

    def __init__(self, nvml: Any, handle: Any):
        self.nvml = nvml
        self.handle = handle

    @classmethod
    def open(cls, uuid: str | None, nvml: Any = None) -> NvmlDevice | None:
        if not uuid:
            return None
        if nvml is None:
            try:
                import pynvml  # nvidia-ml-py

                pynvml.nvmlInit()
                nvml = pynvml
            except Exception:
                return None  # not installed, or no driver: the NVML columns stay null
        candidates = [uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]
        for candidate in candidates:
            try:
                return cls(nvml, nvml.nvmlDeviceGetHandleByUUID(candidate))
            except Exception:
                continue
        log.debug("NVML has no device with UUID %s", uuid)
        return None

    def total(self) -> int | None:
        try:
            return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).total)
        except Exception:
            return None

    def used(self) -> tuple[int | None, str]:
        """This process's bytes on the card, or the whole card's when NVML cannot tell.

        In a container the driver reports host PIDs, which never equal ours (without
        `--pid=host`), and some drivers withhold per-process figures. Then the device's
        used memory stands in: under Ray (and `docker run --gpus device=N`) the task has
        the card to itself, so that is this process plus nothing, or little.
        """
        try:
            pid = os.getpid()
            for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                used = getattr(p, "usedGpuMemory", None)
                if p.pid == pid and used is not None:
                    return int(used), "process"
            return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used), "device"
        except Exception:
            return None, "device"


class NvmlSampler:
    """Polls NVML and keeps the maximum. NVML has no peak counter, so a spike shorter than
    the interval can be missed; the allocator figures are the primary source."""

    def __init__(self, device: NvmlDevice | None, interval_s: float = 0.05):
        self.device = device
        self.peak: int | None = None
        self.scope: str | None = None
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        if self.device is None:
            return
        used, scope = self.device.used()
        if used is None:
            return
        self.peak = used if self.peak is None else max(self.peak, used)
        self.scope = "device" if "device" in (scope, self.scope) else scope

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def start(self) -> None:
        self.sample()
        if self.device is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def stop(self) -> tuple[int | None, str | None]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        self.sample()
        return self.peak, self.scope


# ------------------------------------------------------------------------------ probes


def free_device_memory(cuda: Any = None) -> None:
    """Drop unreachable Python objects, then hand the allocator's cached blocks back.

    Never raises: after a sticky CUDA error (an illegal address) every CUDA call fails
    again, and a failing cleanup must not lose the row it is cleaning up after.
    """
    gc.collect()
    if cuda is None:
        return
    try:
        cuda.synchronize()
        cuda.empty_cache()
    except Exception as exc:
        log.warning("could not free CUDA memory (%s); the process exits after this task anyway", exc)


def cuda_context_bytes(cuda: Any, managed_bytes: int = 0) -> int | None:
    """Device memory this process holds outside the caching allocator and managed memory:
    the CUDA context, library handles, loaded kernels. Read from cudaMemGetInfo, so under
    Ray (one task per card) it is this process's; on a shared card it includes the others."""
    try:
        free, total = cuda.mem_get_info(0)
        return max(0, int(total) - int(free) - int(cuda.memory_reserved(0)) - managed_bytes)
    except Exception:
        return None


class MemoryProbe:
    """Peak memory between `start()` and `read()`, on whatever device the run uses.

    `cuda` is the `torch.cuda` module (or a fake with the same functions) on a GPU, else
    None. `nvml` is the pynvml module (or a fake); None imports it if installed.
    """

    def __init__(self, cuda: Any = None, nvml: Any = None):
        self.cuda = cuda
        self.nvml_device: NvmlDevice | None = None
        if cuda is not None:
            uuid = getattr(cuda.get_device_properties(0), "uuid", None)
            self.nvml_device = NvmlDevice.open(str(uuid) if uuid is not None else None, nvml)
        self._sampler: NvmlSampler | None = None

    def start(self) -> None:
        free_device_memory(self.cuda)
        if self.cuda is not None:
            self.cuda.reset_peak_memory_stats()
            if self._sampler is not None:
                self._sampler.stop()
            self._sampler = NvmlSampler(self.nvml_device)
            self._sampler.start()
        reset_rss_peak()

    def read(self) -> Peaks:
        rss = rss_peak_bytes()
        if self.cuda is None:
            return Peaks(rss, "cpu_rss", rss=rss)
        nvml, scope = self._sampler.stop() if self._sampler is not None else (None, None)
        self._sampler = None
        self.cuda.synchronize()
        allocated = int(self.cuda.max_memory_allocated())
        reserved = int(self.cuda.max_memory_reserved())
        if reserved:
            primary, source = reserved, "cuda_reserved"
        elif nvml:
            primary, source = nvml, "nvml"
        else:
            primary, source = allocated, "cuda_allocated"
        return Peaks(primary, source, allocated, reserved, nvml, scope, rss)


class Timer:
    """Wall-clock seconds of a block (perf_counter: monotonic, not affected by NTP)."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
