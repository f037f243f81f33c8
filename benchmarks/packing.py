"""Less padding, more tokens (issue 11 item 4): padded, length-grouped, packed batches, skewed lengths.

    .venv/bin/python benchmarks/packing.py [--epochs 2] [--repeat 3] [--packed-batch-size 1]
    .venv/bin/python benchmarks/packing.py --model wide [--factor 4]   # results/packing_wide.json
    .venv/bin/python benchmarks/packing.py --model wide --factor 8 --variants padding_free  # ..._wide_x8.json

The data: the shipped generator's rows (experiments/data/make_fin_sentiment.py, the same
400 rows as fin_sentiment.jsonl), each headline preceded by a skewed number of the
generator's corpus sentences as context (log-normal count, median 1, up to 24: most rows
short, a few near 512 tokens), so a padded batch of 4 is mostly padding. Answers and
instructions are unchanged.

The runs: qlora-ray's `worker.run_experiment` on the quickstart's `qlora-nf4` recipe at
`max_seq_len` 512, `--epochs` epochs, one thread, in a fresh process each:
- `padded`: the default, random batches of 4, each padded to its longest row;
- `grouped`: `train.group_by_length: true`, batches of 4 rows of similar length
  (transformers' LengthGroupedSampler): the same examples in the same number of optimizer
  steps, only less padding;
- `padding_free`: `train.padding_free: true`, the padded run's own random batches of 4,
  each laid end to end in one row without padding (positions restarting per example,
  attention kept inside each): the same examples in the same batches and steps, no padding;
- `packed`: `dataset.packing: true`, whole examples laid end to end into 512-token rows
  (positions restarting per example, attention kept inside each), `--packed-batch-size`
  of those per step (default 1: about 7 examples, the nearest packing gets to the padded
  run's 4 per step; the step count is in the results);
- `packed_steps`: packed the same way, but for as many optimizer steps as the padded run
  (`train.max_steps`), so each step carries ~7 examples against 4 and the run sees more
  epochs of the data in about the padded run's time: packing as used to train on more
  tokens per GPU-hour, where `packed` is packing at equal epochs (fewer, fuller steps).
The order rotates every repeat.

The model: `builtin` (default), the built-in tiny Llama (hidden size 128); or `wide`, the
same model widened `--factor` times by benchmarks/wide_model.py (it computes the same
function, so it has learned what the tiny one has, but each token costs ~16x the matmul
work, as on a real model where per-token work dominates a step).

Where the time goes: each run also counts the CPU seconds spent inside the Trainer's
`training_step` (forward and backward) and the tokens it computed on (padding included);
a least-squares fit over every run of CPU = a x steps + b x computed tokens splits a
cell's training time into a fixed cost per optimizer step (`a`: the optimizer, gradient
clipping, per-module work that does not grow with the batch) and a cost per computed
token (`b`), and gives the speedup each variant would have with no fixed cost.

All but `packed_steps` train on the same examples the same number of epochs, so the same
real tokens (checked); the speed figure of a variant is the median per repeat of real tokens per CPU
second against the padded run of the same repeat (the CPU seconds of `trainer.train()`;
with one thread that is tokens/s on an idle machine, and the load on the shared machine
does not stretch it). Quality, with the same ruler for all: the rows' eval loss (per
answer token), accuracy and similarity on the same 64 held-out rows (eval is never
packed or grouped), medians. Target: the fastest variant whose quality holds (eval loss no
more than 0.02 above padded, accuracy no more than 0.03 below: one or two of the 64 eval
rows) is >= 1.5x.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _result import report
from vs_plain import WORKER, last_json

# WORKER plus the CPU seconds and computed tokens (padding included) of every training step.
STEP_PROBE = """
import resource as _r
from transformers import Trainer as _T
_ts, _probe = _T.training_step, {"cpu": 0.0, "tokens": 0}
def _step(self, model, inputs, *args, **kwargs):
    r0 = _r.getrusage(_r.RUSAGE_SELF)
    try:
        return _ts(self, model, inputs, *args, **kwargs)
    finally:
        r1 = _r.getrusage(_r.RUSAGE_SELF)
        _probe["cpu"] += r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        _probe["tokens"] += int(inputs["input_ids"].numel())
