"""scripts/gpu_check.py without a GPU: the grid it writes plans on the cards it targets and
asks Ray for what it should, its emulated cell is sized as it says, and its checks fail on
rows a GPU did not make."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest
import yaml
from conftest import DATA, ROOT
from fake_cuda import CARDS, FakeCuda, FakeNvml, MiB

from qlora_ray.config import ExperimentConfig
from qlora_ray.device import cuda_device, emulate_profile
from qlora_ray.grid import load_spec
from qlora_ray.planner import plan_spec
from qlora_ray.profiles import get_profile
from qlora_ray.results import make_row
from qlora_ray.tasks import requirement

_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def info_of(card: str, nvml: bool = True) -> dict:
    """What gpu_check.card() reports, from the fake's numbers for that card."""
    name, smi_mib, total, cc = CARDS[card]
    return {"name": name, "capability": list(cc), "total_memory_bytes": total,
            "nvml_total_bytes": smi_mib * MiB if nvml else None, "context_bytes": 420 * MiB,
            "ray_accelerator_type": {"T4": "T4", "L4": "L4", "A100-80G": "A100"}[card],
            "nvml": nvml}


@pytest.mark.parametrize(("card", "dtypes"), [("T4", {"float16"}), ("L4", {"float16", "bfloat16"}),
                                              ("A100-80G", {"float16", "bfloat16"})])
def test_the_check_grid_plans_on_the_card_it_targets(tmp_path, card, dtypes):
    grid = gpu_check.spec(info_of(card), DATA)
    path = tmp_path / "gpu-check.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    spec = load_spec(path)
    plans = plan_spec(spec)
    # the emulated cell is built not to fit: `tight`, or refused where the context's low end
    # is above it (the script runs with --force, so it runs either way); the rest fit
    (emulated,) = [p for p in plans if p.name == "emulated-oom"]
    assert emulated.tight or emulated.problems
    assert [p.problems for p in plans if p.problems and p is not emulated] == []
    gpu = [p for p in plans if p.gpu == "this-card"]
    assert {(p.config.quant.bits, p.compute_dtype) for p in gpu} == {(b, d) for b in (4, 16) for d in dtypes}
    assert all(p.config.train.batch_size == "auto" and p.batch_size >= 1 for p in gpu)
    assert [p.name for p in plans if p.gpu == "cpu"] == ["cpu-beside"]
    # what `run` asks Ray for: this card's type for the GPU cells, any GPU for the emulated one
    label = info_of(card)["ray_accelerator_type"]
    asks = {c.name: requirement(get_profile(c.gpu, spec.profiles), 1, c.emulate_profile) for c in spec.cells}
    assert all(asks[p.name] == {"GPU": 1, "CPU": 1, f"accelerator_type:{label}": 0.001} for p in gpu)
    assert asks["emulated-oom"] == {"GPU": 1, "CPU": 1}


@pytest.mark.parametrize("nvml", [True, False])
def test_the_emulated_cell_gets_8_mib_of_allocator(nvml):
    info = info_of("A100-80G", nvml)
    cuda = FakeCuda("A100-80G", context_bytes=info["context_bytes"])
    nvml_total = FakeNvml(cuda).nvmlDeviceGetMemoryInfo("h").total if nvml else None
    cap = emulate_profile(gpu_check.oom_profile(info), cuda_device(cuda), cuda,
                          context_bytes=info["context_bytes"], nvml_total=nvml_total)
    assert 8 * MiB <= cap < 10 * MiB
    # and the grid's profile for it is that one
    profile = gpu_check.spec(info, DATA)["profiles"]["tiny-card"]
    assert profile["total_mib"] == gpu_check.oom_profile(info).total_mib


def gpu_row(name: str, **over) -> dict:
    cfg = ExperimentConfig(name=name, gpu="this-card")
    cols = dict(status="ok", device="cuda:0", device_name="NVIDIA L4", cpu_fallback=False,
                memory_source="cuda_reserved", peak_cuda_reserved_bytes=300 * MiB,
                peak_cuda_allocated_bytes=200 * MiB, cuda_context_bytes=400 * MiB,
                peak_eval_bytes=500 * MiB, peak_train_bytes=700 * MiB, peak_nvml_bytes=710 * MiB,
                nvml_memory_scope="process", batch_size=16, predicted_peak_bytes=900 * MiB)
    return make_row(cfg, cfg.experiment_id, "gpu-check", 1, cols.pop("predicted_peak_bytes"),
                    **{**cols, **over})


def frame(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows)).assign(batch_size_requested="auto")


def test_the_checks_pass_on_gpu_rows_and_fail_on_rows_a_gpu_did_not_make():
    info = {**info_of("L4"), "name": "NVIDIA L4"}
    cpu = make_row(ExperimentConfig(name="cpu-beside", gpu="cpu"), "c", "gpu-check", 1, None,
                   status="ok", device="cpu", cuda_visible_devices="", memory_source="cpu_rss")
    emulated = gpu_row("emulated-oom", gpu="tiny-card", emulate_profile=True, status="oom",
                       error_phase="load", emulated_cap_bytes=8 * MiB)
    good = gpu_check.checks(info, frame(gpu_row("nf4-float16"), gpu_row("lora16-float16"), cpu, emulated))
    assert {c["check"]: c["result"] for c in good} == dict.fromkeys(
        ["gpu cells ok", "cuda memory sources", "nvml figures", "device_name", "auto batch size",
         "cpu cell on the cpu", "emulated cell oom or backed off", "peaks inside the planner's range"], "pass")

    # what a run on the CPU (logical GPUs with --allow-cpu-fallback) would have written
    fallback = gpu_row("nf4-float16", device="cpu", device_name="some CPU", cpu_fallback=True,
                       memory_source="cpu_rss", peak_cuda_reserved_bytes=None,
                       peak_cuda_allocated_bytes=None, cuda_context_bytes=None, peak_nvml_bytes=None,
                       peak_train_bytes=2000 * MiB)
    cpu_on_gpu = {**cpu, "device": "cuda:0", "cuda_visible_devices": None}
    not_oom = {**emulated, "status": "ok", "backoff_steps": 0}
    bad = {c["check"]: c["result"] for c in gpu_check.checks(info, frame(fallback, cpu_on_gpu, not_oom))}
    assert bad == {"gpu cells ok": "pass", "cuda memory sources": "FAIL", "nvml figures": "FAIL",
                   "device_name": "FAIL", "auto batch size": "pass", "cpu cell on the cpu": "FAIL",
                   "emulated cell oom or backed off": "FAIL", "peaks inside the planner's range": "FAIL"}
