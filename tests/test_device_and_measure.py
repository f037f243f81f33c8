"""The CUDA-only branches against the shared fake (tests/fake_cuda.py: it behaves like
torch.cuda, NVML and bitsandbytes' paging where it matters), and the CPU branch for real."""

from __future__ import annotations

import pytest
from fake_cuda import CU130_ARCHS, FakeCuda, FakeNvml, GiB, MiB, paged_tensor

from qlora_ray import measure
from qlora_ray.config import ExperimentConfig
from qlora_ray.device import (
    DeviceError,
    check_attention,
    check_dtype,
    check_kernels,
    cuda_device,
    emulate_profile,
    resolve_device,
)
from qlora_ray.profiles import get_profile

T4_CELL = ExperimentConfig(gpu="T4")


class NoCuda(FakeCuda):
    def is_available(self) -> bool:
        self.calls.append("is_available")
        return False


def test_gpu_cell_without_cuda_fails_unless_fallback(monkeypatch):
    monkeypatch.delenv("QLORA_RAY_ALLOW_CPU_FALLBACK", raising=False)
    with pytest.raises(DeviceError, match="asks for gpu 'T4' but torch sees no CUDA device"):
        resolve_device(T4_CELL, NoCuda())
    dev = resolve_device(T4_CELL, NoCuda(), allow_cpu_fallback=True)
    assert (dev.kind, dev.cpu_fallback, dev.device_map) == ("cpu", True, {"": "cpu"})
    monkeypatch.setenv("QLORA_RAY_ALLOW_CPU_FALLBACK", "1")
    assert resolve_device(T4_CELL, NoCuda()).cpu_fallback


def test_a_cpu_cell_on_a_gpu_node_never_touches_cuda():
    """Issue 13 item 1: asking `is_available()` already initializes the driver on the card."""
    cuda = FakeCuda()
    dev = resolve_device(ExperimentConfig(), cuda)
    assert dev.kind == "cpu" and not dev.cpu_fallback and dev.total_memory_bytes > 0
    assert resolve_device(ExperimentConfig(gpu="cpu"), cuda).kind == "cpu"
    assert cuda.calls == [] and not cuda.initialized


def test_cuda_device_is_pinned_to_index_zero():
    dev = resolve_device(T4_CELL, FakeCuda())
    assert dev.device_map == {"": 0} and dev.torch_device == "cuda:0"
    assert (dev.name, dev.total_memory_bytes, dev.capability) == ("Tesla T4", 15_828_320_256, (7, 5))


def test_bf16_comes_from_the_compute_capability_not_torchs_emulation_check():
    """Issue 13 item 5: on a T4 torch's is_bf16_supported() says True (emulation)."""
    from qlora_ray.worker import compute_dtype

    t4_cuda = FakeCuda("T4")
    assert t4_cuda.is_bf16_supported()  # what torch 2.13 answers on a T4
    t4, a100 = cuda_device(t4_cuda), cuda_device(FakeCuda("A100-80G"))
    assert not t4.bf16 and a100.bf16
    with pytest.raises(DeviceError, match=r"`quant.compute_dtype` is not supported on Tesla T4.*use float16"):
        check_dtype("bfloat16", t4)
    check_dtype("float16", t4)
    check_dtype("bfloat16", a100)
    # `auto` on the card itself (a cell without a profile, or an emulated one)
    auto = ExperimentConfig(gpu="T4").replace(**{"quant.compute_dtype": "auto"})
    assert compute_dtype(auto, None, t4) == "float16"
    assert compute_dtype(auto, None, a100) == "bfloat16"
    assert compute_dtype(auto, get_profile("T4"), a100) == "float16"  # emulating a T4


def test_flash_attention_needs_ampere_and_the_package():
    t4, a100 = cuda_device(FakeCuda("T4")), cuda_device(FakeCuda("A100-80G"))
    with pytest.raises(DeviceError, match="needs an Ampere or newer GPU, this is Tesla T4"):
        check_attention("flash_attention_2", t4, flash_attn_installed=True)
    with pytest.raises(DeviceError, match="pip install flash-attn"):
        check_attention("flash_attention_2", a100, flash_attn_installed=False)
    check_attention("flash_attention_2", a100, flash_attn_installed=True)
    check_attention("sdpa", t4, flash_attn_installed=False)


