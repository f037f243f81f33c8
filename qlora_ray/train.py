"""The training run: transformers' Trainer over the prepared data, timed and token-counted."""

from __future__ import annotations

import gc
import logging
import math
import tempfile
from dataclasses import dataclass
from typing import Any

from transformers import PrinterCallback, Trainer, TrainingArguments

from qlora_ray.config import ExperimentConfig
from qlora_ray.device import Device
from qlora_ray.measure import Timer

log = logging.getLogger(__name__)

# bitsandbytes' 8-bit optimizers run on CUDA and, since bitsandbytes 0.49, on the CPU; paging
# (spilling optimizer state to host memory under pressure) is CUDA-only, and bitsandbytes
# silently drops it on the CPU. Say what actually runs, so the row does not claim paging.
BNB_OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_bnb_8bit")
CPU_EQUIVALENT = {"paged_adamw_8bit": "adamw_bnb_8bit", "paged_adamw_32bit": "adamw_torch"}


def effective_optimizer(requested: str, device: Device) -> str:
    if device.kind != "cpu" or requested not in BNB_OPTIMIZERS:
        return requested
    if not _bnb_has_cpu_optimizers():
        return "adamw_torch"
    return CPU_EQUIVALENT.get(requested, requested)


def _bnb_has_cpu_optimizers() -> bool:
    try:
        import bitsandbytes as bnb
        from packaging.version import Version

        return Version(bnb.__version__) >= Version("0.49")
    except Exception:
        return False


@dataclass
class TrainResult:
    seconds: float
    steps: int
    tokens: int  # non-padding input tokens the optimizer saw
    loss: float | None  # mean training loss over the run
    loss_first: float | None  # first logged loss
    loss_last: float | None  # last logged loss

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None


def make_trainer(
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    eval_dataset: Any,
    collator: Any,
    cfg: ExperimentConfig,
    device: Device,
    compute_dtype: str,
    batch_size: int,
    grad_accum: int,
    output_dir: str | None = None,
    autocast: bool | None = None,
) -> Trainer:
    """The Trainer for one run. `autocast`: mixed precision in `compute_dtype` (default: on
    CUDA only); the memory harness turns it on for the CPU to run a GPU's step (bf16 only:
    accelerate has no fp16 autocast on the CPU)."""
    t = cfg.train
    on_cuda = device.kind == "cuda"
    mixed = on_cuda if autocast is None else autocast
    args = TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(prefix="qlora-ray-trainer-"),
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=effective_optimizer(t.optim, device),
        # Mixed precision only on CUDA; on the CPU the bitsandbytes layers already compute
        # in the chosen dtype and autocast would only slow the run down.
        bf16=mixed and compute_dtype == "bfloat16",
        fp16=mixed and compute_dtype == "float16",
        use_cpu=not on_cuda,
        # Checkpointing is already wired in modeling.load (k-bit preparation needs it there).
        gradient_checkpointing=False,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        # transformers' LengthGroupedSampler: random mega-batches, each sorted by length, the
        # longest batch first (trainer_pt_utils.get_length_grouped_indices), so an OOM comes early.
        train_sampling_strategy="group_by_length" if cfg.train.group_by_length else "random",
        # Packed and padding-free batches come as one row without padding (or an attention
        # mask to count by): every token is real. Padded ones are counted by their mask.
        include_num_input_tokens_seen="all" if cfg.dataset.packing or cfg.train.padding_free
        else "non_padding",
    )
    trainer = _Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
    )
    # With tqdm off the Trainer prints every log dict to stdout; in a grid that is one
    # interleaved line per step per worker in the driver's output. The row keeps the numbers.
    trainer.remove_callback(PrinterCallback)
    return trainer


class _Trainer(Trainer):
    """transformers' Trainer without a per-step walk of the model.

    Every step, `Trainer.floating_point_ops` (trainer.py, `_run_epoch`: `self.current_flos
    += ...`) calls `model.num_parameters(exclude_embeddings=True)`, which walks every module
    and parameter (0.7 ms of a 75 ms step on the built-in model, docs/performance.md item 4)
    for a count that cannot change during training. Same figure (`state.total_flos`), counted once.
    """

    _non_embedding_params: int | None = None

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        if self._non_embedding_params is None:
            self._non_embedding_params = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main].numel() * self._non_embedding_params


def train(trainer: Trainer) -> TrainResult:
    # Freeze what exists now (torch, transformers, the model: ~500k objects) out of the
    # garbage collector's reach while training: each full collection (accelerate's
    # free_memory at the start, automatic ones on the way) otherwise walks them all (0.25 s
    # a cell on the built-in model). Unfrozen afterwards, so anything among them that later
    # becomes garbage (a model released for an OOM retry) is collected as usual. A process
    # forked from the zygote (fresh.py) has its imports frozen already and its own objects
    # are few: left as it is, since unfreezing would hand the zygote's objects back to the
    # collector (whose walks would then copy their pages into the child).
    ours = gc.get_freeze_count() == 0
    if ours:
        gc.freeze()
    try:
        with Timer() as timer:
            output = trainer.train()
    finally:
        if ours:
            gc.unfreeze()
    history = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in history if isinstance(h.get("loss"), (int, float))]
    loss = output.training_loss
    return TrainResult(
        seconds=timer.seconds,
        steps=int(trainer.state.global_step),
        tokens=int(trainer.state.num_input_tokens_seen),
        loss=loss if loss is not None and math.isfinite(loss) else None,
        loss_first=losses[0] if losses else None,
        loss_last=losses[-1] if losses else None,
    )
