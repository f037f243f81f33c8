"""`train.warmup_ratio` reaches the learning-rate schedule the Trainer really runs.

transformers 4.56/4.57 typed `TrainingArguments.warmup_steps` as a step count and took a
ratio in `warmup_ratio`; 5.0 made `warmup_steps` a float read as a ratio below 1 and
deprecated `warmup_ratio` (removed in 5.2). train.py passes the ratio as `warmup_steps`,
so pyproject.toml requires transformers >= 5: run on 4.57.6, this file fails with
"ValueError: warmup_steps must be of type int" (every cell would); on 5.0.0 and the
locked 5.23 it passes. It trains a few steps and reads the rate the scheduler gave each.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_parts import collate_lm, toy_llama

from qlora_ray.config import ExperimentConfig, from_dict
from qlora_ray.device import cpu_device
from qlora_ray.train import make_trainer, train

STEPS = 8
LR = 1e-3


def learning_rates(warmup_ratio: float, scheduler: str) -> list[float]:
    cfg = from_dict(ExperimentConfig, {"train": {
        "max_steps": STEPS, "learning_rate": LR, "warmup_ratio": warmup_ratio, "lr_scheduler": scheduler,
        "optim": "adamw_torch", "logging_steps": 1, "batch_size": 2}})
    data = [{"input_ids": torch.randint(0, 32, (8,))} for _ in range(2 * STEPS)]
    cpu = cpu_device()
    trainer = make_trainer(toy_llama(), None, data, data[:2], collate_lm, cfg, cpu, "float32", 2, 1)
    train(trainer)
    return [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "constant_with_warmup"])
def test_the_scheduler_warms_up_over_the_configured_share_of_steps(scheduler):
    lrs = learning_rates(0.25, scheduler)
    warmup = math.ceil(STEPS * 0.25)  # 2 steps
    assert len(lrs) == STEPS
    # A linear ramp from 0: the rate logged after step k is LR * k / warmup.
    assert lrs[:warmup] == pytest.approx([LR * k / warmup for k in range(warmup)])
    assert lrs[warmup] == pytest.approx(LR)
    if scheduler != "constant_with_warmup":
        assert lrs[-1] < LR / 2  # and then decays


def test_the_default_ratio_is_a_short_warmup_not_none():
    cfg = ExperimentConfig()
    assert cfg.train.warmup_ratio == 0.03
    lrs = learning_rates(cfg.train.warmup_ratio, "linear")
    # ceil(8 x 0.03) = 1 warmup step: the first step runs at 0, the second at the peak.
    assert lrs[0] == 0 and lrs[1] == pytest.approx(LR)
