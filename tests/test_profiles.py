"""GPU profiles: capability rules per card, Ray labels, aliases, spec overrides, presets."""

from __future__ import annotations

import pytest

from qlora_ray.config import ConfigError
from qlora_ray.grid import expand
from qlora_ray.profiles import (
    ALIASES,
    BUILTIN_PROFILES,
    PRESETS,
    capability_problems,
    get_profile,
    preset_overrides,
    resolve_compute_dtype,
)

# What NVML calls each card (the string Ray parses), and the card's nvidia-smi total.
DEVICE_NAMES = {
    "T4": "Tesla T4",
    "V100-16G": "Tesla V100-SXM2-16GB",
    "V100-32G": "Tesla V100-SXM2-32GB",
    "A10G": "NVIDIA A10G",
    "L4": "NVIDIA L4",
    "RTX-A4000": "NVIDIA RTX A4000",
    "RTX-A5000": "NVIDIA RTX A5000",
    "RTX-A6000": "NVIDIA RTX A6000",
    "L40S": "NVIDIA L40S",
    "A100-40G": "NVIDIA A100-SXM4-40GB",
    "A100-80G": "NVIDIA A100-SXM4-80GB",
    "H100": "NVIDIA H100 80GB HBM3",
    "H200": "NVIDIA H200",
}
GPUS = sorted(DEVICE_NAMES)
NO_BF16 = {"T4", "V100-16G", "V100-32G"}


def test_every_issue_card_is_built_in() -> None:
    assert set(BUILTIN_PROFILES) == {*DEVICE_NAMES, "cpu"}


@pytest.mark.parametrize("name", GPUS)
def test_capabilities_follow_compute_capability(name: str) -> None:
    p = get_profile(name)
    ampere = int(p.compute_capability.split(".")[0]) >= 8
    assert p.bf16 is ampere and p.flash_attention is ampere
    assert p.bf16 is (name not in NO_BF16)
    assert p.is_gpu and p.usable_bytes == p.total_bytes >= 15 * 2**30


@pytest.mark.parametrize("name", GPUS)
def test_bf16_and_flash_attention_rules(name: str) -> None:
    p = get_profile(name)
    bf16 = capability_problems(p, "bfloat16", "sdpa")
    fa2 = capability_problems(p, "float16", "flash_attention_2")
    if name in NO_BF16:
        assert len(bf16) == 1 and name in bf16[0] and "quant.compute_dtype" in bf16[0]
        assert len(fa2) == 1 and "model.attn_implementation" in fa2[0]
        assert resolve_compute_dtype("auto", p) == "float16"
    else:
        assert bf16 == [] and fa2 == []
        assert resolve_compute_dtype("auto", p) == "bfloat16"
    # auto is never a problem, and explicit values are kept as asked.
    assert capability_problems(p, "auto", "sdpa") == []
    assert resolve_compute_dtype("float16", p) == "float16"


def test_cpu_profile_has_no_memory_limit_and_takes_bf16() -> None:
    cpu = get_profile("cpu")
    assert not cpu.is_gpu and cpu.ray_accelerator_type is None
    assert resolve_compute_dtype("auto", cpu) == "bfloat16"
    assert capability_problems(None, "bfloat16", "flash_attention_2") == []


@pytest.mark.parametrize("name", GPUS)
def test_ray_label_is_what_ray_detects_on_that_card(name: str) -> None:
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    detected = NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(DEVICE_NAMES[name])
    label = get_profile(name).ray_accelerator_type
    if name in ("A100-40G", "A100-80G", "V100-32G"):
        # Ray names both sizes alike; the sized label is a custom node resource.
        assert detected == name.split("-")[0] and label == name
    else:
        assert label == detected


# What people type, and the card they mean (from the vendors' spec sheets, not profiles.py):
# the plain A100 of AWS's p4d and most clouds has 40 GB, the plain V100 16 GB.
TYPED = {"V100": ("V100-16G", 16), "A100": ("A100-40G", 40), "A4000": ("RTX-A4000", 16),
         "A5000": ("RTX-A5000", 24), "A6000": ("RTX-A6000", 48), "H100-80G": ("H100", 80)}


