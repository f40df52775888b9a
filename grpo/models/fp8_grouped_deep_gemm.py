"""The routed experts' forward and input-gradient GEMMs through DeepGEMM's m-grouped FP8 GEMM, on
Hopper where DeepGEMM loads (`fp8_deep_gemm`); the weight gradient is a Triton kernel
(`fp8_grouped_tma`, which the padded layout's whole row tiles let move its tiles in bulk).

DeepGEMM's grouped GEMM wants each expert's rows to start at a multiple of 128 (`ALIGNMENT`), with
`layout[row]` naming the row's expert (-1 for padding): a `PaddedLayout`. Its size is the bound
`rows + experts * 127`, known without reading the expert counts on the host; DeepGEMM skips the
arithmetic of the blocks that belong to no expert (2.5.0 still writes them, as zeros). Whatever the
padding rows hold, the quantizers read them as zeros (`fp8_triton`'s `layout` argument), so they add
nothing to the weight gradient and change no scale; nothing relies on what the padding rows of an
output hold.

- `grouped_fp8_padded`: rows already in the padded layout. `moe.GroupedExperts` dispatches the tokens
  straight into it (its gathers take padded indices), so the layer makes no copies for it.
- `grouped_fp8_packed`: rows packed (the expert-parallel path, where rows arrive from other ranks):
  copied into the layout and gathered back.

Under `auto` both take DeepGEMM only for experts at least as large as measured (`SMALLEST_SIDE`).

On an H100, at DeepSeek-V3's expert shapes, DeepGEMM ran these two GEMMs at 1,050-1,100 TFLOP/s
against 530-640 for the Triton kernel (`benchmarks/results/deep_gemm_probe_h100.txt`). Its weight
gradient (k-grouped) adds into an FP32 buffer only, which at these shapes made it slower than the
Triton kernel's BF16 output; so that one is not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from grpo.models import fp8_deep_gemm, fp8_triton
from grpo.models.fp8 import backward_can_follow, transposed_weight_blocks, trimmed, weight_blocks
from grpo.models.fp8_grouped import weight_gradient_for_autograd
from grpo.models.fp8_grouped_tma import padded_expert_weight_gradient

ALIGNMENT = 128
SMALLEST_SIDE = 512
"""Under `GRPO_DEEP_GEMM=auto`, experts go through DeepGEMM only where both sides of their weights are
at least this: the smallest measured. On the H100 (`benchmarks/results/moe_layer_h100.txt`) the FP8
layer step at DeepSeek-V3's expert shape (7168 -> 2048, 64 experts) went from 35.4 to 30.5 ms. At the
H100 recipe's (1024 -> 512, 32 experts), whose step waits on the host, it was slower (3.7-4.0 against
4.3-4.6 ms, session 10) until the padded layout became one kernel (`_padded_layout_kernel`, 57-67
instead of 219-343 us of host time); since then it is as fast or faster (3.48-3.56 against 3.66-3.95
ms in four runs each of `probe_moe_host_cost_gpu.py`, session 11). Smaller experts were not measured."""


def library_for(x: torch.Tensor, *weights_ENK: torch.Tensor):
    """DeepGEMM where these experts' GEMMs run through it (`fp8_deep_gemm.library`, and under `auto`
    experts of at least SMALLEST_SIDE; output sides whole 128-row blocks, so that no weight block
    spans two experts), else None."""
    if not all(w.shape[1] % 128 == 0 for w in weights_ENK):
        return None
    if fp8_deep_gemm.mode == "auto" and min(min(w.shape[1:]) for w in weights_ENK) < SMALLEST_SIDE:
        return None
    return fp8_deep_gemm.library(x.device)


@triton.jit
def _padded_layout_kernel(
    ends_ptr, experts, size, layout_ptr, destination_ptr, padded_ends_ptr,
    BLOCK: tl.constexpr, EXPERTS: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """`PaddedLayout.of` for BLOCK padded rows: each program reads all experts' row ends (few), finds
    each padded row's expert and place, and writes its layout entry and, for a real row, the packed
    row's destination; program 0 also writes the padded ends."""
    e = tl.arange(0, EXPERTS)
    ends = tl.load(ends_ptr + e, mask=e < experts, other=0)
    total = tl.max(ends, axis=0)
    ends = tl.where(e < experts, ends, total)  # experts past the last own no rows
    starts = tl.load(ends_ptr + e - 1, mask=(e >= 1) & (e < experts), other=0)
    starts = tl.where(e < experts, starts, total)
    counts = ends - starts
    padded_counts = (counts + ALIGN - 1) // ALIGN * ALIGN
    padded_ends = tl.cumsum(padded_counts, axis=0)
    padded_starts = padded_ends - padded_counts
    if tl.program_id(0) == 0:
        tl.store(padded_ends_ptr + e, padded_ends, mask=e < experts)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    owner = tl.sum(((padded_ends[None, :] <= p[:, None]) & (e[None, :] < experts)).to(tl.int32), axis=1)
    mine = owner[:, None] == e[None, :]
    offset = p - tl.sum(tl.where(mine, padded_starts[None, :], 0), axis=1)
    real = (owner < experts) & (offset < tl.sum(tl.where(mine, counts[None, :], 0), axis=1))
    tl.store(layout_ptr + p, tl.where(real, owner, -1), mask=p < size)
    packed = tl.sum(tl.where(mine, starts[None, :], 0), axis=1) + offset
    tl.store(destination_ptr + packed, p.to(tl.int64), mask=real & (p < size))


