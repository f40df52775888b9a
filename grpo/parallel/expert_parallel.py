"""Expert parallelism: the routed experts of each MoE layer sharded over the ranks of a process group.

Every rank routes its own tokens (router and shared experts are replicated, as in data parallelism),
then one all-to-all sends each (token, expert) pair to the rank that holds the expert, the experts
run as one grouped GEMM on what arrived, and a second all-to-all brings the results back to combine
with the routing weights. Both all-to-alls are autograd-aware, so the backward pass sends the
gradients the same way in reverse and each rank's expert gradients cover every token routed to them.
The same code runs under gloo (CPU) and NCCL (GPU).

Training over such a group (`grpo train` with `train.expert_parallel_size`): each rank trains on its
share of the rollout batch with the batch's global normalizers, so the global loss is the sum of
the ranks' losses. Expert-shard gradients are then already complete (the all-to-all backward brings
every token's contribution to the rank that holds the expert); every other weight is replicated and
its gradients are summed over the ranks (`sum_replicated_gradients`), never averaged with the
experts'. Clipping uses the global norm (`clip_grad_norm_`), and checkpoints and weight syncs see the
gathered experts under their unsharded names (`full_state_dict`).

Shape legend as in `grpo.models.moe`; N = (token, expert) pairs sent, M = pairs received,
R = ranks, L = experts held locally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

from grpo.models.moe import (
    GroupedExperts,
    MoeLayer,
    combine,
    count_per_expert,
    dispatch,
    inverse_permutation,
    moe_layers,
    permute_rows,
    sort_by_expert,
)


def _all_to_all(x: torch.Tensor, recv: list[int], send: list[int], group) -> torch.Tensor:
    return wait_tensor(all_to_all_single_autograd(x, recv, send, group))


def experts_per_rank(total: int, ranks: int) -> int:
    if total % ranks:
        raise ValueError(f"{total} experts do not split evenly over {ranks} expert-parallel ranks")
    return total // ranks


class ExpertParallelExperts(nn.Module):
    """Experts `[rank * L, (rank + 1) * L)` of a `GroupedExperts`, with the same forward signature."""

    def __init__(self, experts: GroupedExperts, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.group = group or dist.group.WORLD
        self.ranks, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.total_experts = experts.num_experts
        self.num_local = experts_per_rank(self.total_experts, self.ranks)
        held = slice(self.rank * self.num_local, (self.rank + 1) * self.num_local)
        self.local = GroupedExperts(self.num_local, experts.gate_up_proj.shape[2], experts.down_proj.shape[2])
        self.local.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[held].clone())
        self.local.down_proj = nn.Parameter(experts.down_proj.detach()[held].clone())
        self.local.fp8 = experts.fp8

    def forward(self, x_TH: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        # pairs sorted by expert, hence by destination rank (rank r holds a contiguous expert range)
        order_N, inverse_N = sort_by_expert(indices_TK)
        expert_N = indices_TK.flatten()[order_N]
        send_R = count_per_expert(expert_N // self.num_local, self.ranks)
        recv_R = torch.empty_like(send_R)
        dist.all_to_all_single(recv_R, send_R, group=self.group)
        send, recv = send_R.tolist(), recv_R.tolist()  # the layer's one host read: the all-to-alls' sizes

        top_k = indices_TK.shape[1]
        x_MH = _all_to_all(dispatch(x_TH, order_N, inverse_N, top_k), recv, send, self.group)
        expert_M = _all_to_all(expert_N % self.num_local, recv, send, self.group)
        weights_M = _all_to_all(weights_TK.flatten()[order_N], recv, send, self.group)
        # arrivals come grouped by sender, each group sorted by expert: one more sort by local expert
        order_M = expert_M.argsort(stable=True)
        inverse_M = inverse_permutation(order_M)
        y_sorted_MH = self.local.run_sorted(
            permute_rows(x_MH, order_M, inverse_M),
            count_per_expert(expert_M, self.num_local),
            weights_M[order_M],
        )
        y_NH = _all_to_all(permute_rows(y_sorted_MH, inverse_M, order_M), send, recv, self.group)
        return combine(y_NH, order_N, inverse_N, top_k)

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full `(gate_up_proj, down_proj)` on every rank (for checkpoints and weight sync)."""
        out = []
        for shard in (self.local.gate_up_proj.detach(), self.local.down_proj.detach()):
            full = shard.new_empty(self.total_experts, *shard.shape[1:])
            dist.all_gather_into_tensor(full, shard.contiguous(), group=self.group)
            out.append(full)
        return out[0], out[1]


def is_expert_shard(name: str) -> bool:
    return ".experts.local." in name


def _replicated_gradients(model: nn.Module) -> list[torch.Tensor]:
    grads = []
    for name, param in model.named_parameters():
        if param.requires_grad and not is_expert_shard(name):
            if param.grad is None:  # every rank must send the same tensors, in the same order
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
    return grads


def sum_replicated_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum the gradients of every weight but the expert shards over the group (one all-reduce per
    dtype, through a flat buffer)."""
    grads = _replicated_gradients(model)
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        flat = torch._utils._flatten_dense_tensors(same)
        dist.all_reduce(flat, group=group)
        for grad, summed in zip(same, torch._utils._unflatten_dense_tensors(flat, same)):
            grad.copy_(summed)


def clip_grad_norm_(model: nn.Module, max_norm: float, group: dist.ProcessGroup | None = None) -> float:
    """`torch.nn.utils.clip_grad_norm_` over the whole sharded model: replicated gradients (equal on
    every rank once summed) count once, each rank's expert shards once. Returns the total norm."""
    replicated, shards = [], []
    for name, param in model.named_parameters():
        if param.grad is not None:
            (shards if is_expert_shard(name) else replicated).append(param.grad)

    def sum_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([g.detach().double().pow(2).sum() for g in grads]).sum()

    device = (replicated + shards)[0].device
    shard_square = sum_of_squares(shards) if shards else torch.zeros((), dtype=torch.float64, device=device)
    dist.all_reduce(shard_square, group=group)
    total = float((sum_of_squares(replicated) + shard_square).sqrt())
    coefficient = min(max_norm / (total + 1e-6), 1.0)
    for grad in replicated + shards:
        grad.mul_(coefficient)
    return total


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every expert shard gathered and named as in the unsharded model.
    A collective: every rank of the experts' group must call it."""
    state = model.state_dict()
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertParallelExperts):
            gate_up, down = module.gathered()
            del state[f"{prefix}.local.gate_up_proj"], state[f"{prefix}.local.down_proj"]
            state[f"{prefix}.gate_up_proj"], state[f"{prefix}.down_proj"] = gate_up, down
    return state


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Replace the routed experts of every `MoeLayer` by this rank's shard; returns the layer count."""
    layers: list[MoeLayer] = moe_layers(model)
    for layer in layers:
        layer.experts = ExpertParallelExperts(layer.experts, group)
    return len(layers)
