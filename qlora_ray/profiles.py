"""GPU profiles (memory, capabilities, Ray label, speed, price) and the per-GPU presets.

Pure data. Where the figures come from and how Ray labels cards: docs/memory.md ("GPU
profiles") and docs/time.md; a spec's `profiles:` entries are these fields (docs/config.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from qlora_ray.config import SAFE_NAME, ConfigError, _f, problem
from qlora_ray.fromdict import Validated, at_most, positive

# Far above any card (16 TiB); stops a size written in bytes or GiB instead of MiB.
MAX_CARD_MIB = 16 * 1024 * 1024
SPEED_FIELDS = ("peak_tflops", "peak_fp32_tflops", "memory_bandwidth_gbs", "usd_per_hour",
                "op_overhead_us")
_CAPABILITY = re.compile(r"\d{1,2}\.\d")


@dataclass(frozen=True)
class GpuProfile(Validated):
    """One card: memory, capabilities, Ray label, speed and price. A spec's `profiles:`
    entries are these fields (docs/config.md), checked like every other section."""

    name: str = _f(help="The profile's name: its key under `profiles:`, what `gpu:` names.")
    total_mib: int = _f(help="Card memory as nvidia-smi reports it, in MiB (a new card must give it).")
    bf16: bool = _f(False, "Native bfloat16 (compute capability >= 8.0).")
    flash_attention: bool = _f(False, "FlashAttention-2 kernels (Ampere or newer).")
    ray_accelerator_type: str | None = _f(
        None, "Ray resource label: the task asks for `accelerator_type:<this>` (a new card: its name).")
    compute_capability: str = _f(
        "0.0", "CUDA compute capability, MAJOR.MINOR (e.g. 8.6; a new card must give it).")
    peak_tflops: float | None = _f(
        None, "Dense FP16/BF16 tensor-core peak, TFLOPS (datasheet, without sparsity).")
    peak_fp32_tflops: float | None = _f(
        None, "Plain FP32 peak, TFLOPS (what fp32 matmuls get: PyTorch leaves TF32 off).")
    memory_bandwidth_gbs: float | None = _f(None, "Memory bandwidth, GB/s (datasheet).")
    usd_per_hour: float | None = _f(
        None, "Price of one GPU-hour in US dollars (built-in cards: AWS On-Demand list price).")
    op_overhead_us: float | None = _f(
        None, "Host time per dispatched op, microseconds (default 10 on a GPU host).")

    def problems(self) -> list[str]:
        # The name becomes a Ray resource label, a cell name token and a plot label.
        if not SAFE_NAME.fullmatch(self.name):
            return [problem("profiles", self.name, "has a profile name that is not a safe name",
                            "use letters, digits and . _ + = - (e.g. RTX-4090)")]
        key = f"profiles.{self.name}"
        out: list[str] = []
        if self.is_gpu:
            positive(out, f"{key}.total_mib", self.total_mib, "give the card's memory in MiB")
        at_most(out, f"{key}.total_mib", self.total_mib, MAX_CARD_MIB,
                "give the card's memory in MiB, as nvidia-smi reports it")
        label = self.ray_accelerator_type
        if label is not None and not SAFE_NAME.fullmatch(label):
            out.append(problem(f"{key}.ray_accelerator_type", label, "is not a safe name",
                               "use the label Ray gives the card, e.g. A10G"))
        if not _CAPABILITY.fullmatch(self.compute_capability):
            out.append(problem(f"{key}.compute_capability", self.compute_capability,
                               "must be MAJOR.MINOR", "write e.g. 8.6 (nvidia-smi --query-gpu=compute_cap)"))
        for name in SPEED_FIELDS:
            value = getattr(self, name)
            if value is not None:
                positive(out, f"{key}.{name}", value, "give the card's figure, or remove the key",
                         allow_zero=name == "usd_per_hour")
        return out

    @property
    def total_bytes(self) -> int:
        return self.total_mib * 1024 * 1024

    @property
    def usable_bytes(self) -> int:
        """What a training process may use: all of it (the estimate carries the context)."""
        return self.total_bytes

    @property
    def is_gpu(self) -> bool:
        return self.name != "cpu"


def _ampere_or_newer(cc: str) -> bool:
    """bf16 and FlashAttention-2 kernels: compute capability 8.0 and newer."""
    return int(cc.split(".")[0]) >= 8


def _p(name: str, mib: int, cc: str, ray_type: str | None, tflops: float, fp32: float, gbs: float,
       usd: float | None) -> GpuProfile:
    ampere = _ampere_or_newer(cc)
    return GpuProfile(name, mib, bf16=ampere, flash_attention=ampere,
                      ray_accelerator_type=ray_type, compute_capability=cc, peak_tflops=tflops,
                      peak_fp32_tflops=fp32, memory_bandwidth_gbs=gbs, usd_per_hour=usd)


BUILTIN_PROFILES: dict[str, GpuProfile] = {
    p.name: p
    for p in [
        # name, nvidia-smi MiB, compute capability, Ray label, 16-bit TFLOPS, FP32 TFLOPS,
        # GB/s, $ per GPU-hour (AWS instance type in the comment)
        _p("T4", 15360, "7.5", "T4", 65, 8.1, 320, 0.752),  # g4dn.2xlarge
        _p("V100-16G", 16160, "7.0", "V100", 125, 15.7, 900, 3.06),  # p3.2xlarge
        # A 32 GB cell must not land on a 16 GB V100 (both are `V100` to Ray): sized label.
        _p("V100-32G", 32510, "7.0", "V100-32G", 125, 15.7, 900, 31.212 / 8),  # p3dn.24xlarge
        _p("A10G", 23028, "8.6", "A10G", 70, 31.5, 600, 1.212),  # g5.2xlarge
        _p("L4", 23034, "8.9", "L4", 121, 30.3, 300, 0.9776),  # g6.2xlarge
        _p("RTX-A4000", 16376, "8.6", "RTX-A4000", 76.7, 19.2, 448, None),
        _p("RTX-A5000", 24564, "8.6", "RTX-A5000", 111.1, 27.8, 768, None),
        _p("RTX-A6000", 49140, "8.6", "RTX-A6000", 154.8, 38.7, 768, None),
        _p("L40S", 46068, "8.9", "L40S", 362, 91.6, 864, 1.861),  # g6e.xlarge
        _p("A100-40G", 40960, "8.0", "A100-40G", 312, 19.5, 1555, 32.7726 / 8),  # p4d.24xlarge
        _p("A100-80G", 81920, "8.0", "A100-80G", 312, 19.5, 2039, 40.9657 / 8),  # p4de.24xlarge
        _p("H100", 81559, "9.0", "H100", 989, 67, 3350, 98.32 / 8),  # p5.48xlarge
        _p("H200", 143771, "9.0", "H200", 989, 67, 4800, None),
        # The CPU "profile" has no card; the planner reports predictions without a limit. Its
        # speed numbers are nominal for one core of a recent x86 server (AVX2 FMA at ~3 GHz,
        # a share of the socket's bandwidth) and the op cost is eager PyTorch's on such a core;
        # `qlora-ray calibrate` fits them to the machine (docs/time.md).
        GpuProfile("cpu", 0, bf16=True, flash_attention=False, ray_accelerator_type=None,
                   peak_tflops=0.1, peak_fp32_tflops=0.1, memory_bandwidth_gbs=10,
                   op_overhead_us=22),
    ]
}

# Names people type for the same card.
ALIASES = {
    "V100": "V100-16G", "A100": "A100-40G", "A4000": "RTX-A4000", "A5000": "RTX-A5000",
    "A6000": "RTX-A6000", "H100-80G": "H100",
}



def new_card_defaults(name: str, fields: Any, key: str) -> tuple[dict[str, Any], list[str]]:
    """Where a `profiles:` entry for a card qlora-ray does not know starts from.

    Its Ray label is its name, and bf16 and FlashAttention-2 follow its compute capability
    (8.0, Ampere, and newer), which it must give: the planner decides from it which kernels
    and dtypes the card has.
    """
    base: dict[str, Any] = {"ray_accelerator_type": name}
    cc = fields.get("compute_capability") if isinstance(fields, dict) else None
    if cc is None:
        return base, [problem(f"{key}.compute_capability", None,
                              "is required for a card qlora-ray does not know (it decides which "
                              "kernels and dtypes the card has)",
                              "add it: MAJOR.MINOR, as `nvidia-smi --query-gpu=compute_cap "
                              "--format=csv` prints it, e.g. 8.9")]
    if isinstance(cc, str) and _CAPABILITY.fullmatch(cc):
        ampere = _ampere_or_newer(cc)
        base.update(bf16=ampere, flash_attention=ampere)
    return base, []


def get_profile(
    name: str, extra: dict[str, GpuProfile] | None = None, key: str = "gpu"
) -> GpuProfile:
    """Look a profile up by name or alias; spec-defined profiles win over built-ins."""
    table = {**BUILTIN_PROFILES, **(extra or {})}
    resolved = ALIASES.get(name, name) if name not in table else name
    if resolved in table:
        return table[resolved]
    raise ConfigError([
        problem(key, name, "is not a known GPU profile",
                f"use one of {', '.join(sorted(table))}, or define it under `profiles:` in the spec")
    ])


def profile_for_card(
    ray_label: str | None, total_bytes: int, extra: dict[str, GpuProfile] | None = None
) -> GpuProfile | None:
    """The profile of a card Ray labels `ray_label` with `total_bytes` of memory, if any.

    Ray names a card by its model (`A100` for both sizes); the sized profiles carry the
    model name plus `-<GiB>G`, so among the profiles of that model the one whose memory is
    nearest the card's wins.
    """
    if not ray_label:
        return None
    table = {**BUILTIN_PROFILES, **(extra or {})}
    same_model = [p for p in table.values()
                  if p.ray_accelerator_type and re.sub(r"-\d+G$", "", p.ray_accelerator_type) == ray_label]
    if not same_model:
        return None
    return min(same_model, key=lambda p: abs(p.total_bytes - total_bytes))


def resolve_compute_dtype(requested: str, profile: GpuProfile | None) -> str:
    """`auto` becomes bfloat16 where the card has it, float16 otherwise."""
    if requested != "auto":
        return requested
    if profile is None or profile.bf16:
        return "bfloat16"
    return "float16"


# The CUDA 13 builds of torch 2.13 and bitsandbytes 0.50 (what the image installs) carry
# kernels for compute capability 7.5 and newer: torch/cuda/__init__.py
# PYTORCH_RELEASES_CODE_CC["13.0"] starts at 75, and CUDA 13 itself dropped 7.0. PyTorch's
# CUDA 12.6 builds (and bitsandbytes' cuda126 library) still include 7.0 (V100).
IMAGE_MIN_CAPABILITY = (7, 5)


def capability_problems(
    profile: GpuProfile | None, compute_dtype: str, attn_implementation: str, *,
    min_capability: tuple[int, int] | None = None, flash_attn_installed: bool = True,
) -> list[str]:
    """What the card (or the software that will drive it) cannot do that the cell asks for.

    `compute_dtype` as requested. `min_capability`: the lowest compute capability the torch
    build has kernels for (None: not checked). `flash_attn_installed`: whether the
    flash-attn package is there (the image has none: it compiles against CUDA at install).
    """
    if profile is None:
        return []
    out: list[str] = []
    cc = tuple(int(x) for x in profile.compute_capability.split("."))
    if profile.is_gpu and min_capability is not None and cc < min_capability:
        lowest = ".".join(map(str, min_capability))
        out.append(problem("gpu", profile.name,
                           f"needs a card the installed torch has kernels for (compute capability "
                           f"{lowest} and newer, as in the default image's CUDA 13 build), and "
                           f"{profile.name} has {profile.compute_capability}",
                           "use a T4 or newer card, or CUDA 12.6 builds of torch and bitsandbytes "
                           "(docs/docker.md, \"Which cards\")"))
    if compute_dtype == "bfloat16" and not profile.bf16:
        out.append(problem("quant.compute_dtype", "bfloat16",
                           f"needs a GPU with bf16 (compute capability >= 8.0), and {profile.name} "
                           f"has {profile.compute_capability}", "use float16 or auto"))
    if attn_implementation == "flash_attention_2" and not profile.flash_attention:
        out.append(problem("model.attn_implementation", "flash_attention_2",
                           f"needs an Ampere or newer GPU, and {profile.name} has compute capability "
                           f"{profile.compute_capability}", "use sdpa"))
    elif attn_implementation == "flash_attention_2" and not flash_attn_installed:
        out.append(problem("model.attn_implementation", "flash_attention_2",
                           "needs the flash-attn package, which neither this environment nor the "
                           "default image has",
                           "use sdpa (on Ampere and newer it runs FlashAttention kernels too), or "
                           "install flash-attn where the cells run and plan there"))
    return out


# The seed study's per-GPU starting points: rank / alpha / micro-batch / adapted modules
# grow with the card. A spec references them with `preset: seed-per-gpu`.
_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
_ATTENTION_MLP = [*_ATTENTION, "gate_proj", "up_proj", "down_proj"]
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "seed-per-gpu": {
        "T4": {"lora.r": 8, "lora.alpha": 16, "train.batch_size": 1, "lora.target_modules": _ATTENTION},
        "L4": {"lora.r": 16, "lora.alpha": 32, "train.batch_size": 2, "lora.target_modules": _ATTENTION},
        "A100-40G": {"lora.r": 32, "lora.alpha": 64, "train.batch_size": 4,
                     "lora.target_modules": _ATTENTION_MLP},
        "A100-80G": {"lora.r": 32, "lora.alpha": 64, "train.batch_size": 4,
                     "lora.target_modules": _ATTENTION_MLP},
        "H100": {"lora.r": 64, "lora.alpha": 128, "train.batch_size": 8, "lora.target_modules": "all-linear"},
    },
}


def preset_overrides(
    preset: Any, gpu: str | None, extra: dict[str, GpuProfile] | None = None
) -> dict[str, Any]:
    """The dotted overrides `preset` gives a cell on `gpu` ({} without a preset).

    Aliases resolve first, so `gpu: A100` gets the A100-40G entry.
    """
    if preset is None:
        return {}
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError([problem("preset", preset, "is not a known preset",
                                   f"use one of {', '.join(PRESETS)}")])
    table = PRESETS[preset]
    if gpu is None:
        raise ConfigError([problem("gpu", None, f"must be set when `preset: {preset}` is used",
                                   f"give each cell one of {', '.join(table)}")])
    try:
        name = get_profile(gpu, extra).name
    except ConfigError:
        name = gpu  # the unknown gpu is reported by the grid's own check
    if name not in table:
        raise ConfigError([problem("gpu", gpu, f"has no entry in preset {preset}",
                                   f"use one of {', '.join(table)}, or drop the preset")])
    return {k: list(v) if isinstance(v, list) else v for k, v in table[name].items()}
