"""Format rewards: the R1 template, a boxed answer, and DAPO's soft overlong penalty."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from grpo.rewards.extract import last_boxed


def think_format(completion: str, sample: Mapping[str, Any]) -> float:
    """1.0 for one `<think>...</think>` block followed by an answer (DeepSeek-R1's template): the
    completion opens with the block, and neither tag appears again, so a stray `</think>` in the
    answer does not pass.

    >>> think_format("<think>2+2</think> 4", {}), think_format("4", {})
    (1.0, 0.0)
    """
    text = completion.lstrip()
    if not text.startswith("<think>") or text.count("<think>") != 1 or text.count("</think>") != 1:
        return 0.0
    return 1.0 if text.split("</think>", 1)[1].strip() else 0.0


def has_boxed(completion: str, sample: Mapping[str, Any]) -> float:
    """1.0 if the completion states a boxed answer, right or wrong."""
    return 0.0 if last_boxed(completion) is None else 1.0


def overlong_penalty(
    completion: str, sample: Mapping[str, Any], max_tokens: int = 1024, buffer: int = 256
) -> float:
    """DAPO's soft overlong punishment: 0 up to `max_tokens - buffer` tokens, then a linear ramp to
    -1 at `max_tokens` (`buffer: 0` is a hard cut: -1 past it). Uses `sample["completion_tokens"]`
    (added by the training loop).

    >>> overlong_penalty("", {"completion_tokens": 896}, max_tokens=1024, buffer=256)
    -0.5
    """
    length = sample.get("completion_tokens")
    if length is None:
        raise ValueError("the sample has no 'completion_tokens' (runs add it; offline, give it in each line)")
    expected = max_tokens - buffer
    if length <= expected:
        return 0.0
    return max(-1.0, (expected - length) / buffer) if buffer > 0 else -1.0
