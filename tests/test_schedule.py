import math

import torch

from grpo.config import TrainConfig
from grpo.models.build import materialize
from grpo.trainer.policy_trainer import PolicyTrainer, RolloutBatch
from grpo.trainer.schedule import learning_rate


def _rates(steps: int, **schedule) -> list[float]:
    train = TrainConfig(steps=steps, learning_rate=1.0, **schedule)
    return [learning_rate(train, step) for step in range(1, steps + 1)]


def test_the_warm_up_climbs_to_the_full_rate_which_constant_then_keeps():
    assert _rates(6, lr_warmup_steps=4) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert _rates(3) == [1.0, 1.0, 1.0]


def test_linear_decay_starts_at_the_full_rate_and_stops_short_of_its_floor():
    assert _rates(4, lr_schedule="linear") == [1.0, 0.75, 0.5, 0.25]
    assert _rates(6, lr_schedule="linear", lr_warmup_steps=2, lr_min_ratio=0.5) == [
        0.5,
        1.0,
        1.0,
        0.875,
        0.75,
        0.625,
    ]


def test_cosine_decay_follows_half_a_cosine():
    assert _rates(4, lr_schedule="cosine") == [
        1.0,
        (1 + math.cos(math.pi / 4)) / 2,
        0.5,
        (1 + math.cos(math.pi * 0.75)) / 2,
    ]
    assert _rates(3, lr_schedule="cosine", lr_warmup_steps=1, lr_min_ratio=0.5) == [1.0, 1.0, 0.75]


def _batch() -> RolloutBatch:
    prompts, completions = [[3, 4, 5], [6, 7]], [[8, 9, 10, 11], [12, 13]]
    return RolloutBatch(prompts, completions, [1.0, -1.0], [[] for _ in prompts])


def test_the_trainer_steps_at_the_rate_of_the_step_it_is_given(tmp_path):
    model_path = materialize("tiny:deepseek_v3", tmp_path / "init")

    def trained(train: dict, step: int) -> tuple[float, dict]:
        trainer = PolicyTrainer(model_path, {"model": {"path": model_path}, "train": train}, pad_id=0)
        metrics = trainer.train_step(_batch(), step)
        return metrics["lr"], trainer._state()

    warming = {"learning_rate": 2e-2, "lr_warmup_steps": 2}
    (rate, warmed), (plain_rate, plain) = trained(warming, 1), trained({"learning_rate": 1e-2}, 1)
    assert rate == plain_rate == 1e-2
    assert all(torch.equal(warmed[name], plain[name]) for name in plain)
    full_rate, full = trained(warming, 2)
    assert full_rate == 2e-2 and not torch.equal(
        full["model.layers.0.self_attn.o_proj.weight"], plain["model.layers.0.self_attn.o_proj.weight"]
    )
