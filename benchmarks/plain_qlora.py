"""A plain QLoRA fine-tune, written the way the seed notebooks write one: transformers + peft +
bitsandbytes and nothing of qlora-ray's (the baseline of benchmarks/vs_plain.py).

    .venv/bin/python benchmarks/plain_qlora.py --model DIR [--data FILE] [--steps 60]
        [--batch-size 4] [--lr 2e-3] [--r 16] [--alpha 32] [--max-len 128] [--threads 1]

4-bit NF4 with double quantization (bf16 compute), k-bit preparation with gradient
checkpointing, LoRA on every linear layer, `prompt + answer + eos` per row tokenized to
`--max-len`, DataCollatorForLanguageModeling (pads each batch to its longest row), the
Trainer. Prints one JSON line: the non-padding tokens the Trainer saw, the seconds (wall
and CPU) `trainer.train()` took, and tokens per wall second.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# qlora-ray's default prompt (DatasetConfig.prompt_template), so both train on the same text.
TEMPLATE = "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a local model folder (weights and tokenizer)")
    ap.add_argument("--data", default=str(ROOT / "experiments/data/fin_sentiment.jsonl"))
    ap.add_argument("--eval-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=bnb, device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    random.Random(args.seed).shuffle(rows)
    texts = [TEMPLATE.format(**r) + r["output"] + tokenizer.eos_token for r in rows[args.eval_size:]]
    train = Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_len), batched=True,
        remove_columns=["text"])

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=tempfile.mkdtemp(prefix="plain-qlora-"), per_device_train_batch_size=args.batch_size,
            max_steps=args.steps, learning_rate=args.lr, optim="adamw_bnb_8bit", use_cpu=True,
            logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True, seed=args.seed,
            include_num_input_tokens_seen="non_padding",
        ),
        train_dataset=train,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    trainer.train()
    seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    tokens = int(trainer.state.num_input_tokens_seen)
    print(json.dumps({"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
                      "cpu_seconds": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
                      "steps": int(trainer.state.global_step)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
