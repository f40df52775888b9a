"""LoRA adapters (`train.lora`): a converter that gives chosen linear layers a trainable low-rank
update and freezes every other weight (Hu et al., 2021).

`LoraLinear` keeps its base layer's `weight` and `bias` under their own names, so the model's names
stay the base model's. What leaves the trainer (the weights vLLM receives, the checkpoints) is the
merged model, each adapted weight plus its update, computed on copies so that the frozen base never
drifts by merge-and-unmerge rounding. The KL reference is the same model as it started (`as_started`),
not a second copy. A resumed run rebuilds the model from the run's start and loads `adapter_state`.

Why not peft: on transformers 5, peft rewrites a DeepSeek-V3 or Qwen3-MoE config's `gate_proj`,
`up_proj` and `down_proj` targets into parametrizations of the fused routed-expert weights
(`peft.utils.transformers_weight_conversion`), and drops them from the dense and shared-expert MLPs;
those fused weights are the project's grouped MoE layer here, which runs its own GEMMs.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from grpo.config import LoraConfig, RecipeError


class LoraLinear(torch.nn.Module):
    """`x W^T + b + (x A^T) B^T * alpha / rank`, with W and b frozen; B starts at zero, so the layer
    starts as its base. With `enabled` off it is its base, to the bit."""

    enabled = True

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = torch.nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own weights
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return base
        return base + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling


def add_lora(model: torch.nn.Module, spec: LoraConfig) -> None:
    """Freeze every parameter, then give each `nn.Linear` whose name ends in one of `spec.targets` a
    trainable update."""
    model.requires_grad_(False)
    linear_names, adapted = set(), set()
    for name, module in list(model.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        if type(module) is torch.nn.Linear:
            linear_names.add(leaf)
            if leaf in spec.targets:
                model.get_submodule(parent_name).register_module(
                    leaf, LoraLinear(module, spec.rank, spec.alpha)
                )
                adapted.add(leaf)
    # the default names several model families' layers; a list the recipe gives is meant in full,
    # so a misspelt name there is refused rather than left without adapters
    given = spec.targets != LoraConfig.model_fields["targets"].default
    missing = [target for target in spec.targets if target not in adapted] if given or not adapted else []
    if missing:
        raise RecipeError(
            f"train.lora.targets: no linear layer of the model is named {' or '.join(missing)}"
            f" (its linear layers: {', '.join(sorted(linear_names))})"
        )


@contextlib.contextmanager
def as_started(model: torch.nn.Module, started_buffers: dict[str, torch.Tensor]):
    """The model as its run started, for the KL reference without a second copy of the weights:
    adapters off, and the buffers it started with (the routing biases move during training; the
    load statistics a forward adds up go to copies)."""
    layers = [module for module in model.modules() if isinstance(module, LoraLinear)]
    current = dict(model.named_buffers())
    _put_buffers(
        model, {name: started_buffers[name].to(tensor.device, copy=True) for name, tensor in current.items()}
    )
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True
        _put_buffers(model, current)


def _put_buffers(model: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    for name, tensor in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = tensor


def merged_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights under the base model's names, each adapted layer's update added."""
    state = {name: tensor for name, tensor in model.state_dict().items() if ".lora_" not in name}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLinear):
                state[f"{name}.weight"] = module.weight + module.delta()
    return state


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training changed besides the frozen base: the updates' factors, and the buffers (the
    routing biases of auxiliary-loss-free balancing)."""
    buffers = dict(model.named_buffers())
    return {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in model.state_dict().items()
        if ".lora_" in name or name in buffers
    }