def test_a_card_the_installed_torch_has_no_kernels_for_fails_by_name():
    """Issue 13 item 10: the CUDA 13 wheels start at sm_75; a V100 is 7.0."""
    v100 = cuda_device(FakeCuda("V100"))
    with pytest.raises(DeviceError, match=r"compute capability 7\.0.*kernels for 7\.5 and newer"):
        check_kernels(v100, list(CU130_ARCHS))
    check_kernels(v100, ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80"])  # a CUDA 12.6 build
    check_kernels(cuda_device(FakeCuda("T4")), list(CU130_ARCHS))
    check_kernels(cuda_device(FakeCuda("L4")), list(CU130_ARCHS))  # sm_86 code runs on 8.9


# ------------------------------------------------------------------------ emulate_profile


def test_emulation_caps_the_allocator_at_what_a_real_card_leaves_to_pytorch():
    """Issue 13 item 4: a T4 gives PyTorch its totalGlobalMem minus the CUDA context, not
    nvidia-smi's 15360 MiB; the cap binds the allocator only, not managed memory."""
    cuda = FakeCuda("A100-80G")
    nvml = FakeNvml(cuda)
    a100 = cuda_device(cuda)
    context = measure.cuda_context_bytes(cuda)
    assert context == cuda.context_bytes
    cap = emulate_profile(get_profile("T4"), a100, cuda, context_bytes=context,
                          nvml_total=nvml.nvmlDeviceGetMemoryInfo("handle").total)
    real_t4 = FakeCuda("T4")
    expected = real_t4.total_memory - real_t4.context_bytes
    # The driver's share is taken from the A100 (a T4 keeps 1.7% for itself, an A100 1.0%),
    # so the cap is right to about 1%; nvidia-smi's total, as before, was 4.7% too generous.
    assert cap == pytest.approx(expected, rel=0.01)
    assert cap < get_profile("T4").total_bytes - context
    # the allocator now fails where a real T4's would, and not before
    cuda.alloc(cap - 64 * MiB)
    with pytest.raises(cuda.OutOfMemoryError, match="memory fraction cap"):
        cuda.alloc(128 * MiB)
    cuda.managed(4 * GiB)  # bitsandbytes' paged state: not capped (the docstring says so)


def test_emulation_without_nvml_and_on_the_same_or_a_smaller_card():
    cuda = FakeCuda("A100-80G")
    cap = emulate_profile(get_profile("L4"), cuda_device(cuda), cuda, context_bytes=400 * MiB, nvml_total=None)
    assert cap == int(get_profile("L4").total_bytes * 0.98) - 400 * MiB
    assert isinstance(cuda.cap, int)  # set_per_process_memory_fraction got a float in range
    # a T4 emulating a T4 is capped at what the card leaves anyway
    t4 = FakeCuda("T4")
    nvml_total = FakeNvml(t4).nvmlDeviceGetMemoryInfo("h").total
    assert emulate_profile(get_profile("T4"), cuda_device(t4), t4, context_bytes=t4.context_bytes,
                           nvml_total=nvml_total) == t4.total_memory - t4.context_bytes
    # a smaller card cannot pretend to be a bigger one
    with pytest.raises(DeviceError, match=r"cannot make Tesla T4 .* act like the bigger A100-40G"):
        emulate_profile(get_profile("A100-40G"), cuda_device(t4), t4, context_bytes=0, nvml_total=nvml_total)


# ------------------------------------------------------------------------ memory windows


def test_a_phase_window_does_not_inherit_the_previous_phases_cache():
    """Issue 13 item 2: reset_peak_memory_stats sets the peak to the *current* reserved
    bytes, so eval-before's cached blocks must be handed back before training is measured."""
    cuda = FakeCuda("T4")
    probe = measure.MemoryProbe(cuda, nvml=FakeNvml(cuda))
    probe.start()
    cuda.alloc(6 * GiB)  # eval before: generation's KV cache and logits
    cuda.free(6 * GiB)  # freed, but the allocator keeps the blocks cached
    eval_before = probe.read()
    probe.start()
    cuda.alloc(2 * GiB)  # training
    train = probe.read()
    assert eval_before.bytes == 6 * GiB
    assert (train.bytes, train.source, train.cuda_allocated) == (2 * GiB, "cuda_reserved", 2 * GiB)


def test_nvml_in_a_container_falls_back_to_the_devices_used_memory():
    """Issue 13 item 6: in a container NVML lists host PIDs, never ours."""
    cuda = FakeCuda("T4", pid_namespace_offset=100_000)
    nvml = FakeNvml(cuda)
    probe = measure.MemoryProbe(cuda, nvml=nvml)
    probe.start()
    cuda.alloc(3 * GiB)
    peaks = probe.read()
    assert nvml.lookups[0] == "GPU-" + cuda.uuid  # found by UUID, not by (remapped) index
    assert (peaks.nvml, peaks.nvml_scope) == (3 * GiB + cuda.context_bytes, "device")


def test_nvml_per_process_figure_when_the_pid_matches_and_mig_uuids():
    cuda = FakeCuda("A100-80G", mig=True, other_process_bytes=5 * GiB)
    cuda.init()  # as the worker's setup does: the context exists before any window opens
    nvml = FakeNvml(cuda)
    probe = measure.MemoryProbe(cuda, nvml=nvml)
    probe.start()
    cuda.alloc(1 * GiB)
    peaks = probe.read()
    assert nvml.lookups[-1] == "MIG-" + cuda.uuid
    assert (peaks.nvml, peaks.nvml_scope) == (1 * GiB + cuda.context_bytes, "process")  # not the other's 5
    # a driver that withholds per-process figures: the device's, labelled
    withheld = measure.MemoryProbe(cuda, nvml=FakeNvml(cuda, per_process=False))
    withheld.start()
    assert withheld.read().nvml_scope == "device"


def test_record_splits_phases_adds_context_and_paged_state_and_keeps_training_after_a_failed_eval():
    """Issue 13 items 2, 3, 11 and issue 9 item 5 through the worker's Record: each phase
    has its own window; the training figure as the card saw it adds the context and the
    paged optimizer state; an eval that fails after training leaves the training columns."""
    import bitsandbytes.functional as F

    from qlora_ray.record import Record
    from qlora_ray.worker import Run

    cuda = FakeCuda("T4")
    probe = measure.MemoryProbe(cuda, nvml=FakeNvml(cuda))
    cfg = ExperimentConfig(gpu="T4")
    record = Record(cfg, cfg.experiment_id, "s", 1, None)
    record.run = Run(cfg, cuda_device(cuda), "float16", cuda, probe, 1,
                     cuda_context_bytes=measure.cuda_context_bytes(cuda))
    pages = F.GlobalPageManager.get_instance().paged_tensors
    paged = paged_tensor(8 * MiB)
    try:
        with record.phase("eval", window="eval_before"):
            cuda.alloc(6 * GiB)
            cuda.free(6 * GiB)
        with record.phase("train", window="train"):
            cuda.alloc(2 * GiB)
            pages.append(paged)  # what bitsandbytes' get_state_buffer does on a GPU
            cuda.managed(paged.nbytes)
            cuda.free(1 * GiB)
        try:
            with record.phase("eval", window="eval"):
                cuda.alloc(5 * GiB)
                raise RuntimeError("generation failed")
        except RuntimeError as exc:
            record.fail(exc)
    finally:
        pages.remove(paged)
    row = record.row()
    ctx = cuda.context_bytes
    assert (row["status"], row["error_phase"]) == ("failed", "eval")
    assert (row["peak_memory_bytes"], row["memory_source"]) == (2 * GiB, "cuda_reserved")
    assert row["peak_cuda_reserved_bytes"] == 2 * GiB
    assert (row["cuda_context_bytes"], row["paged_optimizer_bytes"]) == (ctx, 8 * MiB)
    assert row["peak_train_bytes"] == 2 * GiB + ctx + 8 * MiB
    assert row["peak_eval_before_bytes"] == 6 * GiB + ctx
    assert row["peak_eval_bytes"] == (1 + 5) * GiB + ctx  # the training model still resident


def test_sticky_cuda_error_still_gives_a_row(monkeypatch):
    """Issue 13 item 11: after an illegal address every CUDA call raises again, including
    the cleanup's empty_cache; the row must survive it."""
    from fake_cuda import install

    from qlora_ray.worker import run_experiment

    cuda = install(monkeypatch, FakeCuda("T4"))

    def crash(*a, **k):
        cuda.poison()
        cuda.calls.clear()
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr("qlora_ray.worker.prepare", crash)
    out = run_experiment(ExperimentConfig(gpu="T4").replace(**{"quant.compute_dtype": "float16"}))
    assert (out.row["status"], out.row["error_phase"]) == ("failed", "data")
    assert "illegal memory access" in out.row["error"]
    assert out.row["device_name"] == "Tesla T4" and out.row["cuda_context_bytes"] == cuda.context_bytes
    assert "synchronize" in cuda.calls  # the cleanup was tried, and failed quietly


def test_cpu_peak_rss_tracks_a_real_allocation():
    probe = measure.MemoryProbe(None)
    probe.start()
    baseline = probe.read().bytes
    block = bytearray(200 * 2**20)  # 200 MiB, touched so it is resident
    for i in range(0, len(block), 4096):
        block[i] = 1
    peaks = probe.read()
    del block
    assert peaks.source == "cpu_rss"
    assert peaks.bytes >= baseline + 150 * 2**20
