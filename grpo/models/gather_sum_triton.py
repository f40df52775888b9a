"""The Triton kernel of `moe.gather_sum` (CUDA): each output row the sum of K gathered rows, in FP32,
rounded once, with no `[rows * K, H]` intermediate."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_COLUMNS = 1024


@triton.jit
def _gather_sum_kernel(
    src_ptr, index_ptr, out_ptr, cols, stride_src, stride_out, K: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = c < cols
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(K):  # in order: the sum rounds once, whatever K
        source = tl.load(index_ptr + row * K + k).to(tl.int64)
        acc += tl.load(src_ptr + source * stride_src + c, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + c, acc.to(out_ptr.dtype.element_ty), mask=inside)


def gather_sum_rows(src_RH: torch.Tensor, index_TK: torch.Tensor) -> torch.Tensor:
    """`out[t] = sum over k of src[index[t, k]]` (`index` contiguous, `src` unit stride along H)."""
    rows, k = index_TK.shape
    cols = src_RH.shape[1]
    out = src_RH.new_empty(rows, cols)
    if rows and cols:
        grid = (rows, triton.cdiv(cols, BLOCK_COLUMNS))
        _gather_sum_kernel[grid](
            src_RH, index_TK, out, cols, src_RH.stride(0), out.stride(0), K=k, BLOCK=BLOCK_COLUMNS
        )
    return out
