"""The routed experts' forward and input-gradient GEMMs through DeepGEMM's m-grouped FP8 GEMM, on
Hopper where DeepGEMM loads (`fp8_deep_gemm`); the weight gradient stays the Triton kernel of
`fp8_grouped`.

DeepGEMM's grouped GEMM wants each expert's rows to start at a multiple of 128 (`ALIGNMENT`), with
`layout[row]` naming the row's expert (-1 for padding). So the layer's rows, sorted by expert and
packed, are copied into that padded layout before quantization (the padding rows zero, so they add
nothing to the weight gradient and change no scale), and the outputs are gathered back. The padded
size is the bound `rows + experts * 127`, known without reading the expert counts on the host:
DeepGEMM skips the 128-row blocks that belong to no expert. The copies in and out of that layout cost
about as much as DeepGEMM saves at the experts' sizes of the recipes here, so `used_for` keeps small
experts on the Triton kernels (producing the padded layout in the dispatch would remove the copies:
not done).

On an H100, at DeepSeek-V3's expert shapes, DeepGEMM ran these two GEMMs at 1,050-1,100 TFLOP/s
against 530-640 for the Triton kernel (`benchmarks/results/deep_gemm_probe_h100.txt`). Its weight
gradient (k-grouped) adds into an FP32 buffer only, which at these shapes made it slower than the
Triton kernel's BF16 output; so that one is not used.
"""

from __future__ import annotations

import torch

from grpo.models import fp8_deep_gemm, fp8_triton, fp8_weight_cache
from grpo.models.fp8 import trimmed
from grpo.models.fp8_grouped import expert_weight_gradient

ALIGNMENT = 128
SMALLEST_SIDE = 2048
"""Under `GRPO_DEEP_GEMM=auto` the experts go through DeepGEMM only where both sides of their weights
are at least this. The padding's copies cost more than DeepGEMM saves at the H100 recipe's experts
(1024 -> 512, 32 experts: layer step 3.7-3.9 ms -> 5.0-5.3 ms) and less at DeepSeek-V3's (7168 ->
2048: 35.3 -> 33.1 ms; `benchmarks/results/moe_layer_h100.txt`). Sizes between were not measured."""


def used_for(w_ENK: torch.Tensor) -> bool:
    """Whether `fp8_grouped.grouped_fp8` runs these experts here (`fp8_deep_gemm.library` said yes)."""
    return fp8_deep_gemm.mode == "on" or min(w_ENK.shape[1:]) >= SMALLEST_SIDE


