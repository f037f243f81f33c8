"""The CUDA-only branches, exercised with a thin fake of `torch.cuda` (there is no GPU here),
and the CPU branch for real."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qlora_ray import measure
from qlora_ray.config import ExperimentConfig
from qlora_ray.device import (
    Device,
    DeviceError,
    check_attention,
    check_dtype,
    emulate_profile,
    resolve_device,
)
from qlora_ray.profiles import get_profile


class FakeCuda:
    """Only the documented torch.cuda functions qlora-ray calls, with canned answers."""

    def __init__(self, available=True, name="Tesla T4", total=15 * 2**30, bf16=False,
                 allocated=3 * 2**30, reserved=4 * 2**30):
        self.available, self.bf16 = available, bf16
        self.props = SimpleNamespace(name=name, total_memory=total, uuid="1234-abcd")
        self.allocated, self.reserved = allocated, reserved
        self.calls: list[tuple] = []

    def is_available(self):
        return self.available

    def get_device_properties(self, index):
        assert index == 0  # one visible GPU per experiment, always index 0
        return self.props

    def is_bf16_supported(self):
        return self.bf16

    def reset_peak_memory_stats(self):
        self.calls.append(("reset",))

    def synchronize(self):
        pass

    def max_memory_allocated(self):
        return self.allocated

    def max_memory_reserved(self):
        return self.reserved

    def set_per_process_memory_fraction(self, fraction, device):
        self.calls.append(("fraction", fraction, device))


class FakeNvml:
    def __init__(self, used):
        self.used = used
        self.uuids = []

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.uuids.append(uuid)
        return "handle"

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        import os

        return [SimpleNamespace(pid=os.getpid(), usedGpuMemory=self.used),
                SimpleNamespace(pid=-1, usedGpuMemory=10 * self.used)]


T4_CELL = ExperimentConfig(gpu="T4")


def test_gpu_cell_without_cuda_fails_unless_fallback(monkeypatch):
    monkeypatch.delenv("QLORA_RAY_ALLOW_CPU_FALLBACK", raising=False)
    with pytest.raises(DeviceError, match="asks for gpu 'T4' but torch sees no CUDA device"):
        resolve_device(T4_CELL, FakeCuda(available=False))
    dev = resolve_device(T4_CELL, FakeCuda(available=False), allow_cpu_fallback=True)
    assert (dev.kind, dev.cpu_fallback, dev.device_map) == ("cpu", True, {"": "cpu"})
    monkeypatch.setenv("QLORA_RAY_ALLOW_CPU_FALLBACK", "1")
    assert resolve_device(T4_CELL, FakeCuda(available=False)).cpu_fallback


def test_cpu_cell_runs_on_cpu_without_fallback_flag():
    dev = resolve_device(ExperimentConfig(), FakeCuda(available=False))
    assert dev.kind == "cpu" and not dev.cpu_fallback and dev.total_memory_bytes > 0


def test_cuda_device_is_pinned_to_index_zero():
    dev = resolve_device(T4_CELL, FakeCuda())
    assert dev.device_map == {"": 0}
    assert (dev.name, dev.total_memory_bytes, dev.bf16) == ("Tesla T4", 15 * 2**30, False)


def test_bf16_refused_on_a_card_without_it():
    t4 = resolve_device(T4_CELL, FakeCuda(bf16=False))
    with pytest.raises(DeviceError, match=r"`quant.compute_dtype` is not supported on Tesla T4.*use float16"):
        check_dtype("bfloat16", t4)
    check_dtype("float16", t4)
    check_dtype("bfloat16", resolve_device(T4_CELL, FakeCuda(name="NVIDIA A100", bf16=True)))


def test_flash_attention_needs_ampere_and_the_package():
    t4 = resolve_device(T4_CELL, FakeCuda(bf16=False))
    a100 = resolve_device(T4_CELL, FakeCuda(name="NVIDIA A100", bf16=True))
    with pytest.raises(DeviceError, match="needs an Ampere or newer GPU"):
        check_attention("flash_attention_2", t4, flash_attn_installed=True)
    with pytest.raises(DeviceError, match="pip install flash-attn"):
        check_attention("flash_attention_2", a100, flash_attn_installed=False)
    check_attention("flash_attention_2", a100, flash_attn_installed=True)
    check_attention("sdpa", t4, flash_attn_installed=False)


def test_emulate_profile_caps_memory_fraction_on_bigger_cards_only():
    a100 = Device("cuda", "NVIDIA A100-SXM4-80GB", 80 * 2**30, True)
    cuda = FakeCuda()
    fraction = emulate_profile(get_profile("T4"), a100, cuda)
    assert fraction == pytest.approx(get_profile("T4").total_bytes / (80 * 2**30))
    assert cuda.calls == [("fraction", fraction, 0)]
    assert emulate_profile(get_profile("H200"), a100, FakeCuda()) is None  # the card is smaller


def test_cuda_peaks_prefer_reserved_and_report_every_source():
    cuda = FakeCuda(allocated=3 * 2**30, reserved=4 * 2**30)
    nvml = FakeNvml(used=5 * 2**30)
    probe = measure.MemoryProbe(cuda, nvml=nvml)
    probe.reset()
    peaks = probe.read()
    assert ("reset",) in cuda.calls
    assert nvml.uuids == ["GPU-1234-abcd"]  # found by UUID, not by (remapped) index
    assert peaks.memory_source == "cuda_reserved"
    assert peaks.peak_memory_bytes == 4 * 2**30
    assert peaks.peak_cuda_allocated_bytes == 3 * 2**30
    assert peaks.peak_nvml_bytes == 5 * 2**30  # only this process's entry counts


def test_cpu_peak_rss_tracks_a_real_allocation():
    probe = measure.MemoryProbe(None)
    probe.reset()
    baseline = probe.read().peak_memory_bytes
    block = bytearray(200 * 2**20)  # 200 MiB, touched so it is resident
    for i in range(0, len(block), 4096):
        block[i] = 1
    peaks = probe.read()
    del block
    assert peaks.memory_source == "cpu_rss"
    assert peaks.peak_memory_bytes >= baseline + 150 * 2**20
