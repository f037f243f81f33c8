"""Less padding, more tokens (issue 11 item 4): packed against padded batches on length-skewed data.

    .venv/bin/python benchmarks/packing.py [--epochs 2] [--repeat 3]

The data: the shipped generator's rows (experiments/data/make_fin_sentiment.py, the same
400 rows as fin_sentiment.jsonl), each headline preceded by a skewed number of the
generator's corpus sentences as context (log-normal count, median 1, up to 24: most rows
short, a few near 512 tokens), so a padded batch of 4 is mostly padding. Answers and
instructions are unchanged.

The runs: qlora-ray's `worker.run_experiment` on the quickstart's `qlora-nf4` recipe at
`max_seq_len` 512, `--epochs` epochs, one thread, in a fresh process each: the default
(each batch padded to its longest row) and `dataset.packing: true` (whole examples laid
end to end, positions restarting per example, attention kept inside each). Alternating
which goes first, `--repeat` pairs.

Both train on the same examples the same number of epochs, so the same real tokens; the
speed figure is the median per pair of real tokens per CPU second, packed / padded (the
CPU seconds of `trainer.train()`; with one thread that is tokens/s on an idle machine,
and the load on the shared one does not stretch it). Quality: the rows' eval loss,
accuracy and similarity on the same held-out rows (eval is never packed), medians.
Target: >= 1.5x with eval quality at least equal (eval loss no more than 0.02 higher,
accuracy no more than 0.03 lower: one or two of the 64 eval rows).
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


def spec(data: Path, epochs: int, packing: bool, train_rows: int | None = None,
         eval_rows: int | None = None) -> dict:
    return {
        "name": "packing",
        "base": {
            "model": "builtin:tiny-llama",
            "dataset": {"path": str(data), "eval_size": 64, "packing": packing,
                        "max_train_samples": train_rows},
            "quant": {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
            "train": {"epochs": epochs, "batch_size": 4, "grad_accum": 1, "learning_rate": 2.0e-3,
                      "max_grad_norm": 1.0, "max_seq_len": 512, "optim": "paged_adamw_8bit",
                      "gradient_checkpointing": True},
            "eval": {"max_new_tokens": 16, "before": False, "max_samples": eval_rows},
        },
    }


def run(spec_path: Path) -> dict:
    return last_json([sys.executable, "-c", WORKER, str(spec_path)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--train-rows", type=int, default=None, help="cap on training rows (smoke tests)")
    ap.add_argument("--eval-rows", type=int, default=None, help="cap on eval rows (smoke tests)")
    args = ap.parse_args()

    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "fin_sentiment_skewed.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in skewed_rows()))
        paths = {}
        for label, packing in (("padded", False), ("packed", True)):
            paths[label] = Path(tmp) / f"{label}.yaml"
            paths[label].write_text(yaml.safe_dump(
                spec(data, args.epochs, packing, args.train_rows, args.eval_rows), sort_keys=False))
        for i in range(args.repeat):
            order = ("padded", "packed") if i % 2 == 0 else ("packed", "padded")
            got = {label: run(paths[label]) for label in order}
            # The same examples and epochs: the padded run's non-padding count is the real
            # tokens of both (the packed run's count includes its few pad tokens).
            got["speedup_cpu"] = got["padded"]["cpu_seconds"] / got["packed"]["cpu_seconds"]
            got["speedup_wall"] = got["padded"]["seconds"] / got["packed"]["seconds"]
            pairs.append(got)
            print(f"pair {i + 1}: packed {got['speedup_cpu']:.2f}x (CPU), {got['speedup_wall']:.2f}x (wall)",
                  file=sys.stderr, flush=True)

    def med(label: str, key: str) -> float | None:
        values = [p[label][key] for p in pairs if p[label].get(key) is not None]
        return round(statistics.median(values), 4) if values else None

    value = statistics.median(p["speedup_cpu"] for p in pairs)
    quality = {label: {k: med(label, k) for k in ("eval_loss", "accuracy", "similarity_score", "steps")}
               for label in ("padded", "packed")}
    loss_ok = quality["packed"]["eval_loss"] <= quality["padded"]["eval_loss"] + LOSS_TOLERANCE
    acc_ok = (quality["packed"]["accuracy"] or 0) >= (quality["padded"]["accuracy"] or 0) - ACCURACY_TOLERANCE
    padded_tokens = pairs[0]["padded"]["tokens"]
    return report(
        "packing", round(value, 3), "packed / padded, real training tokens per CPU second",
        f">= {TARGET}x, eval loss <= padded + {LOSS_TOLERANCE}, accuracy >= padded - {ACCURACY_TOLERANCE}",
        value >= TARGET and loss_ok and acc_ok,
        epochs=args.epochs, repeats=args.repeat, real_tokens=padded_tokens,
        speedup_cpu_runs=[round(p["speedup_cpu"], 3) for p in pairs],
        speedup_wall_median=round(statistics.median(p["speedup_wall"] for p in pairs), 3),
        quality=quality, eval_loss_ok=loss_ok, accuracy_ok=acc_ok,
        length_grouped_batching="not measured: not implemented (see docs/performance.md)",
        runs=pairs,
    )


if __name__ == "__main__":
    sys.exit(main())
