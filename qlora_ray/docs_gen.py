"""Generate docs/config.md (the field reference) from the config dataclasses' help texts.

    python -m qlora_ray.docs_gen > docs/config.md

A test keeps the committed file in step with the code.
"""

from __future__ import annotations

from qlora_ray.config import describe_fields
from qlora_ray.profiles import GpuProfile


def config_reference() -> str:
    lines = [
        "# Experiment config reference",
        "",
        "Every key a spec's `base`, `grid`, `paired` and `runs` entries can set, with its default.",
        "Generated from the help texts in `qlora_ray/config.py` and `qlora_ray/profiles.py` by",
        "`python -m qlora_ray.docs_gen`; do not edit by hand.",
        "",
        "| key | default | meaning |",
        "| --- | --- | --- |",
    ]
    lines += _table(describe_fields())
    lines += [
        "",
        "## GPU profiles (`profiles:`)",
        "",
        "Each entry of a spec's `profiles:` mapping (`profiles: {MyCard: {total_mib: 24576}}`) adds a",
        "card or changes a built-in one: keys not given keep the built-in's values. Defaults below",
        "are a new card's; docs/memory.md lists the built-in cards.",
        "",
        "| key | default | meaning |",
        "| --- | --- | --- |",
    ]
    lines += _table([row for row in describe_fields(GpuProfile, "profiles.<name>.")
                     if row[0] != "profiles.<name>.name"])
    return "\n".join(lines) + "\n"


def _table(rows: list[tuple[str, str, str]]) -> list[str]:
    out = []
    for key, default, help_text in rows:
        cells = [key, default.replace("\n", "\\n"), help_text]
        key_s, default_s, help_s = (c.replace("|", "\\|") for c in cells)
        out.append(f"| `{key_s}` | `{default_s}` | {help_s} |")
    return out


if __name__ == "__main__":
    print(config_reference(), end="")
