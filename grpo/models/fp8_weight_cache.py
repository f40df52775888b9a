"""Quantized weight copies reused while the weight stays the same (DeepSeek-V3 recipe, FP8 path).

Each forward quantizes every FP8 weight again: once per micro-batch, and once more per frozen logprob
pass, although the weights change only at the optimizer step. Inside `reuse_quantized_weights()` a
weight's first quantized copy is kept and handed to the later passes until the weight changes. An
entry is keyed by the weight's storage, shape and the kind of copy, and is valid only while the
tensor's version counter is unchanged: every in-place update (the optimizer's step, `load_state_dict`,
`copy_`) advances it. Writes through `.data` do not, which is why reuse is scoped rather than global:
the trainer opens one scope per train step, and the copies are freed when it closes (they take as much
memory as the BF16 weights they come from: one byte per element for each of the two copies).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from typing import TypeVar

import torch

Value = TypeVar("Value")

_entries: dict | None = None  # None: no scope open, nothing is kept


@contextlib.contextmanager
def reuse_quantized_weights() -> Iterator[None]:
    """Keep quantized weight copies for the duration (nested scopes share the outermost one's)."""
    global _entries
    outermost = _entries is None
    if outermost:
        _entries = {}
    try:
        yield
    finally:
        if outermost:
            _entries = None


def quantized(weight: torch.Tensor, kind: Hashable, quantize: Callable[[], Value]) -> Value:
    """`quantize()`, or inside a scope its result from an earlier call for the same unchanged
    `weight` and `kind`."""
    if _entries is None:
        return quantize()
    key = (weight.data_ptr(), tuple(weight.shape), kind)
    version = weight._version
    kept = _entries.get(key)
    if kept is not None and kept[0] == version:
        return kept[1]
    value = quantize()
    _entries[key] = (version, value)  # replaces the copy of an older version
    return value
