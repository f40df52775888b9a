"""The project's mixture-of-experts layer (DeepSeek-V3 recipe), a drop-in for transformers' MoE blocks.

Parameter names equal transformers' DeepSeek-V3 and Qwen3-MoE blocks (`gate.weight`,
`gate.e_score_correction_bias`, `experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I],
`shared_experts.*`), so `convert_moe` swaps the modules of a loaded model in place, sharing the
parameters, and checkpoints keep loading in transformers and vLLM.

- Routing: sigmoid (DeepSeek-V3) or softmax (Qwen3-MoE) scores; group-limited top-k (experts are
  split in `n_group` groups, a group's score is its two best experts, only the `topk_group` best
  groups compete); optional top-k weight normalisation; `routed_scaling_factor`.
- Auxiliary-loss-free balancing: a per-expert bias shifts *selection* only (the weights come from the
  unbiased scores); `update_routing_bias` nudges it by `gamma * sign(mean_load - load)` after an
  optimizer step, from the loads counted since the previous update (every position a training
  forward routes, padding included).
- Optional sequence-wise balance loss (DeepSeek-V3, eq. 17-20), one sequence per batch row.
- Routed experts run as two grouped GEMMs (`torch._grouped_mm`) over the tokens sorted by expert;
  with `fp8` as grouped blockwise FP8 GEMMs on CUDA (`fp8_grouped`; on Hopper DeepGEMM's, with the
  tokens dispatched into its padded layout, `fp8_grouped_deep_gemm`), elsewhere through one FP8
  linear function per expert.
- Tokens go to their experts and come back through gathers (`dispatch`, `combine`) whose
  backward is a gather too: no atomic scatter, the same result every run. Where K rows sum into one
  (`combine`'s forward, `dispatch`'s backward), `gather_sum` reads them straight from where they
  lie: on CUDA one Triton kernel.

Shape legend: T tokens, H hidden, E experts, K experts per token, I expert intermediate size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from grpo.models.swiglu import weighted_swiglu


@dataclass(frozen=True)
class Routing:
    num_experts: int
    top_k: int
    scoring: str = "sigmoid"
    """'sigmoid' (DeepSeek-V3) or 'softmax' (Qwen3-MoE)."""
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    @classmethod
    def from_config(cls, config) -> Routing:
        """From a transformers DeepSeek-V3 or Qwen3-MoE config."""
        if getattr(config, "scoring_func", None) == "sigmoid" or config.model_type == "deepseek_v3":
            return cls(
                num_experts=config.n_routed_experts,
                top_k=config.num_experts_per_tok,
                scoring="sigmoid",
                n_group=config.n_group,
                topk_group=config.topk_group,
                norm_topk_prob=config.norm_topk_prob,
                routed_scaling_factor=config.routed_scaling_factor,
            )
        return cls(
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            scoring="softmax",
            norm_topk_prob=config.norm_topk_prob,
        )


def select_experts(
    scores_TE: torch.Tensor, bias_E: torch.Tensor | None, routing: Routing
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token from FP32 scores: `(weights_TK, indices_TK)`. The bias only picks."""
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E
    if routing.n_group > 1:
        groups_TGX = choice_TE.unflatten(1, (routing.n_group, -1))
        group_score_TG = groups_TGX.topk(2, dim=-1).values.sum(dim=-1)
        best_groups_TG = group_score_TG.topk(routing.topk_group, dim=-1).indices
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_groups_TG, True)
        keep_TE = keep_TG.unsqueeze(-1).expand_as(groups_TGX).flatten(1)
        choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
    indices_TK = choice_TE.topk(routing.top_k, dim=-1).indices
    weights_TK = scores_TE.gather(1, indices_TK)
    if routing.norm_topk_prob:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return weights_TK * routing.routed_scaling_factor, indices_TK


