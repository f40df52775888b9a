"""Activation checkpointing (`train.gradient_checkpointing`): each decoder layer keeps only its input
for the backward and runs its forward again there, trading one more forward for the activations'
memory (transformers' `gradient_checkpointing_enable`, on torch's non-reentrant checkpoint).

The project's MoE layer needs two things of the second forward (`recompute_context`): it must see the
same real-token mask as the first (`real_tokens` has been left by the time the backward runs), or the
balance loss would be recomputed over padding and its gradient would be another function's; and it
must not count the expert loads again, or every load would be counted twice.
"""

from __future__ import annotations

import contextlib

import torch

from grpo.models.moe import MoeLayer, moe_layers


def enable(model: torch.nn.Module) -> None:
    layers = moe_layers(model)

    def contexts():  # called as each checkpointed layer's first forward starts
        masks = [(layer, layer.real_tokens_T) for layer in layers]
        return contextlib.nullcontext(), recompute_context(masks)

    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": contexts}
    )


@contextlib.contextmanager
def recompute_context(masks: list[tuple[MoeLayer, torch.Tensor | None]]):
    """The MoE layers as the first forward saw them, counting no loads."""
    before = [(layer, layer.real_tokens_T) for layer, _ in masks]
    for layer, mask in masks:
        layer.real_tokens_T, layer.recomputing = mask, True
    try:
        yield
    finally:
        for layer, mask in before:
            layer.real_tokens_T, layer.recomputing = mask, False
