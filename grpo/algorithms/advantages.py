"""Group-relative advantage estimators (no critic).

Shape legend: B = prompts in the batch, G = completions per prompt (the group).
Each estimator maps `rewards_BG` to `advantages_BG`; the loss broadcasts an advantage to every token
of its completion (outcome supervision, DeepSeekMath 2024).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

AdvantageFn = Callable[[torch.Tensor], torch.Tensor]


def grpo_advantages(rewards_BG: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """`(r - mean(r)) / (std(r) + eps)` per group; std is the unbiased sample std, as in TRL.

    >>> grpo_advantages(torch.tensor([[1.0, 0.0]])).round(decimals=4)
    tensor([[ 0.7070, -0.7070]])
    """
    mean_B1 = rewards_BG.mean(dim=1, keepdim=True)
    std_B1 = rewards_BG.std(dim=1, keepdim=True)
    return (rewards_BG - mean_B1) / (std_B1 + eps)


def dr_grpo_advantages(rewards_BG: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO: `r - mean(r)`; dividing by std favours easy and hard prompts (Liu et al., 2025)."""
    return rewards_BG - rewards_BG.mean(dim=1, keepdim=True)


def rloo_advantages(rewards_BG: torch.Tensor) -> torch.Tensor:
    """RLOO: each reward minus the mean of the *other* G-1 rewards of its group."""
    group_size = rewards_BG.shape[1]
    assert group_size >= 2, "leave-one-out needs at least two completions per prompt"
    others_mean_BG = (rewards_BG.sum(dim=1, keepdim=True) - rewards_BG) / (group_size - 1)
    return rewards_BG - others_mean_BG


ADVANTAGES: dict[str, AdvantageFn] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
}


def tied_groups(rewards_BG: torch.Tensor) -> torch.Tensor:
    """`tied_B`: True where every completion of a prompt got the same reward (no learning signal)."""
    return (rewards_BG == rewards_BG[:, :1]).all(dim=1)


def first_untied(tied_B: torch.Tensor, wanted: int) -> torch.Tensor:
    """`keep_B`: the first `wanted` groups with a learning signal (DAPO's dynamic sampling fills its
    batch with those and leaves the rest).

    >>> first_untied(torch.tensor([False, True, False, False]), 2).tolist()
    [True, False, True, False]
    """
    untied_B = ~tied_B
    return untied_B & (untied_B.cumsum(dim=0) <= wanted)
