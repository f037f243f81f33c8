"""The experiment schema: one frozen, validated dataclass per section of a spec.

An `ExperimentConfig` is one grid cell. Fields are declared `_f(default, help=...)`
(docs/config.md is generated from the help); each section's `problems()` names the key,
the value and the fix. No torch, no Ray: `plan` imports this and stays instant.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any

# ConfigError, from_dict, to_dict, set_dotted and problem are re-exported: callers take them from
# here, with the schema.
from qlora_ray.fromdict import ConfigError as ConfigError
from qlora_ray.fromdict import Validated, at_most, is_dataclass_type, one_of, positive
from qlora_ray.fromdict import from_dict as from_dict
from qlora_ray.fromdict import problem as problem
from qlora_ray.fromdict import set_dotted as set_dotted
from qlora_ray.fromdict import to_dict as to_dict
from qlora_ray.identity import FIRST_RELEASE, field_default
from qlora_ray.identity import experiment_id as _experiment_id

QUANT_BITS = (4, 8, 16)
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("float16", "bfloat16", "float32", "auto")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2")
LORA_BIAS = ("none", "all", "lora_only")
OPTIMIZERS = ("adamw_torch", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_bnb_8bit")
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("tiny-llama",)
# A name is a file name, a Ray resource label, a cell-name token and a plot label at once.
_NAME_CHARS = "A-Za-z0-9._+=-"
SAFE_NAME = re.compile(rf"[A-Za-z0-9][{_NAME_CHARS}]{{0,127}}")
UNSAFE_NAME_CHAR = re.compile(rf"[^{_NAME_CHARS}]")

# Upper bounds (far above any real run; they stop typos and hostile specs, not research).
MAX_LORA_RANK = 4096
MAX_EPOCHS = 1000
MAX_STEPS = 10_000_000
MAX_BATCH = 4096
MAX_SEQ_LEN = 1_048_576
MAX_NEW_TOKENS = 16_384
MAX_ROWS = 100_000_000
MAX_TEMPLATE_CHARS = 100_000
MAX_LIST_ITEMS = 1000

DEFAULT_PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n"


def _f(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    since: str = FIRST_RELEASE,
    identity: bool = True,
    same_as: dict[Any, Any] | None = None,
    **kw: Any,
) -> Any:
    """A dataclass field with its help text (docs/config.md) and its identity rule.

    `since`: the release that added the field (the identity rules in `identity.py`).
    `identity`: False for fields that change neither what is trained nor what is measured.
    `same_as`: values the hash reads as another value (rule 4).
    """
    metadata = {"help": help, "since": since, "identity": identity, "same_as": same_as or {}}
    if default is dataclasses.MISSING:
        return field(metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass(frozen=True)
class ModelConfig(Validated):
    name: str = _f(
        "builtin:tiny-llama",
        "Hub id, local path, or `builtin:tiny-llama` (built locally, no network).",
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit); recorded in the row.")
    trust_remote_code: bool = _f(False, "Run model code from the hub; off unless you turn it on.")
    attn_implementation: str = _f(
        "auto",
        "Attention kernel: auto (what transformers picks for the architecture: sdpa where the "
        "model supports it, else eager; the row records the kernel used), eager, sdpa or "
        "flash_attention_2.",
        # 0.1.0's default was sdpa; for every model 0.1.0 could train, auto runs sdpa (Gemma-2,
        # where auto means eager, never ran with sdpa), so finished cells keep their ids.
        same_as={"auto": "sdpa"},
    )
    use_safetensors: bool = _f(
        True,
        "Load the model's (and a fixed embedder's) weights only from .safetensors files, never "
        "unpickled; false lets transformers fall back to a repo's PyTorch .bin files.",
        since="0.2.0",
    )

    def problems(self) -> list[str]:
        out: list[str] = []
        if not self.name:
            out.append(problem("model.name", self.name, "must not be empty", "give a hub id or path"))
        if self.name.startswith(BUILTIN_PREFIX):
            one_of(out, "model.name", self.name, tuple(BUILTIN_PREFIX + m for m in BUILTIN_MODELS))
        one_of(out, "model.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        return out


@dataclass(frozen=True)
class DatasetConfig(Validated):
    path: str = _f(
        "experiments/data/fin_sentiment.jsonl",
        "Local .jsonl/.json/.csv/.parquet file, or a `datasets` name (e.g. `org/data`).",
    )
    subset: str | None = _f(None, "`datasets` config name, for hub datasets that have several.")
    split: str = _f("train", "Split to read; the eval split is carved out of it.")
    prompt_template: str = _f(
        DEFAULT_PROMPT_TEMPLATE,
        "Python format string over the row's columns, e.g. `{instruction}`; a column that is "
        "missing from a row formats as empty.",
    )
    response_field: str = _f("output", "Column holding the reference answer (the loss target).")
    chat_template: bool = _f(
        False, "Wrap the prompt with the tokenizer's chat template instead of the raw template."
    )
    eval_size: int | float = _f(
        64, "Held-out rows: an integer count, or a fraction in (0, 1) of the dataset."
    )
    split_seed: int = _f(0, "Seed of the deterministic train/eval split.")
    max_train_samples: int | None = _f(None, "Cap on training rows (after the split).")
    packing: bool = _f(False, "Pack several examples into each `max_seq_len` sequence (attention "
                       "stays inside each example; fewer optimizer steps per epoch, see `train_steps`).")

    def problems(self) -> list[str]:
        out: list[str] = []
        if not self.path:
            out.append(problem("dataset.path", self.path, "must not be empty", "give a file or name"))
        if isinstance(self.eval_size, float) and not 0 < self.eval_size < 1:
            out.append(
                problem("dataset.eval_size", self.eval_size, "as a fraction must be in (0, 1)",
                        "use e.g. 0.1, or an integer row count")
            )
        if isinstance(self.eval_size, int) and self.eval_size < 1:
            out.append(problem("dataset.eval_size", self.eval_size, "must be >= 1", "hold out rows"))
        if isinstance(self.eval_size, int):
            at_most(out, "dataset.eval_size", self.eval_size, MAX_ROWS, "hold out fewer rows")
        if self.max_train_samples is not None:
            at_most(out, "dataset.max_train_samples", self.max_train_samples, MAX_ROWS,
                     "remove it to use every row")
        if len(self.prompt_template) > MAX_TEMPLATE_CHARS:
            out.append(problem("dataset.prompt_template", f"{len(self.prompt_template):,} characters",
                               f"must be at most {MAX_TEMPLATE_CHARS:,} characters",
                               "put the long text in the dataset's rows"))
        if self.max_train_samples is not None and self.max_train_samples < 1:
            out.append(
                problem("dataset.max_train_samples", self.max_train_samples, "must be >= 1",
                        "remove it to use every row")
            )
        try:
            fields = [f for _, f, _, _ in __import__("string").Formatter().parse(self.prompt_template)]
            if not any(fields):
                out.append(
                    problem("dataset.prompt_template", self.prompt_template,
                            "has no {column} placeholder", "reference at least one column")
                )
        except ValueError as e:
            out.append(
                problem("dataset.prompt_template", self.prompt_template, f"is not a format string ({e})",
                        "escape literal braces as {{ and }}")
            )
        return out


@dataclass(frozen=True)
class QuantConfig(Validated):
    bits: int = _f(4, "4 = QLoRA (bitsandbytes Linear4bit), 8 = LLM.int8, 16 = no quantization.")
    type: str = _f("nf4", "4-bit data type: nf4 (QLoRA's NormalFloat) or fp4.")
    double_quant: bool = _f(True, "Quantize the 4-bit block constants too (saves ~0.4 bit/param).")
    compute_dtype: str = _f(
        "bfloat16",
        "dtype of the matmuls and of the 16-bit baseline: bfloat16, float16, float32, or auto "
        "(bfloat16 where the GPU supports it, else float16).",
    )

    def problems(self) -> list[str]:
        out: list[str] = []
        one_of(out, "quant.bits", self.bits, QUANT_BITS)
        one_of(out, "quant.type", self.type, QUANT_TYPES)
        one_of(out, "quant.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        return out


@dataclass(frozen=True)
class LoraConfig(Validated):
    r: int = _f(8, "Adapter rank.")
    alpha: float = _f(16, "Scale numerator: updates are scaled by alpha / r (alpha / sqrt(r) with rsLoRA).")
    dropout: float = _f(0.05, "Dropout on the adapter input.")
    target_modules: tuple[str, ...] | str = _f(
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        "Module names to adapt, or `all-linear` for every linear layer but the output head.",
    )
    bias: str = _f("none", "Which biases train: none, all or lora_only.")
    use_rslora: bool = _f(False, "Rank-stabilized LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA).")

    def problems(self) -> list[str]:
        out: list[str] = []
        positive(out, "lora.r", self.r, "use a rank such as 8 or 16")
        at_most(out, "lora.r", self.r, MAX_LORA_RANK, "use a rank such as 8 or 16")
        positive(out, "lora.alpha", self.alpha, "use e.g. 2 x r")
        at_most(out, "lora.alpha", self.alpha, 2 * MAX_LORA_RANK * 16, "use e.g. 2 x r")
        if isinstance(self.target_modules, tuple) and len(self.target_modules) > MAX_LIST_ITEMS:
            out.append(problem("lora.target_modules", f"{len(self.target_modules):,} names",
                               f"must name at most {MAX_LIST_ITEMS:,} modules", "use all-linear"))
        if not 0 <= self.dropout < 1:
            out.append(problem("lora.dropout", self.dropout, "must be in [0, 1)", "use e.g. 0.05"))
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            out.append(
                problem("lora.target_modules", self.target_modules,
                        "must be a list of module names or `all-linear`",
                        "write e.g. [q_proj, v_proj]")
            )
        if isinstance(self.target_modules, tuple) and not self.target_modules:
            out.append(problem("lora.target_modules", [], "must not be empty", "name at least one module"))
        one_of(out, "lora.bias", self.bias, LORA_BIAS)
        return out


@dataclass(frozen=True)
class TrainConfig(Validated):
    epochs: float = _f(3, "Passes over the training split (ignored when max_steps is set).")
    max_steps: int | None = _f(None, "Stop after this many optimizer steps instead of epochs.")
    batch_size: int | str = _f(
        4, "Micro-batch per device, or `auto`: the largest that the memory planner says fits."
    )
    grad_accum: int = _f(1, "Gradient accumulation steps (effective batch = batch_size x grad_accum).")
    learning_rate: float = _f(2e-4, "Peak learning rate.")
    lr_scheduler: str = _f("linear", "Schedule: linear, cosine, constant, constant_with_warmup.")
    warmup_ratio: float = _f(0.03, "Fraction of steps spent warming up.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(0.3, "Gradient clipping (QLoRA paper value).")
    max_seq_len: int = _f(256, "Tokens per example after truncation.")
    group_by_length: bool = _f(
        False,
        "Length-grouped batching: draw each batch from rows of similar length (transformers' "
        "`LengthGroupedSampler`), so batches carry less padding; the same examples and optimizer "
        "steps as the default random batches. The row's `batching` says which ran.",
        since="0.2.0",
    )
    padding_free: bool = _f(
        False,
        "Padding-free batches: the same random batches as the default, each laid end to end in "
        "one row (positions restarting per example, attention kept inside each: "
        "transformers' `DataCollatorWithFlattening` layout) instead of padded to its longest "
        "row, so no step computes on pad tokens. The row's `batching` says which ran.",
        since="0.2.0",
    )
    optim: str = _f(
        "paged_adamw_8bit", "adamw_torch, paged_adamw_8bit, paged_adamw_32bit or adamw_bnb_8bit."
    )
    gradient_checkpointing: bool = _f(True, "Recompute activations in backward (less memory).")
    seed: int = _f(0, "Seed for model init of adapters, data order and dropout.")
    logging_steps: int = _f(10, "Log the training loss every N steps.")
    save_adapter: bool = _f(False, "Save the trained adapter under RESULTS/<spec>/adapters/<id>.")
    oom_backoff: bool = _f(
        False, "On OOM, halve batch_size and double grad_accum (same effective batch) and retry."
    )

    def problems(self) -> list[str]:
        out: list[str] = []
        positive(out, "train.epochs", self.epochs, "train for at least a fraction of an epoch")
        at_most(out, "train.epochs", self.epochs, MAX_EPOCHS, "use e.g. 3")
        if self.max_steps is not None:
            positive(out, "train.max_steps", self.max_steps, "remove it to train by epochs")
            at_most(out, "train.max_steps", self.max_steps, MAX_STEPS, "remove it to train by epochs")
        if not isinstance(self.batch_size, str):
            at_most(out, "train.batch_size", self.batch_size, MAX_BATCH, "use e.g. 4, or auto")
        at_most(out, "train.grad_accum", self.grad_accum, MAX_BATCH, "use e.g. 4")
        at_most(out, "train.max_seq_len", self.max_seq_len, MAX_SEQ_LEN, "use the model's context length")
        at_most(out, "train.learning_rate", self.learning_rate, 1.0, "use e.g. 2.0e-4")
        at_most(out, "train.logging_steps", self.logging_steps, MAX_STEPS, "use e.g. 10")
        if isinstance(self.batch_size, str):
            if self.batch_size != "auto":
                out.append(
                    problem("train.batch_size", self.batch_size, "must be an integer or `auto`",
                            "write e.g. 4")
                )
        elif self.batch_size < 1:
            out.append(problem("train.batch_size", self.batch_size, "must be >= 1", "use e.g. 4"))
        if self.grad_accum < 1:
            out.append(problem("train.grad_accum", self.grad_accum, "must be >= 1", "use 1 for none"))
        positive(out, "train.learning_rate", self.learning_rate, "use e.g. 2.0e-4")
        if not 0 <= self.warmup_ratio < 1:
            out.append(problem("train.warmup_ratio", self.warmup_ratio, "must be in [0, 1)", "use e.g. 0.03"))
        positive(out, "train.weight_decay", self.weight_decay, "use 0 for none", allow_zero=True)
        positive(out, "train.max_grad_norm", self.max_grad_norm, "use e.g. 0.3")
        if self.max_seq_len < 8:
            out.append(problem("train.max_seq_len", self.max_seq_len, "must be >= 8", "use e.g. 256"))
        one_of(out, "train.optim", self.optim, OPTIMIZERS)
        one_of(out, "train.lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        positive(out, "train.logging_steps", self.logging_steps, "use e.g. 10")
        return out

    @property
    def effective_batch(self) -> int | None:
        return None if isinstance(self.batch_size, str) else self.batch_size * self.grad_accum


@dataclass(frozen=True)
class SimilarityConfig(Validated):
    embedder: str = _f(
        "self",
        "`self` (the evaluated model's own mean-pooled last hidden state, as the seed results, "
        "with the adapter disabled so before and after share one ruler) or a fixed model path / "
        "hub id, so that scores also compare across quantizations.",
    )
    revision: str | None = _f(
        None,
        "Hub revision (commit, tag or branch) of a fixed embedder: pin a commit so scores stay "
        "comparable over time. The commit used is recorded in the row (`embedder_revision`).",
        since="0.2.0",
    )

    def problems(self) -> list[str]:
        if not self.embedder:
            return [problem("eval.similarity.embedder", self.embedder, "must not be empty",
                            "use `self` or a model path")]
        if self.revision is not None and self.embedder == "self":
            return [problem("eval.similarity.revision", self.revision, "pins a fixed embedder, and "
                            "eval.similarity.embedder is `self`", "remove it, or name the embedder")]
        return []


@dataclass(frozen=True)
class EvalConfig(Validated):
    max_new_tokens: int = _f(
        16, "Greedy decoding length for the generated answers; cover the longest reference "
        "(the worker warns when a reference is longer).")
    batch_size: int = _f(16, "Generation, embedding and eval-loss batch size (the eval loss is "
                         "per answer token over the whole eval set, whatever the batch size).")
    max_samples: int | None = _f(None, "Cap on evaluated rows (default: the whole eval split).")
    before: bool = _f(True, "Also evaluate the untrained model (the `*_before` columns).")
    labels: tuple[str, ...] | str = _f(
        "auto",
        "Label set for accuracy/F1: a list, `none`, or `auto` (answers of at most three words "
        "that occur at least 3 times, ignoring case; only when 2 to 10 such values cover at least "
        "half the rows, otherwise no accuracy and the row's `labels_note` says why). With a label "
        "set the eval split is stratified on it.",
    )
    similarity: SimilarityConfig = _f(default_factory=SimilarityConfig, help="Similarity scoring.")

    def problems(self) -> list[str]:
        out: list[str] = []
        positive(out, "eval.max_new_tokens", self.max_new_tokens, "use e.g. 16")
        at_most(out, "eval.max_new_tokens", self.max_new_tokens, MAX_NEW_TOKENS, "use e.g. 16")
        positive(out, "eval.batch_size", self.batch_size, "use e.g. 16")
        at_most(out, "eval.batch_size", self.batch_size, MAX_BATCH, "use e.g. 16")
        if self.max_samples is not None:
            positive(out, "eval.max_samples", self.max_samples, "remove it to use the whole split")
            at_most(out, "eval.max_samples", self.max_samples, MAX_ROWS, "remove it to use the whole split")
        if not isinstance(self.labels, str) and len(self.labels) > MAX_LIST_ITEMS:
            out.append(problem("eval.labels", f"{len(self.labels):,} labels",
                               f"must list at most {MAX_LIST_ITEMS:,} labels", "use auto or none"))
        if isinstance(self.labels, str) and self.labels not in ("auto", "none"):
            out.append(problem("eval.labels", self.labels, "must be a list, `auto` or `none`",
                               "write e.g. [negative, neutral, positive]"))
        return out


@dataclass(frozen=True)
class ExperimentConfig(Validated):
    """One cell of a grid: the whole recipe of one fine-tuning run."""

    name: str = _f("experiment", "Human name, made from the axis values; safe as a file name.",
                   identity=False)
    model: ModelConfig = _f(default_factory=ModelConfig, help="Base model.")
    dataset: DatasetConfig = _f(default_factory=DatasetConfig, help="Training and eval data.")
    quant: QuantConfig = _f(default_factory=QuantConfig, help="Quantization of the base model.")
    lora: LoraConfig = _f(default_factory=LoraConfig, help="LoRA adapters.")
    train: TrainConfig = _f(default_factory=TrainConfig, help="Training loop.")
    eval: EvalConfig = _f(default_factory=EvalConfig, help="Evaluation.")
    gpu: str | None = _f(
        None, "GPU profile to run on (e.g. T4, A100-40G); none runs wherever the driver is."
    )
    emulate_profile: bool = _f(
        False, "On a bigger GPU, cap memory to the profile's size to answer 'does it fit on X?'."
    )

    def problems(self) -> list[str]:
        out: list[str] = []
        if not SAFE_NAME.fullmatch(self.name):
            out.append(problem("name", self.name, "must be a safe file name",
                               "use letters, digits and . _ + = - only"))
        if self.train.group_by_length and self.dataset.packing:
            # Packed sequences are all about max_seq_len long and carry no padding to save.
            out.append(problem("train.group_by_length", True, "cannot be combined with dataset.packing "
                               "(packed sequences have no padding to group away)",
                               "set one of train.group_by_length and dataset.packing to false"))
        if self.train.padding_free and (self.dataset.packing or self.train.group_by_length):
            other = "dataset.packing" if self.dataset.packing else "train.group_by_length"
            out.append(problem("train.padding_free", True, f"cannot be combined with {other} (both "
                               "remove the padding; padding-free batches have none left)",
                               f"set one of train.padding_free and {other} to false"))
        if (
            self.model.attn_implementation == "flash_attention_2"
            and self.quant.bits in (4, 8)
            and self.quant.compute_dtype == "float32"
        ):
            # k-bit preparation upcasts norms to fp32, so with an fp32 compute dtype the hidden
            # states reach FlashAttention in fp32, which it rejects deep inside its kernel.
            out.append(problem("model.attn_implementation", "flash_attention_2",
                               "needs quant.compute_dtype float16 or bfloat16 with 4/8-bit models",
                               "use sdpa, or set quant.compute_dtype to bfloat16"))
        return out

    @functools.cached_property
    def experiment_id(self) -> str:
        """12 hex digits that name this cell's row (the rules: `identity.py`). Cached: the
        config is frozen, and plan, run and resume each ask for it per cell."""
        return _experiment_id(self)

    def replace(self, **dotted: Any) -> ExperimentConfig:
        """A copy with dotted keys overridden, validated again: `cfg.replace(**{"train.batch_size": 2})`."""
        data = to_dict(self)
        for key, value in dotted.items():
            set_dotted(data, key, value)
        return from_dict(ExperimentConfig, data)


def describe_fields(cls: type = ExperimentConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, for docs/config.md (`docs_gen`)."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if is_dataclass_type(tp):
            rows.extend(describe_fields(tp, f"{prefix}{f.name}."))
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else field_default(f)
        if isinstance(default, tuple):
            default = list(default)
        shown = "required" if required else json.dumps(default)
        rows.append((f"{prefix}{f.name}", shown, f.metadata.get("help", "")))
    return rows
