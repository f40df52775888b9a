"""The learning rate of each GRPO step: a linear warm-up, then constant, linear or cosine decay.

The rate is a function of the step alone, so a resumed run needs no scheduler state: it asks for its
next step's rate. One GRPO step is one unit, as in verl: its `mu` optimizer steps share one rate.
Steps count from 1. The decay starts at the full rate on the first step after the warm-up and would
reach `lr_min_ratio` one step after the last, so no step trains at the floor alone.
"""

from __future__ import annotations

import math

from grpo.config import TrainConfig


def learning_rate(train: TrainConfig, step: int) -> float:
    peak, warmup = train.learning_rate, train.lr_warmup_steps
    if step <= warmup:
        return peak * step / warmup
    if train.lr_schedule == "constant":
        return peak
    progress = (step - warmup - 1) / (train.steps - warmup)  # 0 on the first step after the warm-up
    remaining = 1 - progress if train.lr_schedule == "linear" else (1 + math.cos(math.pi * progress)) / 2
    floor = peak * train.lr_min_ratio
    return floor + (peak - floor) * remaining
