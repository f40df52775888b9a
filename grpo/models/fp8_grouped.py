"""Grouped blockwise FP8 GEMMs for the routed experts (Triton): all experts in one launch per GEMM.

Not wired into the MoE layer yet: checked in Triton's CPU interpreter only (`tests/test_fp8_grouped.py`),
never run on a GPU. `benchmarks/moe_layer_gpu.py` times `GroupedFp8Function` and checks it against
the per-expert FP8 path; once that holds on a GPU, `grouped_linear` can use it instead of its loop.

Rows of `x` are sorted by expert (expert e owns rows `offsets[e-1]:offsets[e]`, any length). Operands
come from the fused quantizers of `fp8_triton`: activations and output gradients in 1 x 128 tiles
along the reduction, their transposes for the weight gradient, weights `[E, N, K]` as one `[E*N, K]`
matrix in 128 x 128 blocks (N a multiple of 128, so that no block spans two experts).

- `expert_gemm` (forward and input gradient): out[m] = a[m] @ w[e(m)].T, or with `transposed`
  a[m] @ w[e(m)]; a row tile never mixes experts.
- `expert_weight_gradient`: dW[e] = g[rows of e].T @ x[rows of e], reducing over each expert's rows
  in steps aligned to the 128-row tiles of the quantized transposes. A tile that spans two experts
  was scaled by the amax of both: its values still dequantize exactly, only less precisely.

Shape legend as in `grpo.models.fp8`: M rows, K reduction, N outputs, E experts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grpo.models import fp8_triton
from grpo.models.fp8 import T

BLOCK_M = 64


@triton.jit
def _expert_gemm_kernel(
    a_ptr,
    a_scale_ptr,
    w_ptr,
    w_scale_ptr,
    out_ptr,
    tile_expert_ptr,
    tile_start_ptr,
    tile_end_ptr,
    a_stride,
    a_scale_stride,
    w_stride_e,
    w_stride_out,
    w_stride_red,
    ws_stride_e,
    ws_stride_out,
    ws_stride_red,
    out_stride,
    n_out,
    reduction_blocks,
    BLOCK_M: tl.constexpr,
):
    """One (row tile, 128 output columns) of `a @ w_e`, with `w_e` addressed by strides so that the
    same kernel reads `w` (forward) or its transpose (input gradient)."""
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(tile_expert_ptr + tile)
    start, end = tl.load(tile_start_ptr + tile), tl.load(tile_end_ptr + tile)
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    outs = pid_n * 128 + tl.arange(0, 128)
    reds = tl.arange(0, 128)
    acc = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
    for kb in range(reduction_blocks):
        a = tl.load(
            a_ptr + rows[:, None] * a_stride + (kb * 128 + reds)[None, :], mask=row_ok[:, None], other=0.0
        )
        a_scale = tl.load(a_scale_ptr + kb * a_scale_stride + rows, mask=row_ok, other=0.0)
        w_at = (
            w_ptr
            + expert * w_stride_e
            + (kb * 128 + reds)[:, None] * w_stride_red
            + outs[None, :] * w_stride_out
        )
        w = tl.load(w_at)
        w_scale = tl.load(w_scale_ptr + expert * ws_stride_e + pid_n * ws_stride_out + kb * ws_stride_red)
        acc += tl.dot(a, w) * a_scale[:, None] * w_scale
    out_at = out_ptr + rows[:, None] * out_stride + outs[None, :]
    tl.store(out_at, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (outs[None, :] < n_out))


@triton.jit
def _weight_gradient_kernel(
    g_t_ptr,
    g_t_scale_ptr,
    x_t_ptr,
    x_t_scale_ptr,
    out_ptr,
    offsets_ptr,
    g_t_stride,
    g_t_scale_stride,
    x_t_stride,
    x_t_scale_stride,
    n_out,
    k_out,
):
    """One 128 x 128 block of dW[e] = sum over the expert's rows m of g.T[:, m] x.T[:, m].T."""
    expert, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    ns = pid_n * 128 + tl.arange(0, 128)
    ks = pid_k * 128 + tl.arange(0, 128)
    acc = tl.zeros((128, 128), dtype=tl.float32)
    for tile in range(start // 128, (end + 127) // 128):
        ms = tile * 128 + tl.arange(0, 128)
        mine = (ms >= start) & (ms < end)
        g = tl.load(g_t_ptr + ns[:, None] * g_t_stride + ms[None, :], mask=mine[None, :], other=0.0)
        x = tl.load(x_t_ptr + ks[None, :] * x_t_stride + ms[:, None], mask=mine[:, None], other=0.0)
        g_scale = tl.load(g_t_scale_ptr + tile * g_t_scale_stride + ns)
        x_scale = tl.load(x_t_scale_ptr + pid_k * x_t_scale_stride + tile)
        acc += tl.dot(g, x) * g_scale[:, None] * x_scale
    out_at = out_ptr + expert * n_out * k_out + ns[:, None] * k_out + ks[None, :]
    tl.store(out_at, acc.to(out_ptr.dtype.element_ty), mask=(ns[:, None] < n_out) & (ks[None, :] < k_out))


def _row_tiles(offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert, first row, end row) of every BLOCK_M-row tile; tiles never cross experts."""
    experts, starts, ends = [], [], []
    for expert, (start, end) in enumerate(zip([0, *offsets[:-1]], offsets)):
        for first in range(start, end, BLOCK_M):
            experts.append(expert)
            starts.append(first)
            ends.append(end)
    return torch.tensor(experts), torch.tensor(starts), torch.tensor(ends)


def expert_gemm(a_q, a_scale, w_q, w_scale, offsets: list[int], n: int, n_out: int, transposed: bool, dtype):
    """`a` (rows x reduction, 1 x 128 tiles, scales a column-major view) times each row's expert's
    weight: `w_q` holds the experts' `[n, K]` weights stacked, in 128 x 128 blocks (`w_scale` one
    row per 128 of them). The forward reduces over K (`transposed=False`, n_out = n), the input
    gradient over n (`transposed=True`, n_out = K)."""
    experts, rows = len(offsets), offsets[-1]
    tile_expert, tile_start, tile_end = (t.to(a_q.device) for t in _row_tiles(offsets))
    w_e = w_q[: experts * n].view(experts, n, w_q.shape[1])
    s_e = w_scale[: experts * n // T].view(experts, n // T, w_scale.shape[1])
    if transposed:  # reduce over n: the output columns run along K
        strides = (w_e.stride(0), w_e.stride(2), w_e.stride(1))
        scale_strides = (s_e.stride(0), s_e.stride(2), s_e.stride(1))
        reduction = n
    else:
        strides = (w_e.stride(0), w_e.stride(1), w_e.stride(2))
        scale_strides = (s_e.stride(0), s_e.stride(1), s_e.stride(2))
        reduction = w_q.shape[1]
    out = torch.empty(rows, n_out, dtype=dtype, device=a_q.device)
    if rows == 0:
        return out
    grid = (len(tile_expert), triton.cdiv(n_out, 128))
    _expert_gemm_kernel[grid](
        a_q,
        a_scale,
        w_e,
        s_e,
        out,
        tile_expert,
        tile_start,
        tile_end,
        a_q.stride(0),
        a_scale.stride(1),
        *strides,
        *scale_strides,
        out.stride(0),
        n_out,
        reduction // T,
        BLOCK_M=BLOCK_M,
    )
    return out


def expert_weight_gradient(
    g_t_q, g_t_scale, x_t_q, x_t_scale, offsets: list[int], n_out: int, k_out: int, dtype
):
    """dW `[E, N, K]` from the transposed quantized copies: `g.T` `[N', M']` in 1 x 128 tiles along
    M (scales a column-major view `[N', M'/128]`), `x.T` `[K', M']` in 128 x 128 blocks."""
    experts = len(offsets)
    out = torch.empty(experts, n_out, k_out, dtype=dtype, device=g_t_q.device)
    bounds = torch.tensor([0, *offsets], dtype=torch.int32, device=g_t_q.device)
    grid = (experts, triton.cdiv(n_out, 128), triton.cdiv(k_out, 128))
    _weight_gradient_kernel[grid](
        g_t_q,
        g_t_scale,
        x_t_q,
        x_t_scale,
        out,
        bounds,
        g_t_q.stride(0),
        g_t_scale.stride(1),
        x_t_q.stride(0),
        x_t_scale.stride(0),
        n_out,
        k_out,
    )
    return out


class GroupedFp8Function(torch.autograd.Function):
    """`x[rows of e] @ w[e].T` for every expert e, its three GEMMs grouped FP8 (`w` is `[E, N, K]`,
    N a multiple of 128; `offsets` as in `grpo.models.moe.grouped_linear`, a tuple of ints)."""

    @staticmethod
    def forward(ctx, x_MK, w_ENK, offsets: tuple[int, ...], power_of_two: bool = False):
        experts, n, k = w_ENK.shape
        xq, xs, xq_t, xs_t = fp8_triton.quantize_activation(x_MK, power_of_two)
        wq, ws = fp8_triton.quantize_weight_blocks(w_ENK.reshape(experts * n, k), power_of_two)
        ctx.save_for_backward(xq_t, xs_t, wq, ws)
        ctx.meta = (list(offsets), n, k, x_MK.dtype, power_of_two)
        return expert_gemm(xq, xs, wq, ws, list(offsets), n, n, False, x_MK.dtype)

    @staticmethod
    def backward(ctx, grad_MN):
        xq_t, xs_t, wq, ws = ctx.saved_tensors
        offsets, n, k, dtype, power_of_two = ctx.meta
        gq, gs, gq_t, gs_t = fp8_triton.quantize_output_grad(grad_MN, power_of_two)
        grad_x = expert_gemm(gq, gs, wq, ws, offsets, n, k, True, dtype)
        grad_w = expert_weight_gradient(gq_t, gs_t, xq_t, xs_t, offsets, n, k, dtype)
        return grad_x, grad_w, None, None
