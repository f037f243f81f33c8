"""Generate docs/config.md (the field reference) from the config dataclasses' help texts.

    python -m qlora_ray.docs_gen > docs/config.md

A test keeps the committed file in step with the code.
"""

from __future__ import annotations

from qlora_ray.config import describe_fields


def config_reference() -> str:
    lines = [
        "# Experiment config reference",
        "",
        "Every key a spec's `base`, `grid`, `paired` and `runs` entries can set, with its default.",
        "Generated from the help texts in `qlora_ray/config.py` by `python -m qlora_ray.docs_gen`;",
        "do not edit by hand.",
        "",
        "| key | default | meaning |",
        "| --- | --- | --- |",
    ]
    for key, default, help_text in describe_fields():
        cells = [key, default.replace("\n", "\\n"), help_text]
        key_s, default_s, help_s = (c.replace("|", "\\|") for c in cells)
        lines.append(f"| `{key_s}` | `{default_s}` | {help_s} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")
