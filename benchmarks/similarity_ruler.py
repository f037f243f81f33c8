"""How much the `embedder: self` ruler differs across quantizations of the same base model.

    .venv/bin/python benchmarks/similarity_ruler.py [--pairs 64] [--threads 2]

With `eval.similarity.embedder: self` a cell embeds with its own base model (adapter off),
so its before and after scores share one ruler. Cells of different quantizations embed
with differently quantized copies of that base model, though. This loads the built-in
model in fp32, bf16 and 4-bit NF4 (double quantization, fp32 compute), scores the same
text pairs with each (answers of the shipped data against answers of other rows), and
prints one JSON object: each ruler's mean score, and the largest per-pair and the mean
difference between any two rulers. The README and the report quote the result; a fixed
embedder (a model path) has no such difference.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "experiments" / "data" / "fin_sentiment.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import torch

    from qlora_ray import evaluate as ev
    from qlora_ray.config import ExperimentConfig, from_dict
    from qlora_ray.device import resolve_device
    from qlora_ray.modeling import load

    torch.set_num_threads(args.threads)
    answers = [json.loads(line)["output"] for line in DATA.read_text().splitlines()]
    rng = random.Random(0)
    left = rng.sample(answers, args.pairs)
    right = rng.sample(answers, args.pairs)  # mostly unrelated answers: scores spread out

    class NoCuda:
        @staticmethod
        def is_available() -> bool:
            return False

    rulers = {"fp32": (16, "float32"), "bf16": (16, "bfloat16"), "nf4": (4, "float32")}
    scores = {}
    for name, (bits, dtype) in rulers.items():
        cfg = from_dict(ExperimentConfig, {"quant": {"bits": bits, "compute_dtype": dtype}})
        loaded = load(cfg, resolve_device(cfg, NoCuda), dtype)
        loaded.model.eval()
        embedder = ev.Embedder("self", "cpu")
        scores[name] = ev.cosine_distances(embedder(loaded.model, loaded.tokenizer, left, 16),
                                           embedder(loaded.model, loaded.tokenizer, right, 16))
    diffs = {f"{a} vs {b}": {"max_pair": float(np.abs(scores[a] - scores[b]).max()),
                             "mean_score": float(abs(scores[a].mean() - scores[b].mean()))}
             for a, b in itertools.combinations(rulers, 2)}
    print(json.dumps({"pairs": args.pairs, "mean_score": {k: float(v.mean()) for k, v in scores.items()},
                      "differences": diffs}, indent=2))


if __name__ == "__main__":
    main()
