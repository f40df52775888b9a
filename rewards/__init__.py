"""Reward functions, installed as `grpo.rewards`.

A reward is `fn(completion: str, sample: Mapping[str, Any]) -> float | None` (None = not applicable).
Rewards are pure and total on model output; `grpo.rewards.runtime` still isolates them.
"""
