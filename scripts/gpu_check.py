"""GPU acceptance run: what the CUDA fakes in tests/ stand in for, checked on a real card.

Run it through scripts/gpu-check.sh (docs/gpu-check.md). It needs one NVIDIA GPU, the
package (or the image) and about five minutes. It writes a grid for this card on the
built-in tiny model with one emulated cell capped to run out of memory, runs it with
`qlora-ray run --force` (embedded Ray), reads the rows back with pandas, checks them and
prints one JSON summary. Exit code 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def card() -> dict[str, Any]:
    """What torch, NVML and Ray say about the one GPU this check runs on."""
    import torch
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    from qlora_ray.measure import NvmlDevice

    if not torch.cuda.is_available():
        sys.exit("gpu-check: torch sees no CUDA device (driver, CUDA_VISIBLE_DEVICES, a CPU build of torch?)")
    props = torch.cuda.get_device_properties(0)
    nvml = NvmlDevice.open(str(props.uuid))
    free, total = torch.cuda.mem_get_info(0)
    return {
        "name": props.name,
        "capability": [props.major, props.minor],
        "total_memory_bytes": int(props.total_memory),
        "nvml_total_bytes": nvml.total() if nvml else None,
        "context_bytes": int(total - free - torch.cuda.memory_reserved(0)),
        "ray_accelerator_type": NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(props.name),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nvml": nvml is not None,
    }


def spec(info: dict[str, Any], data: Path) -> dict[str, Any]:
    """4-bit and 16-bit cells in every dtype the card has natively, `batch_size: auto`, on a
    profile that is exactly this card; a CPU cell beside them; and one `emulate_profile`
    cell on a profile a few MiB bigger than this card's CUDA context, so that the cap leaves
    its allocator 8 MiB: it must end `oom`, or back off and succeed."""
    total_mib = (info["nvml_total_bytes"] or info["total_memory_bytes"]) // MiB
    major, minor = info["capability"]
    profile = {"total_mib": total_mib, "bf16": major >= 8, "flash_attention": major >= 8,
               "ray_accelerator_type": info["ray_accelerator_type"],
               "compute_capability": f"{major}.{minor}"}
    dtypes = ["float16", "bfloat16"] if major >= 8 else ["float16"]
    runs = [{"name": f"{'nf4' if bits == 4 else 'lora16'}-{dtype}", "quant.bits": bits,
             "quant.compute_dtype": dtype} for bits in (4, 16) for dtype in dtypes]
    runs.append({"name": "cpu-beside", "gpu": "cpu", "quant.compute_dtype": "float32",
                 "train.batch_size": 8})
    # Built not to fit: the planner marks it `tight`, or refuses it where even its low end
    # is above the card, hence `run --force`. The scheduler asks Ray for any GPU for it.
    runs.append({"name": "emulated-oom", "gpu": "tiny-card", "emulate_profile": True,
                 "quant.compute_dtype": "float16", "train.batch_size": 8, "train.oom_backoff": True})
    tiny = oom_profile(info)
    return {
        "name": "gpu-check",
        "profiles": {"this-card": profile,
                     "tiny-card": {**profile, "total_mib": tiny.total_mib}},
        "base": {
            "model": "builtin:tiny-llama",
            "gpu": "this-card",
            "dataset": {"path": str(data), "eval_size": 32},
            "quant": {"bits": 4, "type": "nf4", "double_quant": True},
            "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
            "train": {"epochs": 1, "batch_size": "auto", "learning_rate": 2.0e-3, "max_seq_len": 128,
                      "optim": "paged_adamw_8bit", "logging_steps": 5},
            "eval": {"max_new_tokens": 8, "max_samples": 32},
        },
        "runs": runs,
    }


def oom_profile(info: dict[str, Any], room: int = 8 * MiB) -> Any:
    """A profile whose real card would leave PyTorch `room` bytes after the CUDA context:
    the worker's emulation cap (device.emulate_profile) works the same sum backwards."""
    from qlora_ray.device import DRIVER_SHARE
    from qlora_ray.profiles import GpuProfile

    share = (info["total_memory_bytes"] / info["nvml_total_bytes"] if info["nvml_total_bytes"]
             else DRIVER_SHARE)
    total_mib = math.ceil((info["context_bytes"] + room) / share / MiB)
    major, minor = info["capability"]
    return GpuProfile("tiny-card", total_mib, bf16=major >= 8, flash_attention=major >= 8,
                      ray_accelerator_type=info["ray_accelerator_type"],
                      compute_capability=f"{major}.{minor}")


def mib(x: Any) -> str:
    """Bytes as MiB for the summary, "-" where the row has none."""
    import pandas as pd

    return "-" if x is None or pd.isna(x) else f"{x / MiB:.0f} MiB"


def text(x: Any) -> str:
    """A row's string cell, or "" where it is null (pandas reads nulls as NaN or None)."""
    return x if isinstance(x, str) else ""


def check(name: str, ok: bool | None, detail: str) -> dict[str, Any]:
    return {"check": name, "result": {True: "pass", False: "FAIL", None: "skipped"}[ok], "detail": detail}