_T.training_step = _step
"""
_OUT = "print(json.dumps({"
assert _OUT in WORKER, "vs_plain.WORKER changed: update packing.PROBED_WORKER"
PROBED_WORKER = STEP_PROBE + WORKER.replace(
    _OUT, _OUT + '"step_cpu_seconds": _probe["cpu"], "computed_tokens": _probe["tokens"], ')

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.5
LOSS_TOLERANCE = 0.02
ACCURACY_TOLERANCE = 0.03


def skewed_rows(seed: int = 0) -> list[dict[str, str]]:
    sys.path.insert(0, str(ROOT / "experiments" / "data"))
    from make_fin_sentiment import make_corpus, make_rows

    rng = random.Random(seed)
    corpus = make_corpus()
    rows = []
    for row in make_rows():
        k = min(int(rng.lognormvariate(0.0, 1.3)), 24)
        context = " ".join(rng.sample(corpus, k))
        rows.append({**row, "input": f"{context} Headline: {row['input']}" if k else row["input"]})
    return rows


VARIANTS = ("padded", "grouped", "padding_free", "packed", "packed_steps")
SAME_TOKENS = ("padded", "grouped", "padding_free", "packed")  # same examples, same epochs
PADDED_BATCH = 4
EVAL_ROWS = 64  # held out of the 400, never grouped or packed


def spec(data: Path, epochs: int, variant: str, train_rows: int | None = None,
         eval_rows: int | None = None, packed_batch_size: int = 1, model: str = "builtin:tiny-llama",
         padded_steps: int | None = None) -> dict:
    packing = variant in ("packed", "packed_steps")
    return {
        "name": "packing",
        "base": {
            "model": model,
            "dataset": {"path": str(data), "eval_size": EVAL_ROWS, "packing": packing,
                        "max_train_samples": train_rows},
            "quant": {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
            "train": {"epochs": epochs, "batch_size": packed_batch_size if packing else PADDED_BATCH,
                      "max_steps": padded_steps if variant == "packed_steps" else None,
                      "group_by_length": variant == "grouped", "padding_free": variant == "padding_free",
                      "grad_accum": 1, "learning_rate": 2.0e-3,
                      "max_grad_norm": 1.0, "max_seq_len": 512, "optim": "paged_adamw_8bit",
                      "gradient_checkpointing": True},
            "eval": {"max_new_tokens": 16, "before": False, "max_samples": eval_rows},
        },
    }


def run(spec_path: Path) -> dict:
    return last_json([sys.executable, "-c", PROBED_WORKER, str(spec_path)])


def rate(got: dict, label: str, clock: str) -> float:
    """Real training tokens per second of `clock` (cpu_seconds or seconds) of one run."""
    return got[label]["tokens"] / got[label][clock]


def step_cost_fit(runs: list[dict]) -> tuple[float, float]:
    """Least squares of CPU = a x steps + b x computed tokens over the runs: (a, b) in seconds."""
    sxx = sum(r["steps"] ** 2 for r in runs)
    syy = sum(r["computed_tokens"] ** 2 for r in runs)
    sxy = sum(r["steps"] * r["computed_tokens"] for r in runs)
    sxc = sum(r["steps"] * r["cpu_seconds"] for r in runs)
    syc = sum(r["computed_tokens"] * r["cpu_seconds"] for r in runs)
    det = sxx * syy - sxy ** 2
    if det == 0:  # every run the same steps and tokens: nothing to split
        return float("nan"), float("nan")
    return (sxc * syy - syc * sxy) / det, (syc * sxx - sxc * sxy) / det


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--packed-batch-size", type=int, default=1, help="packed 512-token rows per step")
    ap.add_argument("--train-rows", type=int, default=None, help="cap on training rows (smoke tests)")
    ap.add_argument("--eval-rows", type=int, default=None, help="cap on eval rows (smoke tests)")
    ap.add_argument("--model", choices=("builtin", "wide"), default="builtin",
                    help="the built-in tiny Llama, or it widened --factor times (benchmarks/wide_model.py)")
    ap.add_argument("--factor", type=int, default=4, help="widening factor of --model wide")
    ap.add_argument("--variants", default=",".join(VARIANTS[1:]),
                    help="comma-separated variants to compare with padded (smoke tests run fewer)")
    args = ap.parse_args()
    variants = ("padded", *[v for v in VARIANTS[1:] if v in args.variants.split(",")])
    if len(variants) == 1 or set(args.variants.split(",")) - set(VARIANTS[1:]):
        ap.error(f"--variants: a comma-separated subset of {','.join(VARIANTS[1:])}")

    repeats = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "fin_sentiment_skewed.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in skewed_rows()))
        model = "builtin:tiny-llama"
        if args.model == "wide":
            from wide_model import build

            model = str(build(Path(tmp) / f"tiny-llama-x{args.factor}", args.factor))
        n_train = min(len(skewed_rows()) - EVAL_ROWS, args.train_rows or len(skewed_rows()))
        padded_steps = -(-n_train // PADDED_BATCH) * args.epochs  # checked against the run below
        paths = {}
        for label in variants:
            paths[label] = Path(tmp) / f"{label}.yaml"
            paths[label].write_text(yaml.safe_dump(
                spec(data, args.epochs, label, args.train_rows, args.eval_rows, args.packed_batch_size,
                     model, padded_steps),
                sort_keys=False))
        for i in range(args.repeat):
            k = i % len(variants)
            order = variants[k:] + variants[:k]  # a different variant first each repeat
            got = {label: run(paths[label]) for label in order}
            tokens = {label: got[label]["tokens"] for label in variants if label in SAME_TOKENS}
            if len(set(tokens.values())) != 1:
                raise SystemExit(f"the variants trained on different real token counts: {tokens}")
            steps = {label: got[label]["steps"] for label in ("padded", "packed_steps") if label in got}
            if steps.get("packed_steps", padded_steps) != padded_steps or steps["padded"] != padded_steps:
                raise SystemExit(f"expected {padded_steps} steps in padded and packed_steps, got {steps}")

            got["speedup_cpu"] = {label: rate(got, label, "cpu_seconds") / rate(got, "padded", "cpu_seconds")
                                  for label in variants[1:]}
            got["speedup_wall"] = {label: rate(got, label, "seconds") / rate(got, "padded", "seconds")
                                   for label in variants[1:]}
            repeats.append(got)
            print(f"repeat {i + 1}: " + ", ".join(f"{k} {v:.2f}x (CPU), {got['speedup_wall'][k]:.2f}x (wall)"
                                                  for k, v in got["speedup_cpu"].items()),
                  file=sys.stderr, flush=True)

    def med(label: str, key: str) -> float | None:
        values = [r[label][key] for r in repeats if r[label].get(key) is not None]
        return round(statistics.median(values), 4) if values else None

    quality = {label: {k: med(label, k) for k in ("eval_loss", "accuracy", "similarity_score", "steps")}
               for label in variants}
    speedup = {label: round(statistics.median(r["speedup_cpu"][label] for r in repeats), 3)
               for label in variants[1:]}
    holds = {}
    for label in variants[1:]:
        loss_ok = quality[label]["eval_loss"] <= quality["padded"]["eval_loss"] + LOSS_TOLERANCE
        acc_ok = ((quality[label]["accuracy"] or 0)
                  >= (quality["padded"]["accuracy"] or 0) - ACCURACY_TOLERANCE)
        holds[label] = {"eval_loss_ok": loss_ok, "accuracy_ok": acc_ok}
    runs = [r[label] for r in repeats for label in variants]
    fixed, per_token = step_cost_fit(runs)

    def per_step(label: str) -> dict[str, float]:
        one = [r[label] for r in repeats]
        steps = one[0]["steps"]
        return {
            "cpu_ms": round(1e3 * statistics.median(x["cpu_seconds"] for x in one) / steps, 2),
            "forward_backward_ms": round(
                1e3 * statistics.median(x["step_cpu_seconds"] for x in one) / steps, 2),
            "outside_forward_backward_ms": round(1e3 * statistics.median(
                x["cpu_seconds"] - x["step_cpu_seconds"] for x in one) / steps, 2),
            "computed_tokens": round(one[0]["computed_tokens"] / steps, 1),
            "fixed_share": round(fixed * steps / statistics.median(x["cpu_seconds"] for x in one), 3),
        }

    def no_fixed_cost(label: str) -> float:  # computed tokens per real token, padded over label
        def per_real(x: dict) -> float:
            return x["computed_tokens"] / x["tokens"]

        return round(per_real(repeats[0]["padded"]) / per_real(repeats[0][label]), 3)

    good = [label for label in variants[1:] if all(holds[label].values())]
    best = max(good, key=speedup.__getitem__) if good else max(speedup, key=speedup.__getitem__)
    return report(
        {"builtin": "packing", "wide": "packing_wide"}[args.model]
        + (f"_x{args.factor}" if args.model == "wide" and args.factor != 4 else ""), speedup[best],
        f"{best} / padded, real training tokens per CPU second",
        f">= {TARGET}x for a variant with eval loss <= padded + {LOSS_TOLERANCE} and accuracy >= "
        f"padded - {ACCURACY_TOLERANCE}", best in good and speedup[best] >= TARGET,
        best=best, speedup_cpu=speedup,
        speedup_cpu_runs={label: [round(r["speedup_cpu"][label], 3) for r in repeats]
                          for label in variants[1:]},
        speedup_wall_median={label: round(statistics.median(r["speedup_wall"][label] for r in repeats), 3)
                             for label in variants[1:]},
        quality=quality, quality_holds=holds, epochs=args.epochs, repeats=args.repeat,
        packed_batch_size=args.packed_batch_size, real_tokens=repeats[0]["padded"]["tokens"],
        model=args.model, factor=args.factor if args.model == "wide" else None,
        step_cost_fit={"fixed_ms_per_step": round(fixed * 1e3, 2),
                       "us_per_computed_token": round(per_token * 1e6, 2)},
        per_step={label: per_step(label) for label in variants},
        speedup_without_fixed_cost={label: no_fixed_cost(label) for label in variants[1:]},
        runs=repeats,
    )


if __name__ == "__main__":
    sys.exit(main())
