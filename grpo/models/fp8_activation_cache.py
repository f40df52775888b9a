"""The last activations' quantized copies, handed to the next FP8 linear layer that reads one too.

Transformers' models feed one tensor to two projections: `gate_proj` and `up_proj` of every MLP
(DeepSeek-V3's shared experts: 7168 -> 2048 twice), `q_a_proj` and `kv_a_proj_with_mqa` of MLA. Each
FP8 layer would quantize that input again, a full pass over it (at 8192 x 7168 about as long as
copying it, a sixth of the layer's GPU time). DeepSeek-V3 quantizes such an input once, in the op
that produces it; this gets the same saving without touching the producer: the second layer finds
the first one's copies here.

Two entries are kept: MLA quantizes its input for `q_a_proj`, then `q_a_proj`'s normed output for
`q_b_proj`, then its input again for `kv_a_proj_with_mqa`. An entry is valid only while the tensor
it came from is alive and unchanged. An activation's address can be reused by another one as soon
as it is freed, so the entry holds a weak reference to the tensor (to its base, for a view:
`Fp8Linear` reshapes its input, a new view each call), which drops the entry when the tensor goes;
while the tensor lives nothing else can take its memory, and its version counter (shared by every
view) tells whether it was written (writes through `.data` do not advance it; model code does not
write activations that way).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

Copies = TypeVar("Copies")

KEPT = 2
_entries: list[tuple[weakref.ref, tuple, object]] = []  # the most recent first


def _forget(dead: weakref.ref) -> None:
    _entries[:] = [entry for entry in _entries if entry[0] is not dead]


def quantized(x: torch.Tensor, kind: Hashable, quantize: Callable[[], Copies]) -> Copies:
    """`quantize()`, or its result from one of the last KEPT calls that was for the same unchanged
    `x` (the same memory, shape, strides and dtype, of a tensor still alive) and the same `kind`."""
    if x.is_inference():  # no version counter to check
        return quantize()
    base = x if x._base is None else x._base
    key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x._version, kind)
    for alive, kept_key, copies in _entries:
        if alive() is base and kept_key == key:
            return copies
    copies = quantize()
    _entries.insert(0, (weakref.ref(base, _forget), key, copies))
    del _entries[KEPT:]
    return copies


def forget() -> None:
    """Drop every entry. For benchmarks that feed one input tensor step after step: a training step
    brings a new activation, which no entry can match."""
    _entries.clear()