def padded_size(rows: int, experts: int) -> int:
    """Padded rows enough for any split of `rows` among `experts`: each pads at most 127 rows."""
    return -(-(rows + experts * (ALIGNMENT - 1)) // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class PaddedLayout:
    destination_N: torch.Tensor
    """The padded row of each packed row (rows sorted by expert), int64."""
    layout_P: torch.Tensor
    """Each padded row's expert, -1 for padding (int32): DeepGEMM's `grouped_layout`."""
    padded_ends_E: torch.Tensor
    """Expert e owns padded rows `padded_ends_E[e-1]:padded_ends_E[e]` (int32)."""

    @classmethod
    def of(cls, ends_E: torch.Tensor, rows: int) -> PaddedLayout:
        """The layout of `rows` rows sorted by expert (expert e owns `ends_E[e-1]:ends_E[e]`), all on
        the device: nothing here waits for the GPU. On CUDA one Triton launch (`by_kernel`): at the
        H100 recipe's shape the PyTorch ops below took 219-343 us of host time per call, the kernel
        57-67 us (`benchmarks/probe_moe_host_cost_gpu.py`)."""
        if ends_E.is_cuda:
            return cls.by_kernel(ends_E, rows)
        experts = ends_E.numel()
        counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
        padded_E = (counts_E + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
        padded_ends_E = padded_E.cumsum(0, dtype=torch.int32)
        shift_E = (padded_ends_E - padded_E) - (ends_E - counts_E)  # padded start - packed start
        row_N = torch.arange(rows, device=ends_E.device, dtype=ends_E.dtype)
        expert_N = torch.searchsorted(ends_E, row_N, right=True)
        destination_N = (row_N + shift_E[expert_N]).long()
        size = padded_size(rows, experts)
        layout_P = torch.full((size,), -1, device=ends_E.device, dtype=torch.int32)
        layout_P[destination_N] = expert_N.int()
        return cls(destination_N, layout_P, padded_ends_E)

    @classmethod
    def by_kernel(cls, ends_E: torch.Tensor, rows: int) -> PaddedLayout:
        """`of` in one launch of `_padded_layout_kernel`."""
        experts = ends_E.numel()
        size = padded_size(rows, experts)
        device = ends_E.device
        layout_P = torch.empty(size, device=device, dtype=torch.int32)
        destination_N = torch.empty(rows, device=device, dtype=torch.int64)
        padded_ends_E = torch.empty(experts, device=device, dtype=torch.int32)
        # each program compares its BLOCK rows with every expert: at most 16 K pairs (the H100 ran 256
        # rows x 64 experts); more experts, fewer rows per program
        experts_pow2 = triton.next_power_of_2(experts)
        block = min(256, 16384 // experts_pow2)
        _padded_layout_kernel[(triton.cdiv(size, block),)](
            ends_E, experts, size, layout_P, destination_N, padded_ends_E,
            BLOCK=block, EXPERTS=experts_pow2, ALIGN=ALIGNMENT,
        )  # fmt: skip
        return cls(destination_N, layout_P, padded_ends_E)

    @property
    def size(self) -> int:
        return self.layout_P.shape[0]

    def padded_index(self, packed_N: torch.Tensor) -> torch.Tensor:
        """A per-row index of the packed rows laid out as the padded rows (padding rows: 0)."""
        return packed_N.new_zeros(self.size).index_copy_(0, self.destination_N, packed_N)


KIND = "deep_gemm expert blocks"
"""What these experts' copies are kept as in `fp8_weight_cache`."""


def expert_weights(w_ENK: torch.Tensor, power_of_two: bool):
    """`w` per expert in 128 x 128 blocks, `[E, N', K']` (the forward's), reused while `w` is
    unchanged inside `fp8_weight_cache.reuse_quantized_weights`."""
    return weight_blocks(w_ENK, power_of_two, KIND)


def grouped_gemm(library, a_q, a_scale, weights, layout_P: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    w_q, w_scale = weights
    out = torch.empty(layout_P.shape[0], w_q.shape[1], dtype=dtype, device=a_q.device)
    fp8_deep_gemm.use_settings(library, None)
    library.m_grouped_fp8_gemm_nt_contiguous((a_q, a_scale), (w_q, w_scale), out, layout_P)
    return out


def grouped_fp8_padded(library, x_PK, w_ENK, layout: PaddedLayout, power_of_two: bool = False):
    """`x[rows of e] @ w[e].T` for rows in `layout` (the output's padding rows are not to be relied
    on): through the autograd function when a backward can follow, else the forward alone (a
    logprob pass), which quantizes neither `x.T` nor the transposed weights."""
    if backward_can_follow(x_PK, w_ENK):
        return PaddedFp8Function.apply(
            x_PK, w_ENK, layout.layout_P, layout.padded_ends_E, power_of_two, library
        )
    xq, xs = fp8_triton.quantize_activation_rows(x_PK, power_of_two, layout.layout_P)
    weights = expert_weights(w_ENK, power_of_two)
    return trimmed(
        grouped_gemm(library, xq, xs, weights, layout.layout_P, x_PK.dtype), layout.size, w_ENK.shape[1]
    )


def grouped_fp8_packed(library, x_MK, w_ENK, ends_E: torch.Tensor, power_of_two: bool = False):
    """`grouped_fp8_padded` for rows packed by expert (`ends_E` as in `fp8_grouped.expert_gemm`):
    copied into the padded layout, the outputs gathered back."""
    layout = PaddedLayout.of(ends_E, x_MK.shape[0])
    x_PK = x_MK.new_empty(layout.size, x_MK.shape[1]).index_copy(0, layout.destination_N, x_MK)
    return grouped_fp8_padded(library, x_PK, w_ENK, layout, power_of_two).index_select(
        0, layout.destination_N
    )


class PaddedFp8Function(torch.autograd.Function):
    """`fp8_grouped.GroupedFp8Function` on padded rows, its forward and input gradient through
    DeepGEMM; the weight gradient is `fp8_grouped_tma`'s kernel over each expert's padded rows."""

    @staticmethod
    def forward(ctx, x_PK, w_ENK, layout_P, padded_ends_E, power_of_two: bool, library):
        xq, xs, xq_t, xs_t = fp8_triton.quantize_activation(x_PK, power_of_two, layout_P)
        weights = expert_weights(w_ENK, power_of_two)
        # w_e.T `[E, K', N']` for the input gradient, so that both GEMMs read the reduction contiguous
        weights_t = transposed_weight_blocks(w_ENK, power_of_two, weights, KIND)
        ctx.save_for_backward(xq_t, xs_t, *weights_t, layout_P, padded_ends_E)
        ctx.weight = w_ENK if w_ENK.is_leaf else None  # a parameter: no reference cycle
        ctx.meta = (library, w_ENK.shape[1], x_PK.shape[1], x_PK.dtype, power_of_two)
        y_PN = grouped_gemm(library, xq, xs, weights, layout_P, x_PK.dtype)
        return trimmed(y_PN, x_PK.shape[0], w_ENK.shape[1])

    @staticmethod
    def backward(ctx, grad_PN):
        xq_t, xs_t, wq_t, ws_t, layout_P, padded_ends_E = ctx.saved_tensors
        library, n, k, dtype, power_of_two = ctx.meta
        gq, gs, gq_t, gs_t = fp8_triton.quantize_output_grad(grad_PN.to(dtype), power_of_two, layout_P)
        grad_x = trimmed(grouped_gemm(library, gq, gs, (wq_t, ws_t), layout_P, dtype), layout_P.shape[0], k)
        grad_w = weight_gradient_for_autograd(
            ctx, gq_t, gs_t, xq_t, xs_t, padded_ends_E, n, k, dtype, kernel=padded_expert_weight_gradient
        )
        return grad_x, grad_w, None, None, None, None
