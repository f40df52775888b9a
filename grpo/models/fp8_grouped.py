"""Grouped blockwise FP8 GEMMs for the routed experts (Triton): all experts in one launch per GEMM.

`grpo.models.moe.grouped_linear` runs the FP8 experts through `grouped_fp8` on CUDA (the
per-expert loop of `fp8_linear` stays for other devices and for shapes these kernels do not
take). On Hopper, where DeepGEMM loads, the forward and input gradient of large experts run through
it instead (`fp8_grouped_deep_gemm`), and the weight gradient over its padded rows runs through
`fp8_grouped_tma` (bulk tensor copies, which need every row tile within one expert).
Checked in Triton's CPU interpreter (`tests/test_fp8_grouped.py`) and on the GPU
(`benchmarks/fp8_grouped_gpu.py`, `benchmarks/moe_layer_gpu.py`; figures and the versions tried in
`benchmarks/results/fp8_grouped_h100.txt`).

Rows of `x` are sorted by expert (expert e owns rows `ends[e-1]:ends[e]`, any length; `ends` stays
on the device and the host never reads it, so the layer costs no host sync). Operands
come from the fused quantizers of `fp8_triton`: activations and output gradients in 1 x 128 tiles
along the reduction, their transposes for the weight gradient, weights `[E, N, K]` as one `[E*N, K]`
matrix in 128 x 128 blocks (N a multiple of 128, so that no block spans two experts).

- `expert_gemm` (forward and input gradient): out[m] = a[m] @ B_e(m), where `ExpertWeights` says
  how B_e is read from the quantized weight: `w_e.T` (forward) or `w_e` (input gradient), the
  latter from the transposed copy of the stacked weight, so that both GEMMs read their right
  operand with the reduction contiguous (what Hopper's FP8 tensor-core instructions take). A row
  tile never mixes experts.
- `expert_weight_gradient`: dW[e] = g[rows of e].T @ x[rows of e], reducing over each expert's rows
  in steps aligned to the 128-row tiles of the quantized transposes. A tile that spans two experts
  was scaled by the amax of both: its values still dequantize exactly, only less precisely.

Both kernels order their programs so that the operands a wave of programs shares stay in L2: a
group of row tiles sweeps all output columns before the next group starts (the forward), and one
expert's weight-gradient blocks run together.

Shape legend as in `grpo.models.fp8`: M rows, K reduction, N outputs, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from grpo.models import fp8_triton, fused_grad_accumulation
from grpo.models.fp8 import T, backward_can_follow, transposed_weight_blocks, weight_blocks


@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 64
    """Rows per program (a program never spans two experts, so small experts waste less)."""
    group: int = 8
    """Row tiles that sweep the output columns together (their rows stay in L2 meanwhile)."""
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class WeightGradientConfig:
    block_n: int = 64
    """Rows of dW[e] per program (of g.T; a power of two dividing 512, the copies' padding)."""
    block_k: int = 128
    """Columns of dW[e] per program (of x.T; likewise)."""
    num_warps: int = 4
    num_stages: int = 3


# the fastest of the configurations `benchmarks/fp8_grouped_gpu.py` and (the weight gradient's)
# `benchmarks/probe_weight_gradient_configs_gpu.py` tried on the H100
DEFAULT = GemmConfig()
WEIGHT_GRADIENT = WeightGradientConfig()


@triton.jit
def _expert_gemm_kernel(
    a_ptr,
    a_scale_ptr,
    w_ptr,
    w_scale_ptr,
    out_ptr,
    ends_ptr,
    experts,
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
    GROUP: tl.constexpr,
    EXPERTS: tl.constexpr,
):
    """One (row tile, 128 output columns) of `a @ B_e`; B_e[r, o] = w[e * stride_e + o * stride_out
    + r * stride_red], its scale likewise per 128 x 128 block.

    The row tiles are found here, from the experts' row ends on the device (expert e's rows in
    ceil(rows_e / BLOCK_M) tiles, in expert order): the host never needs the routing, so the layer
    queues its work without waiting for the GPU. The grid has room for the most tiles any routing of
    these rows can make; programs past the actual tiles return at once."""
    pid = tl.program_id(0)
    es = tl.arange(0, EXPERTS)
    ends = tl.load(ends_ptr + es, mask=es < experts, other=0)
    starts = tl.load(ends_ptr + es - 1, mask=(es > 0) & (es < experts), other=0)
    tiles_of = tl.where(es < experts, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    tiles_through = tl.cumsum(tiles_of, axis=0)
    n_tiles = tl.sum(tiles_of, axis=0)
    col_blocks = tl.cdiv(n_out, 128)
    per_group = GROUP * col_blocks
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_tiles - first, GROUP)
    if (first >= n_tiles) | (pid % per_group >= size * col_blocks):
        return
    tile = first + (pid % per_group) % size
    pid_n = (pid % per_group) // size
    expert = tl.sum((tiles_through <= tile).to(tl.int32), axis=0)
    mine = es == expert
    start = tl.sum(tl.where(mine, starts + (tile - tiles_through + tiles_of) * BLOCK_M, 0), axis=0)
    end = tl.sum(tl.where(mine, ends, 0), axis=0)
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    outs = pid_n * 128 + tl.arange(0, 128)
    reds = tl.arange(0, 128)
    w_base = w_ptr + expert * w_stride_e
    ws_base = w_scale_ptr + expert * ws_stride_e + pid_n * ws_stride_out
    acc = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
    for kb in range(reduction_blocks):
        a = tl.load(
            a_ptr + rows[:, None] * a_stride + (kb * 128 + reds)[None, :], mask=row_ok[:, None], other=0.0
        )
        a_scale = tl.load(a_scale_ptr + kb * a_scale_stride + rows, mask=row_ok, other=0.0)
        w = tl.load(w_base + (kb * 128 + reds)[:, None] * w_stride_red + outs[None, :] * w_stride_out)
        w_scale = tl.load(ws_base + kb * ws_stride_red)
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
    ends_ptr,
    g_t_stride,
    g_t_scale_stride,
    x_t_stride,
    x_t_scale_stride,
    n_out,
    k_out,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    """One BLOCK_N x BLOCK_K block of dW[e] = sum over the expert's rows m of g.T[:, m] x.T[:, m].T,
    stored, or with ACCUMULATE added to what `out` holds. The expert is the slowest index: one
    expert's rows of g.T and x.T are read while they sit in L2.

    Loads are never masked along the rows, which are also the contiguous dimension: such a mask
    turns them into single-byte accesses (H100, 64 experts of 4096 x 7168, 512 rows each: every tile
    masked 15.8 ms, only the edge tiles an expert shares with a neighbour 9.0 ms, none 6.1 ms). Whole
    tiles stream into shared memory as they are; in an edge tile the neighbour's rows of g.T are
    zeroed after the load (one zeroed operand suffices; the copies are zero-padded past the last row)."""
    pid = tl.program_id(0)
    n_blocks, k_blocks = tl.cdiv(n_out, BLOCK_N), tl.cdiv(k_out, BLOCK_K)
    expert = pid // (n_blocks * k_blocks)
    pid_n = (pid % (n_blocks * k_blocks)) // k_blocks
    pid_k = pid % k_blocks
    start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(ends_ptr + expert)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    g_at = g_t_ptr + ns[:, None] * g_t_stride
    x_at = x_t_ptr + ks[None, :] * x_t_stride
    x_scale_at = x_t_scale_ptr + (ks // 128) * x_t_scale_stride  # x.T's scales: per 128 x 128 block
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    whole_from, whole_to = (start + 127) // 128, end // 128
    for tile in range(whole_from, whole_to):
        ms = tile * 128 + tl.arange(0, 128)
        g = tl.load(g_at + ms[None, :])
        x = tl.load(x_at + ms[:, None])
        g_scale = tl.load(g_t_scale_ptr + tile * g_t_scale_stride + ns)
        x_scale = tl.load(x_scale_at + tile)
        acc += tl.dot(g, x) * g_scale[:, None] * x_scale[None, :]
    for tile in range(start // 128, (end + 127) // 128):
        if (tile < whole_from) | (tile >= whole_to):
            ms = tile * 128 + tl.arange(0, 128)
            mine = (ms >= start) & (ms < end)
            g = tl.load(g_at + ms[None, :])
            g = tl.where(mine[None, :], g, tl.zeros_like(g))
            x = tl.load(x_at + ms[:, None])
            g_scale = tl.load(g_t_scale_ptr + tile * g_t_scale_stride + ns)
            x_scale = tl.load(x_scale_at + tile)
            acc += tl.dot(g, x) * g_scale[:, None] * x_scale[None, :]
    out_at = out_ptr + expert * n_out * k_out + ns[:, None] * k_out + ks[None, :]
    inside = (ns[:, None] < n_out) & (ks[None, :] < k_out)
    if ACCUMULATE:  # read at the end: reading it before the loop measured no faster (H100)
        acc += tl.load(out_at, mask=inside).to(tl.float32)
    tl.store(out_at, acc.to(out_ptr.dtype.element_ty), mask=inside)


@dataclass(frozen=True)
class ExpertWeights:
    """Quantized expert weights as `expert_gemm` reads them: B_e[r, o] at `q` offset
    `e * strides[0] + o * strides[1] + r * strides[2]`, its block scale at `scale` offset
    `e * scale_strides[0] + (o // 128) * scale_strides[1] + (r // 128) * scale_strides[2]`."""

    q: torch.Tensor
    scale: torch.Tensor
    strides: tuple[int, int, int]
    scale_strides: tuple[int, int, int]
    reduction: int
    outputs: int

    @classmethod
    def forward(cls, q_NK, scale_IJ, n: int, k: int) -> ExpertWeights:
        """B_e = w_e.T from the stacked `[E*N, K]` weight in blocks (reduces over K)."""
        return cls(
            q_NK,
            scale_IJ,
            (n * q_NK.stride(0), q_NK.stride(0), 1),
            (n // T * scale_IJ.stride(0), scale_IJ.stride(0), 1),
            reduction=k,
            outputs=n,
        )

    @classmethod
    def input_gradient(cls, q_KN, scale_JI, n: int, k: int) -> ExpertWeights:
        """B_e = w_e from the transposed copy `[K, E*N]` in blocks (reduces over N)."""
        return cls(
            q_KN,
            scale_JI,
            (n, q_KN.stride(0), 1),
            (n // T, scale_JI.stride(0), 1),
            reduction=n,
            outputs=k,
        )


def expert_gemm(
    a_q, a_scale, weights: ExpertWeights, ends_E: torch.Tensor, rows: int, dtype, config: GemmConfig = DEFAULT
) -> torch.Tensor:
    """`a` (rows x reduction in 1 x 128 tiles, scales a column-major view) times each row's expert's
    B_e: `[rows, weights.outputs]` in `dtype`. Expert e owns rows `ends_E[e-1]:ends_E[e]` (int32, on
    the device; `ends_E[-1]` = rows)."""
    n_out, experts = weights.outputs, ends_E.numel()
    out = torch.empty(rows, n_out, dtype=dtype, device=a_q.device)
    if rows == 0:
        return out
    most_tiles = triton.cdiv(rows, config.block_m) + experts  # each expert adds at most one partial tile
    _expert_gemm_kernel[(most_tiles * triton.cdiv(n_out, 128),)](
        a_q,
        a_scale,
        weights.q,
        weights.scale,
        out,
        ends_E,
        experts,
        a_q.stride(0),
        a_scale.stride(1),
        *weights.strides,
        *weights.scale_strides,
        out.stride(0),
        n_out,
        triton.cdiv(weights.reduction, T),
        BLOCK_M=config.block_m,
        GROUP=config.group,
        EXPERTS=triton.next_power_of_2(experts),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def weight_gradient_output(shape_ENK: tuple[int, int, int], dtype, device, into: torch.Tensor | None):
    """Where a weight-gradient kernel writes dW: `into` (which it adds into; a contiguous tensor of
    that shape), or a new tensor."""
    if into is None:
        return torch.empty(shape_ENK, dtype=dtype, device=device)
    assert into.shape == shape_ENK and into.is_contiguous(), "into: a contiguous [E, N, K]"
    return into


def expert_weight_gradient(
    g_t_q,
    g_t_scale,
    x_t_q,
    x_t_scale,
    ends_E: torch.Tensor,
    n_out: int,
    k_out: int,
    dtype,
    config: WeightGradientConfig = WEIGHT_GRADIENT,
    into: torch.Tensor | None = None,
):
    """dW `[E, N, K]` from the transposed quantized copies: `g.T` `[N', M']` in 1 x 128 tiles along
    M (scales a column-major view `[N', M'/128]`), `x.T` `[K', M']` in 128 x 128 blocks; expert e's
    rows `ends_E[e-1]:ends_E[e]` as in `expert_gemm`. With `into` (contiguous `[E, N, K]`, any float
    dtype) dW is added into it in FP32, and `into` returned."""
    experts = ends_E.numel()
    out = weight_gradient_output((experts, n_out, k_out), dtype, g_t_q.device, into)
    grid = (experts * triton.cdiv(n_out, config.block_n) * triton.cdiv(k_out, config.block_k),)
    _weight_gradient_kernel[grid](
        g_t_q,
        g_t_scale,
        x_t_q,
        x_t_scale,
        out,
        ends_E,
        g_t_q.stride(0),
        g_t_scale.stride(1),
        x_t_q.stride(0),
        x_t_scale.stride(0),
        n_out,
        k_out,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        ACCUMULATE=into is not None,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def weight_gradient_for_autograd(ctx, *operands, kernel=None) -> torch.Tensor | None:
    """What an expert autograd function's backward returns for the weight (`ctx.weight`, input 1):
    None where no gradient is wanted, or where `kernel` (`expert_weight_gradient` unless given: one
    with its signature) added it into the weight's `.grad` (`fused_grad_accumulation`); otherwise
    the gradient. `operands`: those of `expert_weight_gradient`, `g.T` to `dtype`."""
    if not ctx.needs_input_grad[1]:
        return None
    into = fused_grad_accumulation.grad_to_add_into(ctx.weight)
    grad_w = (kernel or expert_weight_gradient)(*operands, into=into)
    return None if into is not None else grad_w


KIND = "expert blocks"
"""What the experts' copies are kept as in `fp8_weight_cache`."""


def quantize_expert_weights(w_ENK: torch.Tensor, power_of_two: bool = False, input_gradient: bool = True):
    """`(forward, input_gradient)` `ExpertWeights` of `w`: the stacked weight in blocks, and (unless
    `input_gradient` is False, then None) its transpose (`fp8.weight_blocks`,
    `fp8.transposed_weight_blocks`), both reused while `w` is unchanged inside
    `fp8_weight_cache.reuse_quantized_weights`."""
    experts, n, k = w_ENK.shape
    blocks = weight_blocks(w_ENK, power_of_two, KIND, source=w_ENK.reshape(experts * n, k))
    forward = ExpertWeights.forward(*blocks, n, k)
    if not input_gradient:
        return forward, None
    transposed = transposed_weight_blocks(w_ENK, power_of_two, blocks, KIND)
    return forward, ExpertWeights.input_gradient(*transposed, n, k)


def grouped_fp8(x_MK, w_ENK, ends_E: torch.Tensor, power_of_two: bool = False) -> torch.Tensor:
    """`x[rows of e] @ w[e].T` for every expert e in FP8 (`ends_E` as in `expert_gemm`): through the
    autograd function when a backward can follow, else the forward alone (a logprob pass), which
    quantizes neither `x.T` nor the transposed weights. Where DeepGEMM runs these experts
    (`fp8_grouped_deep_gemm.library_for`), the forward and input gradient are its grouped GEMMs."""
    from grpo.models import fp8_grouped_deep_gemm as deep  # it imports this module

    library = deep.library_for(x_MK, w_ENK)
    if library is not None:
        return deep.grouped_fp8_packed(library, x_MK, w_ENK, ends_E, power_of_two)
    if backward_can_follow(x_MK, w_ENK):
        return GroupedFp8Function.apply(x_MK, w_ENK, ends_E, power_of_two)
    xq, xs = fp8_triton.quantize_activation_rows(x_MK, power_of_two)
    forward, _ = quantize_expert_weights(w_ENK, power_of_two, input_gradient=False)
    return expert_gemm(xq, xs, forward, ends_E, x_MK.shape[0], x_MK.dtype)


class GroupedFp8Function(torch.autograd.Function):
    """The three GEMMs of `grouped_fp8`, grouped FP8 (`w` is `[E, N, K]`, N a multiple of 128;
    `ends_E` as in `expert_gemm`)."""

    @staticmethod
    def forward(ctx, x_MK, w_ENK, ends_E: torch.Tensor, power_of_two: bool = False):
        xq, xs, xq_t, xs_t = fp8_triton.quantize_activation(x_MK, power_of_two)
        forward, input_gradient = quantize_expert_weights(w_ENK, power_of_two)
        ctx.save_for_backward(xq_t, xs_t, input_gradient.q, input_gradient.scale, ends_E)
        ctx.weight = w_ENK if w_ENK.is_leaf else None  # a parameter: no reference cycle
        _, n, k = w_ENK.shape
        ctx.meta = (x_MK.shape[0], n, k, x_MK.dtype, power_of_two)
        return expert_gemm(xq, xs, forward, ends_E, x_MK.shape[0], x_MK.dtype)

    @staticmethod
    def backward(ctx, grad_MN):
        xq_t, xs_t, wq_KN, ws_JI, ends_E = ctx.saved_tensors
        rows, n, k, dtype, power_of_two = ctx.meta
        gq, gs, gq_t, gs_t = fp8_triton.quantize_output_grad(grad_MN, power_of_two)
        weights = ExpertWeights.input_gradient(wq_KN, ws_JI, n, k)
        grad_x = expert_gemm(gq, gs, weights, ends_E, rows, dtype)
        grad_w = weight_gradient_for_autograd(ctx, gq_t, gs_t, xq_t, xs_t, ends_E, n, k, dtype)
        return grad_x, grad_w, None, None