def checks(info: dict[str, Any], df: Any) -> list[dict[str, Any]]:
    import pandas as pd

    gpu = df[df.gpu == "this-card"]
    cpu = df[df.name == "cpu-beside"].iloc[0]
    e = df[df.name == "emulated-oom"].iloc[0]
    out = [check("gpu cells ok", bool((gpu.status == "ok").all()),
                 ", ".join(f"{r.name}: {r.status}" + (f" ({text(r.error)[:200]})" if text(r.error) else "")
                           for r in gpu.itertuples()))]
    ok = gpu[gpu.status == "ok"]

    def num(col: str) -> Any:  # missing figures compare False, so they fail the check
        return pd.to_numeric(ok[col], errors="coerce")

    out.append(check(
        "cuda memory sources",
        bool(len(ok)) and bool((ok.memory_source == "cuda_reserved").all()
                               and (num("peak_cuda_allocated_bytes") <= num("peak_cuda_reserved_bytes")).all()
                               and (num("cuda_context_bytes") > 0).all()
                               and (num("peak_eval_bytes") > 0).all()),
        "; ".join(f"{r.name}: {r.memory_source} reserved {mib(r.peak_cuda_reserved_bytes)}, "
                  f"allocated {mib(r.peak_cuda_allocated_bytes)}, context "
                  f"{mib(r.cuda_context_bytes)}, paged "
                  f"{mib(r.paged_optimizer_bytes)}, "
                  f"eval {mib(r.peak_eval_bytes)}" for r in ok.itertuples())))
    if not info["nvml"]:
        out.append(check("nvml figures", None,
                         "nvidia-ml-py is not installed (pip install 'qlora-ray[gpu]')"))
    else:
        out.append(check("nvml figures", bool(len(ok)) and bool((num("peak_nvml_bytes") > 0).all()),
                         "; ".join(f"{r.name}: {mib(r.peak_nvml_bytes)} ({r.nvml_memory_scope})"
                                   for r in ok.itertuples())))
    out.append(check("device_name", bool(len(gpu)) and bool((gpu.device_name == info["name"]).all()
                                                             and (gpu.device == "cuda:0").all()
                                                             and (~gpu.cpu_fallback.astype(bool)).all()),
                     f"torch says {info['name']!r}; rows say {sorted(set(gpu.device_name.dropna()))}"))
    out.append(check("auto batch size", bool(len(ok)) and bool((ok.batch_size_requested == "auto").all()
                                                                and (num("batch_size") >= 1).all()),
                     ", ".join(f"{r.name}: {r.batch_size}" for r in ok.itertuples())))
    out.append(check("cpu cell on the cpu",
                     cpu.status == "ok" and cpu.device == "cpu" and cpu.cuda_visible_devices == ""
                     and cpu.memory_source == "cpu_rss",
                     f"status {cpu.status}, device {cpu.device}, CUDA_VISIBLE_DEVICES="
                     f"{text(cpu.cuda_visible_devices)!r}, {cpu.memory_source}"
                     + (f" ({text(cpu.error)[:200]})" if text(cpu.error) else "")))
    cap, steps = pd.to_numeric(e.emulated_cap_bytes), pd.to_numeric(e.backoff_steps)
    out.append(check("emulated cell oom or backed off",
                     bool((e.status == "oom" or (e.status == "ok" and steps > 0)) and cap > 0
                          and e.device == "cuda:0"),
                     f"status {e.status} in {text(e.error_phase) or '-'} on {text(e.device_name)}, cap "
                     f"{mib(cap)} (profile {e.gpu}), backoff steps {steps}, error {text(e.error)[:200]}"))
    out.append(peaks_in_range(ok))
    return out


def peaks_in_range(ok: Any) -> dict[str, Any]:
    """Measured training peak against the planner: inside its range where the rows carry
    one (predicted_train_low/high_bytes), else not above its (conservative) prediction."""
    import pandas as pd

    if not len(ok):
        return check("peaks inside the planner's range", False, "no ok GPU rows")
    lines, good = [], True
    for r in ok.itertuples():
        low = getattr(r, "predicted_train_low_bytes", None)
        high = getattr(r, "predicted_train_high_bytes", None)
        if low is None or high is None or pd.isna(low) or pd.isna(high):
            low, high = 0, r.predicted_peak_bytes
        measured = r.peak_train_bytes
        inside = not (pd.isna(measured) or pd.isna(high)) and low <= measured <= high
        good &= bool(inside)
        lines.append(f"{r.name}: measured {mib(r.peak_train_bytes)}, planned "
                     f"{mib(low)} to {mib(high)}")
    return check("peaks inside the planner's range", good, "; ".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=None,
                        help="results folder (default: a new gpu-check-results/<UTC time>)")
    args = parser.parse_args()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    results = Path(args.results or f"gpu-check-results/{stamp}").resolve()
    data = ROOT / "experiments" / "data" / "fin_sentiment.jsonl"
    if not data.is_file():
        data = Path("/workspace/experiments/data/fin_sentiment.jsonl")  # the image's copy
    info = card()
    grid = spec(info, data)
    results.mkdir(parents=True, exist_ok=True)
    spec_path = results / "gpu-check.yaml"
    import yaml

    spec_path.write_text(yaml.safe_dump(grid, sort_keys=False))
    run = subprocess.run([str(Path(sys.executable).with_name("qlora-ray")), "run", str(spec_path),
                          "--results", str(results), "--force"], capture_output=True, text=True)

    import pandas as pd

    df = pd.read_parquet(results / "gpu-check" / "runs")
    results_list = checks(info, df)
    passed = all(c["result"] != "FAIL" for c in results_list)
    summary = {"passed": passed, "card": info, "results": str(results / "gpu-check" / "runs"),
               "run_exit_code": run.returncode, "checks": results_list}
    print(json.dumps(summary, indent=1, default=str))
    for c in results_list:
        print(f"{c['result']:>7}  {c['check']}", file=sys.stderr)
    print("gpu-check: " + ("every check passed" if passed else "SOME CHECKS FAILED (see the JSON above)"),
          file=sys.stderr)
    if run.returncode not in (0, 1):
        print(run.stdout[-3000:] + run.stderr[-3000:], file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
