"""The memory estimator against the memory harness, point by point (issue 9).

    .venv/bin/python benchmarks/memory_harness.py run [--only NAME ...]   # measure (slow)
    .venv/bin/python benchmarks/memory_harness.py table [--markdown]       # compare (instant)

`run` measures every sweep point not yet in `benchmarks/memory_harness_results.jsonl`:
qlora-ray's real training step (and eval pass, where a point asks for it) on the CPU with
real bitsandbytes layers, at the model's real width with 1 and with 2 decoder layers, each
in a fresh process (`qlora_ray.memory_harness.measure_isolated`). A point takes 2-15
minutes on 2 cores; the whole sweep a few hours, at up to ~8 GiB RSS. Results are
appended as they come, so an interrupted run resumes.

`table` extrapolates each measurement to the model's full depth (the 1-layer figure plus
`layers - 1` times the difference the second layer made) and compares it with
`qlora_ray.memory.estimate` for the same cell, computed for the harness's CPU run
(`Recipe(device="cpu")`, tensors only: no CUDA context or allocator slack). It prints the
error of every point and the mean and worst absolute error; `--markdown` prints the table
docs/memory.md carries. tests/test_memory.py checks the same bound on the stored results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_ray.config import ExperimentConfig, from_dict, set_dotted  # noqa: E402

RESULTS = ROOT / "benchmarks" / "memory_harness_results.jsonl"
CONFIGS = ROOT / "tests" / "fixtures" / "configs"
LLAMA2 = "meta-llama/Llama-2-7b-hf"
TINYLLAMA = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"

# The cell every point varies from: the seed's 7B QLoRA recipe at 512 tokens.
BASE: dict[str, Any] = {
    "quant.bits": 4, "quant.compute_dtype": "bfloat16", "lora.r": 16, "lora.alpha": 32,
    "lora.dropout": 0.05, "train.batch_size": 1, "train.max_seq_len": 512,
    "train.gradient_checkpointing": True, "train.optim": "paged_adamw_8bit", "eval.batch_size": 4,
    "eval.max_new_tokens": 16,
}

# name -> (model, overrides, padded rows, run the eval pass). Llama-2-7B's width for the
# main axes; TinyLlama-1.1B's (a real model, a quarter of the compute) for the rest and for
# long sequences; one point for each other architecture.
POINTS: dict[str, tuple[str, dict[str, Any], bool, bool]] = {
    "llama2-base": (LLAMA2, {}, False, False),
    "llama2-8bit": (LLAMA2, {"quant.bits": 8}, False, False),
    "llama2-16bit": (LLAMA2, {"quant.bits": 16}, False, False),
    "llama2-no-ckpt": (LLAMA2, {"train.gradient_checkpointing": False}, False, False),
    "llama2-batch4-padded": (LLAMA2, {"train.batch_size": 4}, True, False),
    "llama2-all-linear-r64": (LLAMA2, {"lora.target_modules": "all-linear", "lora.r": 64}, False, False),
    "llama2-seq1024": (LLAMA2, {"train.max_seq_len": 1024}, False, False),
    "mistral": ("mistralai/Mistral-7B-v0.1", {}, False, False),
    "qwen2": ("Qwen/Qwen2.5-7B", {}, False, False),
    "gemma": ("google/gemma-2b", {}, False, False),
    "phi3": ("microsoft/Phi-3-mini-4k-instruct", {}, False, False),
    "llama31": ("meta-llama/Llama-3.1-8B-Instruct", {}, False, False),
    "tinyllama-base": (TINYLLAMA, {}, False, False),
    "tinyllama-8bit-no-ckpt": (TINYLLAMA, {"quant.bits": 8, "train.gradient_checkpointing": False},
                               False, False),
    "tinyllama-16bit-no-ckpt": (TINYLLAMA, {"quant.bits": 16, "train.gradient_checkpointing": False},
                                False, False),
    "tinyllama-no-dq": (TINYLLAMA, {"quant.double_quant": False}, False, False),
    "tinyllama-qv-no-dropout": (TINYLLAMA, {"lora.target_modules": ["q_proj", "v_proj"],
                                            "lora.dropout": 0.0}, False, False),
    "tinyllama-r64-adamw-torch": (TINYLLAMA, {"lora.r": 64, "train.optim": "adamw_torch"}, False, False),
    "tinyllama-r64-bnb8": (TINYLLAMA, {"lora.r": 64, "train.optim": "adamw_bnb_8bit"}, False, False),
    "tinyllama-r64-paged32": (TINYLLAMA, {"lora.r": 64, "train.optim": "paged_adamw_32bit"}, False, False),
    "tinyllama-eager": (TINYLLAMA, {"model.attn_implementation": "eager"}, False, False),
    "tinyllama-accum2": (TINYLLAMA, {"train.grad_accum": 2}, False, False),
    "tinyllama-seq128-batch8": (TINYLLAMA, {"train.max_seq_len": 128, "train.batch_size": 8}, False, False),
    "tinyllama-seq2048": (TINYLLAMA, {"train.max_seq_len": 2048}, False, False),
    "tinyllama-seq2048-batch2-padded": (TINYLLAMA, {"train.max_seq_len": 2048, "train.batch_size": 2},
                                        True, False),
    "tinyllama-seq4096": (TINYLLAMA, {"train.max_seq_len": 4096}, False, False),
    "tinyllama-seq4096-no-ckpt": (TINYLLAMA, {"train.max_seq_len": 4096,
                                              "train.gradient_checkpointing": False}, False, False),
    "tinyllama-seq4096-16bit": (TINYLLAMA, {"train.max_seq_len": 4096, "quant.bits": 16}, False, False),
    # Packed rows: a micro-batch of 4 becomes one row of 4,096 tokens (encoding.PadCollator),
    # with a block-diagonal mask over all of it.
    "tinyllama-seq1024-batch4-packed-eager": (TINYLLAMA, {
        "train.max_seq_len": 1024, "train.batch_size": 4, "dataset.packing": True,
        "model.attn_implementation": "eager"}, False, False),
    "tinyllama-seq1024-batch4-packed-no-ckpt": (TINYLLAMA, {
        "train.max_seq_len": 1024, "train.batch_size": 4, "dataset.packing": True,
        "train.gradient_checkpointing": False}, False, False),
    # The eval pass (evaluate.evaluate: generation, similarity embedding, eval loss) after training.
    "llama2-eval": (LLAMA2, {}, False, True),
    "tinyllama-eval-batch16-seq1024": (TINYLLAMA, {"eval.batch_size": 16, "train.max_seq_len": 1024},
                                       False, True),
    "llama31-eval": ("meta-llama/Llama-3.1-8B-Instruct", {}, False, True),
}


def model_config(model: str) -> dict[str, Any]:
    return json.loads((CONFIGS / model / "config.json").read_text())


def cell(overrides: dict[str, Any]) -> ExperimentConfig:
    data: dict[str, Any] = {"model": {"name": "harness"}}
    for key, value in {**BASE, **overrides}.items():
        set_dotted(data, key, value)
    return from_dict(ExperimentConfig, data)


def load_results(path: Path = RESULTS) -> dict[tuple[str, int], dict[str, Any]]:
    out: dict[tuple[str, int], dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                out[(row["name"], row["layers"])] = row
    return out


def run(only: list[str], cache: str) -> None:
    from qlora_ray.memory_harness import measure_isolated

    Path(cache).mkdir(parents=True, exist_ok=True)
    done = load_results()
    for name, (model, overrides, padded, with_eval) in POINTS.items():
        if only and name not in only:
            continue
        for layers in (1, 2):
            if (name, layers) in done:
                continue
            t0 = time.perf_counter()
            m = measure_isolated(model_config(model), cell(overrides), layers=layers, padded=padded,
                                 run_eval=with_eval, model_cache=cache)
            row = {"name": name, "layers": layers, "model": model, "overrides": overrides,
                   "padded": padded, "eval": with_eval, "seconds": round(time.perf_counter() - t0, 1),
                   **m.to_json()}
            with RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name} x{layers}: train {m.train_peak_bytes / 2**30:.3f} GiB, "
                  f"eval {m.eval_peak_bytes / 2**30:.3f} GiB ({row['seconds']:.0f} s)", flush=True)


def compare(results: dict[tuple[str, int], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Per point, harness against estimate, per moment and at full depth.

    The harness splits each step into the estimator's moments (`loss`: the forward pass
    and the loss's backward; `layer`: the decoder layers' backward); each is extrapolated to
    the model's depth on its own, since the moment that peaks can change with depth.
    """
    from qlora_ray.memory import Recipe, Shape, architecture, estimate
    from qlora_ray.profiles import get_profile

    results = load_results() if results is None else results
    cpu, recipe = get_profile("cpu"), Recipe(device="cpu")
    rows = []
    for name, (model, overrides, padded, with_eval) in POINTS.items():
        one, two = results.get((name, 1)), results.get((name, 2))
        if one is None or two is None:
            continue
        full = model_config(model)
        cfg = cell(overrides)
        s = cfg.train.max_seq_len
        # The harness's eval rows end in an answer of `answer` tokens, and its prompts are the
        # rest of the row (memory_harness.measure); the estimator's `reference` is the
        # answer without its end-of-answer token.
        answer = max(1, min(s // 8, 32))
        shape = Shape(train_seq=s, eval_prompt=s - answer, eval_seq=s, reference=answer - 1,
                      masked=padded or cfg.dataset.packing)
        layers = architecture(full).layers

        def est(depth: int, cfg: ExperimentConfig = cfg, full: dict[str, Any] = full,
                shape: Shape = shape) -> Any:
            return estimate(architecture({**full, "num_hidden_layers": depth}), cfg, cpu, shape=shape,
                            recipe=recipe)

        def extrapolate(key: str, one: dict[str, Any] = one, two: dict[str, Any] = two,
                        layers: int = layers) -> float:
            return one[key] + (layers - 1) * (two[key] - one[key])

        e1, e2, ef = est(1), est(2), est(layers)
        row: dict[str, Any] = {"name": name, "model": model, "layers": layers}
        for moment, key, predicted in (
            ("loss", "loss_peak_bytes", lambda e: max(e.moment_tensors["forward"], e.moment_tensors["loss"])),
            ("layer", "layer_peak_bytes", lambda e: e.moment_tensors["layer"]),
        ):
            row[f"{moment}_errors"] = [predicted(e) / m[key] - 1 for e, m in ((e1, one), (e2, two))]
            row[f"harness_{moment}"] = extrapolate(key)
            row[f"estimate_{moment}"] = predicted(ef)
        train = max(row["harness_loss"], row["harness_layer"])
        row.update(harness_train=train, estimate_train=ef.train_bytes, train_error=ef.train_bytes / train - 1,
                   moment=ef.train_moment)
        if with_eval:
            # Compared at 1 and 2 layers, not extrapolated: the eval keeps a fixed number of
            # residual-stream tensors alive whatever the depth (the embeddings, the layer's
            # input, its attention output), which a per-layer extrapolation would multiply.
            row["eval_errors"] = [e.eval_bytes / m["eval_peak_bytes"] - 1 for e, m in ((e1, one), (e2, two))]
            row.update(harness_eval=two["eval_peak_bytes"], estimate_eval=e2.eval_bytes,
                       eval_moment=e2.eval_moment)
        rows.append(row)
    return rows


def errors(row: dict[str, Any]) -> list[float]:
    """Every comparison one point makes: each moment at 1 and 2 layers, full depth, eval."""
    out = [*row["loss_errors"], *row["layer_errors"], row["train_error"]]
    return out + row.get("eval_errors", [])


def table(markdown: bool) -> None:
    rows = compare()
    if not rows:
        print("no results yet: run `benchmarks/memory_harness.py run` first")
        return
    every = [abs(e) for r in rows for e in errors(r)]
    header = ["point", "model (layers)", "harness GiB", "estimate GiB", "error", "peak",
              "loss moment at 1 / 2 layers", "layer moment at 1 / 2 layers"]
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for r in rows:
        cells = [r["name"], f"{r['model'].split('/')[-1]} ({r['layers']})",
                 f"{r['harness_train'] / 2**30:.2f}", f"{r['estimate_train'] / 2**30:.2f}",
                 f"{r['train_error']:+.1%}", r["moment"],
                 " / ".join(f"{e:+.1%}" for e in r["loss_errors"]),
                 " / ".join(f"{e:+.1%}" for e in r["layer_errors"])]
        if "eval_errors" in r:
            cells[5] += (f"; eval ({r['eval_moment']}) at 1 / 2 layers "
                         + " / ".join(f"{e:+.1%}" for e in r["eval_errors"]))
        print("| " + " | ".join(cells) + " |" if markdown else "  ".join(f"{c:>14}" for c in cells))
    full = [abs(r["train_error"]) for r in rows]
    print(f"\n{len(rows)} points, {len(every)} comparisons: mean |error| {sum(every) / len(every):.1%}, "
          f"worst {max(every):.1%}; at full depth mean {sum(full) / len(full):.1%}, worst {max(full):.1%}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure the points not yet measured (slow)")
    r.add_argument("--only", nargs="*", default=[], help="point names")
    r.add_argument("--model-cache", default="/tmp/qlora-ray-harness-models",
                   help="where the random-weight model folders are kept between points")
    t = sub.add_parser("table", help="compare the estimator with the stored measurements")
    t.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.only, args.model_cache)
    else:
        table(args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
