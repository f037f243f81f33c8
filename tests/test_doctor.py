"""`qlora-ray doctor`: each check's verdict and fix, on real parts where they exist here.

Real: torch, bitsandbytes' 4-bit layer on the CPU, the planner and config.json lookup,
pyarrow's filesystems (a local folder, moto's S3 server on loopback). Stood in for: the
CUDA device (a few documented `torch.cuda` calls) and NVML. The cluster half runs against
the local multi-node Ray in tests/test_scheduler_ray.py.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import pytest
import yaml
from conftest import CONFIGS, DATA
from fake_cuda import A100_80, T4, FakeNvmlDriver, MultiCardCuda, card

from qlora_ray import doctor
from qlora_ray.cluster import AutoscalerView
from qlora_ray.grid import load_spec


def by_name(checks: list[doctor.Check], name: str) -> list[doctor.Check]:
    return [c for c in checks if c.name == name]


def test_on_this_cpu_machine_torch_and_a_real_4bit_layer_pass_and_no_gpu_is_a_warning() -> None:
    import torch

    checks = doctor.machine_checks(torch.cuda)
    assert by_name(checks, "python")[0].status == "ok"
    assert "CPU build" in by_name(checks, "torch")[0].detail
    (gpus,) = by_name(checks, "gpus")
    assert gpus.status == "warn" and "--allow-cpu-fallback" in gpus.detail and "nvidia-smi" in gpus.fix
    (bnb,) = by_name(checks, "bitsandbytes")
    assert bnb.status == "ok" and "on cpu matches" in bnb.detail, bnb.line()
    assert not by_name(checks, "nvml")  # nothing to ask NVML without a GPU
    # On a cluster's head the driver needs no GPU.
    assert by_name(doctor.machine_checks(torch.cuda, driver_only=True), "gpus")[0].status == "ok"


def test_visible_gpus_are_named_with_memory_capability_and_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_OVERRIDE_RESOURCES", raising=False)
    checks = doctor.machine_checks(MultiCardCuda(T4, A100_80), nvml=FakeNvmlDriver())
    t4, a100 = by_name(checks, "gpu")
    assert t4.status == "ok"
    assert "Tesla T4, 14.7 GiB, compute capability 7.5, Ray labels it T4 -> profile T4" in t4.detail
    # Ray labels both A100s `A100`; the 80 GB profile asks for its own label, which nothing sets yet.
    assert a100.status == "warn" and "-> profile A100-80G" in a100.detail
    assert "accelerator_type:A100-80G" in a100.fix and "RAY_OVERRIDE_RESOURCES" in a100.fix
    assert by_name(checks, "nvml")[0].line() == "ok    nvml          driver 580.65.06, 2 device(s)"
    # The fake has no kernels: bitsandbytes on cuda:0 really fails, and says what to do.
    (bnb,) = by_name(checks, "bitsandbytes")
    assert bnb.status == "fail" and "cuda:0" in bnb.detail and "pip install -U bitsandbytes" in bnb.fix

    monkeypatch.setenv("RAY_OVERRIDE_RESOURCES", '{"accelerator_type:A100-80G": 1}')
    assert by_name(doctor.machine_checks(MultiCardCuda(A100_80), nvml=FakeNvmlDriver()), "gpu")[0].status == "ok"

    # A V100 (7.0) under the CUDA 13 build, which has kernels from 7.5 on: the worker would
    # refuse it, so doctor fails it by name with the way out.
    (v100,) = by_name(doctor.machine_checks(MultiCardCuda(card("V100")),
                                            nvml=FakeNvmlDriver()), "gpu")
    assert v100.status == "fail" and v100.detail.endswith("the installed torch has no kernels for it")
    assert "CUDA 12.6" in v100.fix and "newer card" in v100.fix


def test_flash_attention_is_checked_only_when_the_spec_asks_for_it() -> None:
    checks = doctor.machine_checks(MultiCardCuda(T4), nvml=FakeNvmlDriver(), wants_flash=True,
                                   nf4=lambda device: (0.0, 0.1))
    (flash,) = by_name(checks, "flash-attn")
    assert flash.status == "fail" and "sdpa" in flash.fix
    assert not by_name(doctor.machine_checks(MultiCardCuda(T4), nvml=FakeNvmlDriver(), nf4=lambda d: (0.0, 0.1)), "flash-attn")


def _spec(tmp_path: Path, **base) -> object:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "name": "doc", "base": {"model": "meta-llama/Llama-3.1-8B-Instruct",
                                "dataset": {"path": str(DATA)},
                                "train": {"batch_size": 1}, "quant": {"compute_dtype": "float16"},
                                "eval": {"batch_size": 2}, **base},
        "grid": {"gpu": ["T4", "H100"]}}))
    return load_spec(path)


NODES = [{"Alive": True, "NodeID": "a" * 56, "NodeManagerAddress": "10.0.0.2",
          "Resources": {"CPU": 8.0, "GPU": 1.0, "accelerator_type:T4": 1.0}}]


def test_spec_checks_config_json_plan_datasets_and_gpu_types(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(tmp_path)
    fixed = AutoscalerView("readonly", detail="read-only monitor")
    checks = doctor.spec_checks(spec, [str(CONFIGS)], NODES, fixed)
    assert by_name(checks, "config.json")[0].status == "ok"
    assert by_name(checks, "dataset")[0].status == "ok"
    assert by_name(checks, "plan")[0].status == "ok", by_name(checks, "plan")[0].line()
    h100, t4 = by_name(checks, "gpu type")  # sorted by name
    assert t4.status == "ok" and "1 node(s) offer" in t4.detail
    assert h100.status == "fail" and "cannot add one: 1 cell(s) would be unschedulable" in h100.detail

    # With an autoscaler the missing type may still come: a warning saying what must be true.
    growing = doctor.spec_checks(spec, [str(CONFIGS)], NODES, AutoscalerView("v1"))
    h100 = by_name(growing, "gpu type")[0]
    assert h100.status == "warn" and "ray_cluster.yaml" in h100.fix

    # An emulate_profile cell asks for any GPU (as the scheduler does), so the T4 node serves it.
    emulated = doctor.spec_checks(_spec(tmp_path, emulate_profile=True), [str(CONFIGS)], NODES, fixed)
    h100, t4 = by_name(emulated, "gpu type")
    assert h100.status == "ok" and h100.detail.startswith("H100 (emulate_profile: any GPU;"), h100.line()
    assert "1 node(s) offer GPU=1, CPU=1" in h100.detail and "accelerator_type" not in h100.detail

    # The gated model's config.json, with no token and no network: the fix names HF_TOKEN.
    # huggingface_hub reads HF_HUB_OFFLINE and its cache folder at import (constants.py), so
    # setting the variables now would change nothing: the lookup went to the network and
    # slept through five retries (23 s). Its constants are what it reads at call time.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("QLORA_RAY_MODEL_CONFIGS", raising=False)
    offline = doctor.spec_checks(spec, [], NODES, fixed)
    (cfg,) = by_name(offline, "config.json")
    assert cfg.status == "fail" and "meta-llama/Llama-3.1-8B-Instruct" in cfg.detail
    assert "HF_TOKEN" in cfg.fix and "--model-configs" in cfg.fix
    assert "HF_TOKEN (now not set here)" in cfg.detail  # `plan` says the same
    assert not by_name(offline, "plan")  # nothing to plan without the config


def test_a_missing_dataset_says_paths_are_relative_to_the_working_directory(tmp_path: Path) -> None:
    spec = _spec(tmp_path, dataset={"path": "experiments/data/nope.jsonl"})
    (ds,) = by_name(doctor.spec_checks(spec, [str(CONFIGS)], NODES, AutoscalerView("v1")), "dataset")
    assert ds.status == "fail" and "--working-dir" in ds.fix


def test_a_broken_dataset_line_is_named_as_plan_and_run_name_it(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "q", "input": "", "output": "a"}\n{"instruction": "b" "output": "y"}\n')
    spec = _spec(tmp_path, dataset={"path": str(data), "eval_size": 1})
    (ds,) = by_name(doctor.spec_checks(spec, [str(CONFIGS)], NODES, AutoscalerView("v1")), "dataset")
    assert ds.status == "fail" and ds.detail.startswith(f"`{data}:2` is not valid JSON")
    assert "write one JSON object per line" in ds.fix


def test_results_probe_writes_and_removes_its_object_and_explains_failures(tmp_path: Path) -> None:
    ok = doctor.results_check(str(tmp_path / "results"))
    assert ok.status == "ok" and not (tmp_path / "results").exists()  # made for the probe, then removed
    (tmp_path / "kept").mkdir()
    assert doctor.results_check(str(tmp_path / "kept")).status == "ok"
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = doctor.results_check(str(blocker / "results"))
    assert bad.status == "fail" and str(blocker) in bad.detail


moto_server = pytest.importorskip("moto.server")


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                 "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
        monkeypatch.setenv(k, v)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    import boto3

    boto3.client("s3").create_bucket(Bucket="there")
    yield boto3.client("s3")
    server.stop()


def test_results_probe_on_s3_missing_bucket_and_no_credentials(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    ok = doctor.results_check("s3://there/qlora-ray")
    assert ok.status == "ok", ok.line()
    # The probe is gone (pyarrow keeps an empty `qlora-ray/` folder marker where the rows will go).
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="there").get("Contents", [])]
    assert not [k for k in keys if "doctor" in k] and all(k.endswith("/") for k in keys), keys
    missing = doctor.results_check("s3://not-there/qlora-ray")
    assert missing.status == "fail" and "create the bucket" in missing.fix, missing.line()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    anonymous = doctor.results_check("s3://there/qlora-ray")
    assert anonymous.status == "fail", anonymous.line()


def test_the_verb_is_registered_and_its_help_is_instant() -> None:
    from qlora_ray.cli import build_parser

    out = io.StringIO()
    parser = build_parser()
    parser.print_help(out)
    assert "doctor" in out.getvalue()
    args = parser.parse_args(["doctor", "x.yaml", "--address", "127.0.0.1:1", "--results", "s3://b/p"])
    assert (args.spec, args.address, args.results) == ("x.yaml", "127.0.0.1:1", "s3://b/p")