class Router(nn.Module):
    def __init__(self, hidden_size: int, routing: Routing, bias_in_checkpoint: bool):
        super().__init__()
        self.routing = routing
        self.weight = nn.Parameter(torch.zeros(routing.num_experts, hidden_size))
        # DeepSeek-V3 checkpoints carry the bias; Qwen3-MoE ones do not, so there it is not saved.
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(routing.num_experts), persistent=bias_in_checkpoint
        )

    def forward(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(scores_TE fp32, weights_TK, indices_TK)`; routing is computed in FP32 as in DeepSeek-V3."""
        logits_TE = F.linear(x_TH.float(), self.weight.float())
        scores_TE = logits_TE.sigmoid() if self.routing.scoring == "sigmoid" else logits_TE.softmax(dim=-1)
        weights_TK, indices_TK = select_experts(scores_TE, self.e_score_correction_bias, self.routing)
        return scores_TE, weights_TK, indices_TK


def grouped_linear(
    x_NK: torch.Tensor, w_EOK: torch.Tensor, offsets_E: torch.Tensor, fp8: bool
) -> torch.Tensor:
    """Rows of `x` sorted by expert (expert e owns rows offsets[e-1]:offsets[e]) times each expert's
    `[out, in]` weight, transposed: one grouped GEMM. In FP8: on CUDA the grouped FP8 GEMMs of
    `fp8_grouped` (out features a multiple of 128), otherwise one FP8 linear per non-empty expert."""
    if not fp8:
        return torch._grouped_mm(x_NK, w_EOK.transpose(1, 2), offs=offsets_E)
    if w_EOK.is_cuda and w_EOK.shape[1] % 128 == 0:  # no 128-row weight block spans two experts
        from grpo.models.fp8_grouped import grouped_fp8

        return grouped_fp8(x_NK, w_EOK, offsets_E)
    return per_expert_fp8(x_NK, w_EOK, offsets_E)


def per_expert_fp8(x_NK: torch.Tensor, w_EOK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """One `fp8_linear` per non-empty expert."""
    from grpo.models.fp8 import fp8_linear

    ends = offsets_E.tolist()
    sizes = [end - start for start, end in zip([0, *ends[:-1]], ends)]
    # split/unbind, not per-expert indexing: the backward of `w[e]` or `x[a:b]` materializes a
    # zero gradient of the whole tensor for every expert (gigabytes per layer at DeepSeek-V3 sizes)
    parts = [
        fp8_linear(x_nK, w_OK)
        for x_nK, w_OK, size in zip(x_NK.split(sizes), w_EOK.unbind(0), sizes)
        if size > 0
    ]
    return torch.cat(parts) if parts else x_NK.new_zeros(0, w_EOK.shape[1])


def sort_by_expert(indices_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(order_N, inverse_N)`: the (token, slot) pairs `t * K + k` sorted by expert, and the inverse
    permutation (where each pair went)."""
    order_N = indices_TK.flatten().argsort(stable=True)
    return order_N, inverse_permutation(order_N)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


class _GatherRows(torch.autograd.Function):
    """`x[index]` where `index` takes every row of `x` the same number of times, K, and `inverse`
    lists where each row's copies went, row 0's K first. Autograd's backward of an index scatters
    the gradient with atomic adds, as did the `index_add_` that combined the experts' outputs (2.4 ms
    of a 25 ms step at DeepSeek-V3's shape on the H100); this one gathers by `inverse` and sums each
    row's K copies: no atomics, the same result every run."""

    @staticmethod
    def forward(ctx, x_TH, index_N, inverse_N):
        ctx.save_for_backward(inverse_N)
        ctx.rows = x_TH.shape[0]
        return x_TH.index_select(0, index_N)

    @staticmethod
    def backward(ctx, grad_NH):
        (inverse_N,) = ctx.saved_tensors
        if inverse_N.numel() == ctx.rows:
            return grad_NH.index_select(0, inverse_N), None, None
        return gather_sum(grad_NH, inverse_N.view(ctx.rows, -1)), None, None  # K > 1: each row's copies


class _SumOfGatheredRows(torch.autograd.Function):
    """`gather_sum(y, index_TK)` where `index` names every row of `y` at most once and `order` gives,
    for each row of `y`, its place in the flattened `index` (any place, for a row `index` leaves
    out): the gradient of row r is then the gradient of output row `order[r] // K`, one gather."""

    @staticmethod
    def forward(ctx, y_NH, index_TK, order_N):
        ctx.save_for_backward(order_N)
        ctx.top_k = index_TK.shape[1]
        return gather_sum(y_NH, index_TK)

    @staticmethod
    def backward(ctx, grad_TH):
        (order_N,) = ctx.saved_tensors
        return grad_TH.index_select(0, order_N // ctx.top_k), None, None


def gather_sum(src_RH: torch.Tensor, index_TK: torch.Tensor) -> torch.Tensor:
    """`src[index].sum(1)`: row t the sum of the K rows of `src` that `index[t]` names. On CUDA one
    Triton kernel (`gather_sum_triton`: FP32 sums rounded once, no `[T * K, H]` copy in between;
    at DeepSeek-V3's expert shape that copy is 0.5 GB a use); elsewhere `index_select` and `sum`."""
    if src_RH.is_cuda and src_RH.stride(1) == 1 and index_TK.is_contiguous():
        from grpo.models.gather_sum_triton import gather_sum_rows

        return gather_sum_rows(src_RH, index_TK)
    return src_RH.index_select(0, index_TK.flatten()).view(*index_TK.shape, src_RH.shape[1]).sum(1)


def permute_rows(x_NH: torch.Tensor, order_N: torch.Tensor, inverse_N: torch.Tensor) -> torch.Tensor:
    """`x[order]` for a permutation `order` with inverse `inverse`; its backward is a gather too."""
    return _GatherRows.apply(x_NH, order_N, inverse_N)


def dispatch(x_TH: torch.Tensor, order_N: torch.Tensor, inverse_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """Each token's row once per expert it goes to, in the pairs' sorted order (`sort_by_expert`).
    `order` may also list more rows than pairs (padding rows, whose pair is any one) and `inverse`
    the row of each pair there: the rows then come out in that padded layout."""
    return _GatherRows.apply(x_TH, order_N // top_k, inverse_N)


def combine(y_NH: torch.Tensor, order_N: torch.Tensor, inverse_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """Sum each token's K expert outputs (rows in the pairs' sorted order, already weighted; or in
    a padded layout, as `dispatch` takes it, whose padding rows get the gradient of some pair)."""
    return _SumOfGatheredRows.apply(y_NH, inverse_N.view(-1, top_k), order_N)


def count_per_expert(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many of `indices` name each expert. A scatter, not `torch.bincount`, which reads the
    indices' max on the host: a sync that drains the GPU's queued work, once per layer."""
    flat = indices.flatten()
    return flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.fp8 = False

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def run_sorted(self, x_NH: torch.Tensor, counts_E: torch.Tensor, weights_N: torch.Tensor) -> torch.Tensor:
        """The SwiGLU experts on rows already sorted by expert, `counts_E` rows each, each row's output
        scaled by its routing weight."""
        offsets_E = counts_E.cumsum(0).to(torch.int32)
        return self._swiglu(x_NH, weights_N, lambda x, w: grouped_linear(x, w, offsets_E, self.fp8))

    def _swiglu(self, x_NH: torch.Tensor, weights_N: torch.Tensor, linear) -> torch.Tensor:
        """`linear(x, w)` is the grouped GEMM of the rows' layout. The routing weight scales the down
        projection's input, not its output: the same product (the projection is linear) on I columns
        instead of H (at DeepSeek-V3's shape on the H100 the layer's elementwise kernels then took 1.3
        ms per step instead of 1.6); on CUDA one kernel each way (`swiglu`)."""
        hidden_NI = weighted_swiglu(linear(x_NH, self.gate_up_proj), weights_N)
        return linear(hidden_NI, self.down_proj)

    def deep_gemm(self, x_TH: torch.Tensor):
        """DeepGEMM where the FP8 experts run through it (`fp8_grouped_deep_gemm`), else None."""
        if not (self.fp8 and x_TH.is_cuda):
            return None
        from grpo.models.fp8_grouped_deep_gemm import library_for

        return library_for(x_TH, self.gate_up_proj, self.down_proj)

    def forward(self, x_TH: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        top_k = indices_TK.shape[1]
        order_N, inverse_N = sort_by_expert(indices_TK)
        counts_E = count_per_expert(indices_TK, self.num_experts)
        library = self.deep_gemm(x_TH)
        if library is not None:
            return self._forward_padded(library, x_TH, order_N, inverse_N, counts_E, weights_TK)
        weights_N = weights_TK.flatten()[order_N]
        y_NH = self.run_sorted(dispatch(x_TH, order_N, inverse_N, top_k), counts_E, weights_N)
        return combine(y_NH, order_N, inverse_N, top_k)

    def _forward_padded(self, library, x_TH, order_N, inverse_N, counts_E, weights_TK) -> torch.Tensor:
        """`forward` through DeepGEMM, the pairs dispatched straight into its padded layout
        (`fp8_grouped_deep_gemm`): the same gathers with padded indices, no copies."""
        from grpo.models.fp8_grouped_deep_gemm import PaddedLayout, grouped_fp8_padded

        top_k = weights_TK.shape[1]
        layout = PaddedLayout.of(counts_E.cumsum(0).to(torch.int32), order_N.numel())
        order_P, row_of_pair_N = layout.padded_index(order_N), layout.destination_N[inverse_N]
        # nothing relies on what the padding rows of the experts' outputs hold (the quantizers read
        # them as zeros): keep it out of the routing weights' gradient
        weights_P = torch.where(layout.layout_P >= 0, weights_TK.flatten()[order_P], 0.0)
        x_PH = dispatch(x_TH, order_P, row_of_pair_N, top_k)
        y_PH = self._swiglu(x_PH, weights_P, lambda x, w: grouped_fp8_padded(library, x, w, layout))
        return combine(y_PH, order_P, row_of_pair_N, top_k)


class MoeLayer(nn.Module):
    """Shared experts (optional) + routed experts. Replaces transformers' block, same parameter names."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        routing: Routing,
        shared_experts: nn.Module | None = None,
        bias_in_checkpoint: bool = True,
    ):
        super().__init__()
        # registration order as in transformers, so state dicts list the same names in the same order
        self.experts = GroupedExperts(routing.num_experts, hidden_size, intermediate_size)
        self.gate = Router(hidden_size, routing, bias_in_checkpoint)
        self.shared_experts = shared_experts
        self.balance_loss_alpha = 0.0
        self.balance_loss: torch.Tensor | None = None
        self.register_buffer("load_since_update", torch.zeros(routing.num_experts), persistent=False)
        self.real_tokens_T: torch.Tensor | None = None
        """Set by `real_tokens` for one forward: which positions are tokens rather than padding."""
        self.recomputing = False
        """Set while activation checkpointing runs the forward again in the backward: the loads were
        counted the first time, and the balance loss taken then."""

    def forward(self, hidden_BSH: torch.Tensor) -> torch.Tensor:
        x_TH = hidden_BSH.reshape(-1, hidden_BSH.shape[-1])
        scores_TE, weights_TK, indices_TK = self.gate(x_TH)
        if self.training:
            real_T = self.real_tokens_T
            if not self.recomputing:
                self._count_load(indices_TK, real_T)
            if self.balance_loss_alpha > 0:
                rows = hidden_BSH.shape[0] if hidden_BSH.dim() == 3 else 1
                balance = self.balance_loss_alpha * sequence_balance_loss(
                    scores_TE, indices_TK, rows, self.gate.routing.top_k, real_T
                )
                if not self.recomputing:
                    self.balance_loss = balance
        out_TH = self.experts(x_TH, indices_TK, weights_TK)
        if self.shared_experts is not None:
            out_TH = out_TH + self.shared_experts(x_TH)
        return out_TH.view_as(hidden_BSH)

    @torch.no_grad()
    def _count_load(self, indices_TK: torch.Tensor, real_T: torch.Tensor | None) -> None:
        # a scatter, not bincount or a boolean mask: no host sync per layer
        load = self.load_since_update
        counts_TK = torch.ones_like(indices_TK, dtype=load.dtype)
        if real_T is not None:
            counts_TK *= real_T.unsqueeze(1)
        load.scatter_add_(0, indices_TK.flatten(), counts_TK.flatten())


def sequence_balance_loss(
    scores_TE: torch.Tensor,
    indices_TK: torch.Tensor,
    rows: int,
    top_k: int,
    real_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (without alpha), averaged over rows:
    `sum_e f_e * P_e`, f_e = E / (K * S) * tokens routed to e, P_e = mean over tokens of the
    normalised scores, S the row's tokens (`real_T` leaves padding out). Uniform routing gives 1."""
    num_experts = scores_TE.shape[1]
    scores_BSE = scores_TE.view(rows, -1, num_experts)
    seq_len = scores_BSE.shape[1]
    real_BS = scores_BSE.new_ones(rows, seq_len) if real_T is None else real_T.view(rows, seq_len)
    real_BS1 = real_BS.unsqueeze(-1).to(scores_BSE)
    chosen_BSE = torch.zeros_like(scores_BSE).scatter_(2, indices_TK.view(rows, seq_len, top_k), 1.0)
    tokens_B1 = real_BS1.sum(dim=1).clamp(min=1)
    f_BE = (chosen_BSE * real_BS1).sum(dim=1) * num_experts / (top_k * tokens_B1)
    p_BE = (scores_BSE / scores_BSE.sum(dim=-1, keepdim=True) * real_BS1).sum(dim=1) / tokens_B1
    return (f_BE * p_BE).sum(dim=-1).mean()


def moe_layers(model: nn.Module) -> list[MoeLayer]:
    return [module for module in model.modules() if isinstance(module, MoeLayer)]


@contextlib.contextmanager
def real_tokens(model: nn.Module, attention_mask_BS: torch.Tensor):
    """For the forwards inside: padded positions (mask 0) are routed like tokens, but left out of
    the expert loads and the balance loss, which then do not depend on how rows are padded together."""
    layers, real_T = moe_layers(model), attention_mask_BS.flatten().bool()
    for layer in layers:
        layer.real_tokens_T = real_T
    try:
        yield
    finally:
        for layer in layers:
            layer.real_tokens_T = None


def balance_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the layers' sequence-wise balance losses from the last forward, or None when off."""
    losses = [layer.balance_loss for layer in moe_layers(model) if layer.balance_loss is not None]
    return torch.stack(losses).sum() if losses else None


@torch.no_grad()
def update_routing_bias(model: nn.Module, gamma: float, group=None) -> dict[str, float]:
    """Auxiliary-loss-free balancing step (call after the optimizer step); returns load statistics
    of the tokens routed since the last call: the worst layer's max/mean expert load, and the mean.
    With a process `group` (data or expert parallel ranks) the loads are summed over its ranks
    first, so every rank moves its replica of the bias the same way."""
    ratios = []
    for layer in moe_layers(model):
        load_E = layer.load_since_update
        if group is not None:
            torch.distributed.all_reduce(load_E, group=group)
        if load_E.sum() == 0:
            continue
        ratios.append((load_E.max() / load_E.mean()).item())
        if gamma > 0:
            layer.gate.e_score_correction_bias += gamma * torch.sign(load_E.mean() - load_E)
        load_E.zero_()
    if not ratios:
        return {}
    return {"moe/max_over_mean_load": max(ratios), "moe/mean_max_over_mean_load": sum(ratios) / len(ratios)}


def _from_hf_block(block: nn.Module, config) -> MoeLayer:
    routing = Routing.from_config(config)
    hidden, intermediate = config.hidden_size, config.moe_intermediate_size
    layer = MoeLayer(
        hidden,
        intermediate,
        routing,
        shared_experts=getattr(block, "shared_experts", None),
        bias_in_checkpoint=hasattr(block.gate, "e_score_correction_bias"),
    )
    # share, not copy: the optimizer and checkpoint code see the very same tensors
    layer.gate.weight = block.gate.weight
    if hasattr(block.gate, "e_score_correction_bias"):
        layer.gate.e_score_correction_bias = block.gate.e_score_correction_bias
    layer.experts.gate_up_proj = block.experts.gate_up_proj
    layer.experts.down_proj = block.experts.down_proj
    layer.load_since_update = layer.load_since_update.to(block.gate.weight.device)
    return layer


HF_MOE_BLOCKS = ("DeepseekV3MoE", "Qwen3MoeSparseMoeBlock")


def convert_moe(model: nn.Module) -> list[str]:
    """Replace transformers' DeepSeek-V3 / Qwen3-MoE blocks by `MoeLayer` in place; returns their
    names. The experts start in high precision (`fp8.convert_to_fp8` switches them)."""
    converted = []
    for name, module in list(model.named_modules()):
        if type(module).__name__ in HF_MOE_BLOCKS:
            layer = _from_hf_block(module, model.config)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer)
            converted.append(name)
    return converted
