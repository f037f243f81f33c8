"""`qlora-ray plan | run | report | doctor`: thin commands.

Each verb's options and body live in the module that owns the work (`planner`,
`scheduler`, `report`), imported only when that verb runs, so `qlora-ray --help` never
pays for torch or Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qlora_ray.config import ConfigError

# verb -> (module, one-line help)
VERBS = {
    "plan": ("qlora_ray.planner", "Expand a spec, predict each cell's peak memory, check it fits."),
    "run": ("qlora_ray.scheduler", "Run every cell of a spec on Ray; one Parquet row per cell."),
    "report": ("qlora_ray.report", "Comparison table and plots from a results folder."),
    "doctor": ("qlora_ray.doctor", "Check in seconds what a grid needs: machine, cluster, spec, results."),
    "calibrate": ("qlora_ray.calibrate", "Learn memory corrections from rows run on GPUs (--corrections)."),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `only` the options of that one verb (the others bare).

    A verb's options live in its module, and importing a module costs its imports
    (`run`'s pulls in pyarrow, ~0.2 s), so `qlora-ray --help` and `qlora-ray plan ...` import
    only what the verb typed needs.
    """
    parser = argparse.ArgumentParser(
        prog="qlora-ray",
        description="Grids of QLoRA fine-tuning experiments on Ray.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="{" + ",".join(VERBS) + "}")
    for verb, (module, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        if only is None or verb == only:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The verb is the first word (the top level has no options but --help), so a command
    # line without a known verb needs no verb's options: argparse prints help or the error.
    verb = argv[0] if argv and argv[0] in VERBS else ""
    args = build_parser(only=verb).parse_args(argv)
    module = importlib.import_module(VERBS[args.verb][0])
    try:
        return int(module.main(args) or 0)
    except ConfigError as e:
        print(f"qlora-ray {args.verb}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
