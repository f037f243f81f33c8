"""Fixed per-step costs the training loop no longer pays (issue 11 item 4).

Each of these slowed every step of every cell whatever its batching, and so capped what less
padding could gain (docs/performance.md, item 4). A real transformers Trainer on a
one-layer Llama, a few steps.
"""

from __future__ import annotations

import gc

import torch
from tiny_parts import collate_lm, toy_llama
from transformers import LlamaForCausalLM, TrainerCallback

from qlora_ray.config import ExperimentConfig, from_dict
from qlora_ray.device import cpu_device
from qlora_ray.train import make_trainer, train

STEPS = 6


def trainer_for(model: LlamaForCausalLM, callbacks: list[TrainerCallback] = ()):
    cfg = from_dict(ExperimentConfig, {"train": {
        "max_steps": STEPS, "optim": "adamw_torch", "logging_steps": 1, "batch_size": 2}})
    data = [{"input_ids": torch.randint(0, 32, (8,))} for _ in range(2 * STEPS)]
    trainer = make_trainer(model, None, data, data[:2], collate_lm, cfg, cpu_device(), "float32", 2, 1)
    for cb in callbacks:
        trainer.add_callback(cb)
    return trainer


def test_the_parameter_count_for_flos_is_taken_once_not_every_step():
    model = toy_llama()
    calls = []
    count = model.num_parameters

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return count(*args, **kwargs)

    model.num_parameters = counting
    trainer = trainer_for(model)
    train(trainer)
    # transformers' own figure: 6 x input tokens x non-embedding parameters, summed per step.
    tokens = STEPS * 2 * 8
    assert trainer.state.total_flos == 6 * tokens * count(exclude_embeddings=True)
    assert len([c for c in calls if c.get("exclude_embeddings")]) == 1


class FrozenSeen(TrainerCallback):
    def __init__(self) -> None:
        self.frozen: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.frozen.append(gc.get_freeze_count())


def test_full_garbage_collections_during_training_skip_what_existed_before_it():
    model = toy_llama()
    seen = FrozenSeen()
    trainer = trainer_for(model, [seen])
    before = len(gc.get_objects())
    train(trainer)
    # Every step ran with the objects that existed before training (imports, the model)
    # outside the collector's reach, and none stays there afterwards.
    assert len(seen.frozen) == STEPS
    assert min(seen.frozen) >= before // 2
    assert gc.get_freeze_count() == 0


def test_training_in_a_process_forked_from_the_zygote_keeps_its_frozen_imports_frozen():
    """fresh.py's zygote freezes its imports before forking a cell's process, so the child's
    collections never walk (and copy) them: training must not unfreeze them."""
    trainer = trainer_for(toy_llama())
    gc.freeze()  # as fresh.py does before fork()
    try:
        frozen = gc.get_freeze_count()
        train(trainer)
        assert gc.get_freeze_count() > frozen // 2  # (frozen objects can still die by refcount)
    finally:
        gc.unfreeze()