def padded_layout(ends_E: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows sorted by expert (expert e owns `ends_E[e-1]:ends_E[e]`): `(destination_M, layout_P,
    padded_ends_E)`, where row m goes to `destination_M[m]` of the padded layout, `layout_P` names each
    padded row's expert (-1: padding) and expert e owns padded rows up to `padded_ends_E[e]`. All on
    the device: nothing here waits for the GPU."""
    experts = ends_E.numel()
    counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
    padded_E = (counts_E + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
    padded_ends_E = padded_E.cumsum(0, dtype=torch.int32)
    shift_E = (padded_ends_E - padded_E) - (ends_E - counts_E)  # padded start - packed start
    row_M = torch.arange(rows, device=ends_E.device, dtype=ends_E.dtype)
    expert_M = torch.searchsorted(ends_E, row_M, right=True)
    destination_M = (row_M + shift_E[expert_M]).long()
    size = -(-(rows + experts * (ALIGNMENT - 1)) // ALIGNMENT) * ALIGNMENT
    layout_P = torch.full((size,), -1, device=ends_E.device, dtype=torch.int32)
    layout_P[destination_M] = expert_M.int()
    return destination_M, layout_P, padded_ends_E


def padded_rows(x_MK: torch.Tensor, destination_M: torch.Tensor, size: int) -> torch.Tensor:
    return x_MK.new_zeros(size, x_MK.shape[1]).index_copy_(0, destination_M, x_MK)


def expert_weights(w_ENK: torch.Tensor, power_of_two: bool, transposed: bool):
    """`w` per expert in 128 x 128 blocks: `[E, N', K']` (forward), or `w_e.T` `[E, K', N']` (input
    gradient, so that both read the reduction contiguous); reused while `w` is unchanged inside
    `fp8_weight_cache.reuse_quantized_weights`."""
    source = w_ENK.transpose(1, 2) if transposed else w_ENK
    kind = ("deep_gemm expert blocks", transposed, power_of_two)
    return fp8_weight_cache.quantized(
        w_ENK, kind, lambda: fp8_triton.quantize_weight_blocks(source, power_of_two)
    )


def grouped_gemm(library, a_q, a_scale, weights, layout_P: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    w_q, w_scale = weights
    out = torch.empty(layout_P.shape[0], w_q.shape[1], dtype=dtype, device=a_q.device)
    library.m_grouped_fp8_gemm_nt_contiguous((a_q, a_scale), (w_q, w_scale), out, layout_P)
    return out


def forward_only(library, x_MK, w_ENK, ends_E: torch.Tensor, power_of_two: bool) -> torch.Tensor:
    """The forward alone (a logprob pass): neither `x.T` nor the transposed weights quantized."""
    destination_M, layout_P, _ = padded_layout(ends_E, x_MK.shape[0])
    xq, xs = fp8_triton.quantize_activation_rows(padded_rows(x_MK, destination_M, layout_P.shape[0]))
    weights = expert_weights(w_ENK, power_of_two, transposed=False)
    y_PN = grouped_gemm(library, xq, xs, weights, layout_P, x_MK.dtype)
    return trimmed(y_PN.index_select(0, destination_M), x_MK.shape[0], w_ENK.shape[1])


class DeepGemmGroupedFp8Function(torch.autograd.Function):
    """`fp8_grouped.GroupedFp8Function` with its forward and input gradient through DeepGEMM."""

    @staticmethod
    def forward(ctx, x_MK, w_ENK, ends_E: torch.Tensor, power_of_two: bool, library):
        rows, k = x_MK.shape
        n = w_ENK.shape[1]
        destination_M, layout_P, padded_ends_E = padded_layout(ends_E, rows)
        x_PK = padded_rows(x_MK, destination_M, layout_P.shape[0])
        xq, xs, xq_t, xs_t = fp8_triton.quantize_activation(x_PK, power_of_two)
        weights = expert_weights(w_ENK, power_of_two, transposed=False)
        weights_t = expert_weights(w_ENK, power_of_two, transposed=True)
        y_PN = grouped_gemm(library, xq, xs, weights, layout_P, x_MK.dtype)
        ctx.save_for_backward(xq_t, xs_t, *weights_t, destination_M, layout_P, padded_ends_E)
        ctx.meta = (library, rows, n, k, x_MK.dtype, power_of_two)
        return trimmed(y_PN.index_select(0, destination_M), rows, n)

    @staticmethod
    def backward(ctx, grad_MN):
        xq_t, xs_t, wq_t, ws_t, destination_M, layout_P, padded_ends_E = ctx.saved_tensors
        library, rows, n, k, dtype, power_of_two = ctx.meta
        g_PN = padded_rows(grad_MN.to(dtype), destination_M, layout_P.shape[0])
        gq, gs, gq_t, gs_t = fp8_triton.quantize_output_grad(g_PN, power_of_two)
        dx_PK = grouped_gemm(library, gq, gs, (wq_t, ws_t), layout_P, dtype)
        grad_x = trimmed(dx_PK.index_select(0, destination_M), rows, k)
        grad_w = expert_weight_gradient(gq_t, gs_t, xq_t, xs_t, padded_ends_E, n, k, dtype)
        return grad_x, grad_w, None, None, None