def test_aliases_and_unknown_names() -> None:
    assert set(ALIASES) == set(TYPED)  # a new alias gets a line above
    for typed, (card, gb) in TYPED.items():
        profile = get_profile(typed)
        assert profile.name == card
        assert profile.total_bytes / 2**30 == pytest.approx(gb, rel=0.05), typed  # "16 GB" is 16 GiB
    with pytest.raises(ConfigError, match="is not a known GPU profile"):
        get_profile("GTX-1080")


def test_spec_profiles_add_and_override() -> None:
    spec = expand({
        "name": "custom",
        "base": {"model": "builtin:tiny-llama"},
        "grid": {"gpu": ["T4", "MyCard"]},
        "profiles": {"T4": {"total_mib": 8000},
                     "MyCard": {"total_mib": 12000, "compute_capability": "8.6", "flash_attention": False}},
    })
    assert get_profile("T4", spec.profiles).total_mib == 8000
    assert get_profile("T4", spec.profiles).bf16 is False  # the rest comes from the built-in
    assert get_profile("MyCard", spec.profiles).bf16 is True


@pytest.mark.parametrize(("written", "ampere"), [(8.9, True), ("8.0", True), (7.5, False)])
def test_a_new_card_takes_bf16_and_flash_attention_from_its_compute_capability(written, ampere) -> None:
    # YAML reads `compute_capability: 8.9` as a number: it is taken as the string it means.
    spec = expand({"name": "custom", "base": {"model": "builtin:tiny-llama", "gpu": "RTX-4090"},
                   "profiles": {"RTX-4090": {"total_mib": 24564, "compute_capability": written}}})
    card = get_profile("RTX-4090", spec.profiles)
    assert card.compute_capability == str(written)
    assert (card.bf16, card.flash_attention) == (ampere, ampere)
    assert card.ray_accelerator_type == "RTX-4090"


def test_seed_preset_values() -> None:
    t4 = preset_overrides("seed-per-gpu", "T4")
    assert t4 == {"lora.r": 8, "lora.alpha": 16, "train.batch_size": 1,
                  "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    assert preset_overrides("seed-per-gpu", "L4")["lora.r"] == 16
    assert preset_overrides("seed-per-gpu", "A100")["train.batch_size"] == 4  # alias -> A100-40G
    assert "gate_proj" in preset_overrides("seed-per-gpu", "A100-80G")["lora.target_modules"]
    assert preset_overrides("seed-per-gpu", "H100")["lora.target_modules"] == "all-linear"
    assert preset_overrides(None, "T4") == {}
    assert set(PRESETS["seed-per-gpu"]) == {"T4", "L4", "A100-40G", "A100-80G", "H100"}


def test_a_spec_references_the_preset_and_axes_still_win() -> None:
    spec = expand({
        "name": "preset",
        "base": {"model": "builtin:tiny-llama", "lora": {"r": 4}},
        "preset": "seed-per-gpu",
        "grid": {"gpu": ["T4", "L4", "H100"]},
        "runs": [{"name": "seed"}, {"name": "wide", "lora.r": 128}],
    })
    by_name = {c.name: c for c in spec.cells}
    assert by_name["seed-T4"].lora.r == 8 and by_name["seed-T4"].train.batch_size == 1
    assert by_name["seed-L4"].lora.alpha == 32
    assert by_name["seed-H100"].lora.target_modules == "all-linear"
    assert by_name["wide-T4"].lora.r == 128 and by_name["wide-T4"].lora.alpha == 16


def test_preset_errors_name_the_gpu_and_the_fix() -> None:
    with pytest.raises(ConfigError) as e:
        expand({"name": "p", "base": {"model": "builtin:tiny-llama"}, "preset": "seed-per-gpu",
                "grid": {"gpu": ["A10G"]}})
    assert "A10G" in str(e.value) and "has no entry in preset" in str(e.value)
    with pytest.raises(ConfigError, match="is not a known preset"):
        expand({"name": "p", "base": {"model": "builtin:tiny-llama", "gpu": "T4"}, "preset": "nope"})
