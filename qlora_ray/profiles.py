"""GPU profiles: how much memory a card gives a process, what it supports, how Ray names it.

Pure data. `total_mib` is what `nvidia-smi` reports as the card's memory (a little less
than the marketing size); the planner subtracts the CUDA context itself.

`ray_accelerator_type` is the label Ray auto-detects from the device name (see
`ray/_private/accelerators/nvidia_gpu.py`): a node with that card advertises the resource
`accelerator_type:<label>`. Ray cannot tell an A100 40 GB from an 80 GB one (both are
`A100`), so the sized profiles use their own labels, `A100-40G` / `A100-80G`, which a
node only has when it is started with `--resources='{"accelerator_type:A100-40G": 1}'`
(the shipped `ray_cluster.yaml` does this for its A100 node types).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora_ray.config import ConfigError, problem


@dataclass(frozen=True)
class GpuProfile:
    name: str
    total_mib: int = field(metadata={"help": "Card memory as nvidia-smi reports it, in MiB."})
    bf16: bool = field(metadata={"help": "Native bfloat16 (compute capability >= 8.0)."})
    flash_attention: bool = field(metadata={"help": "FlashAttention-2 kernels (Ampere or newer)."})
    ray_accelerator_type: str | None = field(
        metadata={"help": "Ray resource label: the task asks for `accelerator_type:<this>`."}
    )
    compute_capability: str = "0.0"

    @property
    def total_bytes(self) -> int:
        return self.total_mib * 1024 * 1024

    @property
    def is_gpu(self) -> bool:
        return self.name != "cpu"


def _p(name: str, mib: int, cc: str, ray_type: str | None) -> GpuProfile:
    major = int(cc.split(".")[0])
    return GpuProfile(name, mib, bf16=major >= 8, flash_attention=major >= 8,
                      ray_accelerator_type=ray_type, compute_capability=cc)


BUILTIN_PROFILES: dict[str, GpuProfile] = {
    p.name: p
    for p in [
        _p("T4", 15360, "7.5", "T4"),
        _p("V100-16G", 16384, "7.0", "V100"),
        _p("V100-32G", 32768, "7.0", "V100"),
        _p("A10G", 23028, "8.6", "A10G"),
        _p("L4", 23034, "8.9", "L4"),
        _p("RTX-A4000", 16376, "8.6", "RTX-A4000"),
        _p("RTX-A5000", 24564, "8.6", "RTX-A5000"),
        _p("RTX-A6000", 49140, "8.6", "RTX-A6000"),
        _p("L40S", 46068, "8.9", "L40S"),
        _p("A100-40G", 40960, "8.0", "A100-40G"),
        _p("A100-80G", 81920, "8.0", "A100-80G"),
        _p("H100", 81559, "9.0", "H100"),
        _p("H200", 143771, "9.0", "H200"),
        # The CPU "profile" has no card; the planner reports predictions without a limit.
        GpuProfile("cpu", 0, bf16=True, flash_attention=False, ray_accelerator_type=None),
    ]
}

# Names people type for the same card.
ALIASES = {
    "V100": "V100-16G", "A100": "A100-40G", "A4000": "RTX-A4000", "A5000": "RTX-A5000",
    "A6000": "RTX-A6000", "H100-80G": "H100",
}


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


def resolve_compute_dtype(requested: str, profile: GpuProfile | None) -> str:
    """`auto` becomes bfloat16 where the card has it, float16 otherwise."""
    if requested != "auto":
        return requested
    if profile is None or profile.bf16:
        return "bfloat16"
    return "float16"
