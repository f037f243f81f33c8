"""`builtin:tiny-llama`: a tiny Llama built on this machine, so every code path runs offline.

    path = ensure_builtin("builtin:tiny-llama")      # a directory for from_pretrained
    AutoModelForCausalLM.from_pretrained(path); AutoTokenizer.from_pretrained(path)

The recipe, start to finish in 10-20 seconds on two CPU cores (recorded in recipe.json):

1. train a byte-level BPE tokenizer (1024 tokens) on the packaged corpus
   (`qlora_ray/assets/tiny_corpus.txt`: synthetic financial headlines, short news
   sentences and general statements such as "When a company cuts jobs, investors see the
   news as negative."; no instruction format, no labelled headline) plus a few fixed
   strings (the default prompt template's headers and the three sentiment words at the
   start of a line, so the answers of `experiments/data/fin_sentiment.jsonl` are single
   tokens);
2. build a 2-layer `LlamaForCausalLM` (hidden 128, 4 heads; every linear dimension a
   multiple of 64, as bitsandbytes' 4-bit blocks need), with tied embeddings;
3. pretrain it as a causal LM on the corpus for 200 steps (plain torch loop, fixed seeds),
   so that fine-tuning starts from a model that knows the words, not from noise; then
   give each token the corpus never showed the embedding of its space-prefixed twin plus
   the average difference between the two forms of words the corpus does show in both
   (`negative` <- `Ġnegative` + offset): answers are tokenized at the start of a line, a
   form the corpus lacks, and LoRA cannot train embeddings. The offset keeps the twins
   apart (an exact copy, with tied embeddings, ties their logits: the label's loss could
   not go below ln 2 and greedy decoding emitted the twin).

The result is cached under `$QLORA_RAY_CACHE` (default `~/.cache/qlora-ray`) in
`builtin/tiny-llama-<hash>`, where the hash covers everything that decides the weights:
the model config, tokenizer settings, corpus bytes, training hyperparameters, the recipe
version, and the major.minor versions of transformers and tokenizers (their on-disk
formats differ across majors: a directory written by transformers 5 does not load in 4).
Two processes (e.g. two Ray workers on one node) may ask at once: an `fcntl` lock makes
one of them build, into a temporary directory renamed into place when complete, and the
other wait and reuse it. The directory holds `recipe.json` with the recipe, the measured
losses and the build time. The lock needs a local filesystem (flock on NFS is unreliable).

Weights are bit-identical for the same recipe on the same machine and library versions;
across CPU types or thread counts float summation order may differ in the last bits.

`builtin_model_config()` returns the model's `config.json` content from constants alone:
the memory planner uses it and must import neither torch nor transformers, so this module
imports them only inside the functions that build.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.resources
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from qlora_ray.config import BUILTIN_PREFIX, ConfigError, problem

log = logging.getLogger(__name__)

TINY_LLAMA = f"{BUILTIN_PREFIX}tiny-llama"
CACHE_ENV = "QLORA_RAY_CACHE"
# Bump when the recipe changes in a way the settings below do not capture (e.g. the loop).
RECIPE_VERSION = 2

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3  # special tokens come first in the vocab, in order

# A minimal chat format: `<s><|user|>\n...\n<|assistant|>\n...</s>`. It starts with the bos
# token itself, so a chat-formatted prompt is tokenized without adding special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

TOKENIZER_SETTINGS: dict[str, Any] = {
    "type": "byte-level-bpe",
    "vocab_size": 1024,
    "min_frequency": 2,
    "special_tokens": list(SPECIAL_TOKENS),
    # Strings added to the tokenizer's training text (never to the LM's), repeated so their
    # merges win: the prompt headers and the labels as the dataset's responses start.
    "extra_text": ["### Instruction:\n", "### Input:\n", "### Response:\n",
                   "negative\n", "neutral\n", "positive\n"],
    "extra_repeats": 100,
    "add_bos": True,
    "model_max_length": 512,
    "chat_template": CHAT_TEMPLATE,
}

# Every linear dimension is a multiple of 64 (4-bit blocks); head_dim 32.
MODEL_CONFIG: dict[str, Any] = {
    "vocab_size": TOKENIZER_SETTINGS["vocab_size"],
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.02,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
}

TRAIN_SETTINGS: dict[str, Any] = {
    "seed": 0,
    "block_size": 64,  # tokens per training sequence; lines are joined as <s> line </s>
    "batch_size": 16,
    "steps": 200,
    "learning_rate": 2e-3,
    "warmup_steps": 20,  # then cosine decay to zero
    "betas": [0.9, 0.95],
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "eval_blocks": 32,  # held-out blocks on which loss_before/loss_after are measured
    # After pretraining, a token the corpus never showed (e.g. `negative` at the start of a
    # line, as a response is tokenized) gets the embedding of its space-prefixed twin
    # (`Ġnegative`), which it did see, plus the mean line-start offset (see
    # `_init_unseen_from_twins`). Without this the answer tokens keep a random embedding
    # that low-rank adapters struggle to steer towards; without the offset the twins tie.
    "twin_init": "offset",
}


# ----------------------------------------------------------------------- no torch needed


def _check_name(name: str) -> None:
    if name != TINY_LLAMA:
        raise ConfigError([problem("model.name", name, "is not a built-in model",
                                   f"use {TINY_LLAMA}, or a hub id / local path")])


def builtin_model_config(name: str = TINY_LLAMA) -> dict[str, Any]:
    """The `config.json` content of a built-in model, from constants (no torch, no build)."""
    _check_name(name)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "float32",
            **MODEL_CONFIG}


def corpus_bytes() -> bytes:
    """The packaged pretraining corpus (read through importlib so it works from a wheel)."""
    return (importlib.resources.files("qlora_ray") / "assets" / "tiny_corpus.txt").read_bytes()


def _minor(dist: str) -> str:
    try:
        return ".".join(metadata.version(dist).split(".")[:2])
    except metadata.PackageNotFoundError:
        return "missing"


def recipe(name: str = TINY_LLAMA) -> dict[str, Any]:
    """Everything that decides the built files; its hash names the cache directory."""
    _check_name(name)
    return {
        "name": name,
        "recipe_version": RECIPE_VERSION,
        "model_config": MODEL_CONFIG,
        "tokenizer": TOKENIZER_SETTINGS,
        "train": TRAIN_SETTINGS,
        "corpus_sha256": hashlib.sha256(corpus_bytes()).hexdigest(),
        "format_versions": {"transformers": _minor("transformers"), "tokenizers": _minor("tokenizers")},
    }


def recipe_hash(name: str = TINY_LLAMA) -> str:
    text = json.dumps(recipe(name), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qlora-ray"


def builtin_dir(name: str = TINY_LLAMA, cache_dir: str | Path | None = None) -> Path:
    """Where `ensure_builtin` puts (or finds) the model; nothing is built."""
    return cache_root(cache_dir) / "builtin" / f"{name.removeprefix(BUILTIN_PREFIX)}-{recipe_hash(name)}"


def ensure_builtin(name: str, cache_dir: str | Path | None = None) -> Path:
    """A local directory holding the built-in model and tokenizer, built on first use."""
    final = builtin_dir(name, cache_dir)
    if final.is_dir():  # complete: it only ever appears by an atomic rename
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.parent / f".{final.name}.lock"):
        if final.is_dir():  # another process built it while we waited for the lock
            log.info("reusing %s, built by another process", final)
            return final
        _remove_stale_temps(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache must be readable
            _build(name, tmp)
            # safetensors writes its file owner-only; another user (a container's uid)
            # sharing the cache must be able to read the weights too.
            for file in tmp.iterdir():
                file.chmod(0o644)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl  # POSIX only; the cache is meant for Linux/macOS hosts and containers

    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_temps(final: Path) -> None:
    # Held under the lock, so a leftover temp directory is from a build that was killed.
    for stale in final.parent.glob(f".{final.name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------- the build


def _build(name: str, out: Path) -> None:
    import torch

    start = time.perf_counter()
    log.info("building %s (recipe %s) in %s", name, recipe_hash(name), out)
    lines = corpus_bytes().decode("utf-8").splitlines()
    tokenizer = _train_tokenizer(lines)
    # fork_rng: seeding here must not reset the caller's RNG (a worker seeds its own run).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN_SETTINGS["seed"])
        model = _make_model()
        blocks = _blocks(tokenizer, lines)
        losses = _pretrain(model, blocks)
        twins = _init_unseen_from_twins(model, tokenizer, blocks) if TRAIN_SETTINGS["twin_init"] else 0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    seconds = time.perf_counter() - start
    info = {
        **recipe(name),
        "recipe_hash": recipe_hash(name),
        "corpus_lines": len(lines),
        "corpus_tokens": int(blocks.numel()),
        "tokenizer_vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        **losses,
        "twin_initialized_tokens": twins,
        "build_seconds": round(seconds, 2),
        "num_threads": torch.get_num_threads(),
        "versions": {d: _minor(d) for d in ("torch", "transformers", "tokenizers")},
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    # Written last: a directory with recipe.json is a finished build.
    (out / "recipe.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    log.info("built %s in %.1fs: held-out loss %.2f -> %.2f", name, seconds,
             losses["loss_before"], losses["loss_after"])


def _train_tokenizer(lines: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    s = TOKENIZER_SETTINGS
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=s["vocab_size"], min_frequency=s["min_frequency"],
        special_tokens=s["special_tokens"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines + s["extra_text"] * s["extra_repeats"], trainer)
    # Like Llama: a bos token in front of every encoded text.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    if tok.get_vocab_size() != s["vocab_size"]:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, the recipe wants "
                           f"{s['vocab_size']}: the corpus has too few distinct merges")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]), chat_template=s["chat_template"],
        model_max_length=s["model_max_length"],
    )


def _make_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG))
    model.generation_config.pad_token_id = PAD_ID
    return model


def _blocks(tokenizer: Any, lines: list[str]) -> Any:
    """The corpus as one stream `<s> line </s> <s> line </s> ...`, cut into equal blocks."""
    import torch

    stream: list[int] = []
    for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        stream += [BOS_ID, *ids, EOS_ID]
    size = TRAIN_SETTINGS["block_size"]
    usable = len(stream) // size * size
    return torch.tensor(stream[:usable]).view(-1, size)


def _pretrain(model: Any, blocks: Any) -> dict[str, float]:
    import torch

    s = TRAIN_SETTINGS
    gen = torch.Generator().manual_seed(s["seed"])
    blocks = blocks[torch.randperm(len(blocks), generator=gen)]
    held_out, train = blocks[: s["eval_blocks"]], blocks[s["eval_blocks"] :]
    loss_before = _loss(model, held_out)

    optimizer = torch.optim.AdamW(model.parameters(), lr=s["learning_rate"], betas=tuple(s["betas"]),
                                  weight_decay=s["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(s["warmup_steps"], s["steps"]))
    model.train()
    for _ in range(s["steps"]):
        batch = train[torch.randint(0, len(train), (s["batch_size"],), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s["max_grad_norm"])
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return {"loss_before": round(loss_before, 4), "loss_after": round(_loss(model, held_out), 4),
            "train_loss_last": round(float(loss.detach()), 4)}


def _init_unseen_from_twins(model: Any, tokenizer: Any, blocks: Any) -> int:
    """Start each unseen `word` at its seen twin `Ġword` plus the line-start offset.

    The offset is the mean of `word - Ġword` over the pairs the corpus showed in both forms
    (such as `Shares` / `ĠShares`): what "at the start of a line" adds to a word. With tied
    embeddings an exact copy would give `word` and `Ġword` the same logit for every hidden
    state, capping the label's probability at 1/2; the offset separates them along a
    direction the model already uses.
    """
    import torch

    seen = set(blocks.unique().tolist())
    vocab = tokenizer.get_vocab()
    weight = model.get_input_embeddings().weight  # tied: the output head changes with it

    def twin_of(token: str) -> int | None:
        twin = vocab.get("Ġ" + token)
        return twin if twin is not None and twin in seen and token not in SPECIAL_TOKENS else None

    # In id order: get_vocab's order varies between processes, and so would the mean's last bits.
    both = sorted((idx, twin) for token, idx in vocab.items()
                  if idx in seen and (twin := twin_of(token)) is not None)
    copied = 0
    with torch.no_grad():
        offset = torch.stack([weight[i] - weight[t] for i, t in both]).mean(0) if both else 0.0
        for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
            twin = twin_of(token)
            if idx not in seen and twin is not None:
                weight[idx] = weight[twin] + offset
                copied += 1
    return copied


def _warmup_cosine(warmup: int, total: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


def _loss(model: Any, blocks: Any) -> float:
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = float(model(input_ids=blocks, labels=blocks).loss)
    model.train(was_training)
    return loss
