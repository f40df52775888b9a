"""The Triton kernels of `swiglu.weighted_swiglu` (CUDA): FP32 arithmetic, one rounding to the
activations' dtype per output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS, BLOCK_COLUMNS = 16, 256


@triton.jit
def _forward_kernel(
    gate_up_ptr,
    weights_ptr,
    out_ptr,
    rows,
    inter,
    stride_in,
    stride_out,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (r[:, None] < rows) & (c[None, :] < inter)
    at = gate_up_ptr + r[:, None].to(tl.int64) * stride_in + c[None, :]
    gate = tl.load(at, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(at + inter, mask=inside, other=0.0).to(tl.float32)
    weight = tl.load(weights_ptr + r, mask=r < rows, other=0.0).to(tl.float32)
    hidden = gate * tl.sigmoid(gate) * up * weight[:, None]
    out_at = out_ptr + r[:, None].to(tl.int64) * stride_out + c[None, :]
    tl.store(out_at, hidden.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _backward_kernel(
    grad_ptr, gate_up_ptr, weights_ptr, grad_gate_up_ptr, grad_weights_ptr,
    rows, inter, stride_grad, stride_in, stride_out,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """BLOCK_R rows, all their columns (chunk by chunk): the rows' weight gradients are whole sums
    of this program's, so no two programs add into one (the same result every run)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_inside = r < rows
    weight = tl.load(weights_ptr + r, mask=row_inside, other=0.0).to(tl.float32)
    grad_weight = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, inter, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        inside = row_inside[:, None] & (c[None, :] < inter)
        at = gate_up_ptr + r[:, None].to(tl.int64) * stride_in + c[None, :]
        gate = tl.load(at, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(at + inter, mask=inside, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + r[:, None].to(tl.int64) * stride_grad + c[None, :], mask=inside, other=0.0)
        grad = grad.to(tl.float32)
        sigmoid = tl.sigmoid(gate)
        silu = gate * sigmoid
        grad_weight += tl.sum(grad * silu * up, axis=1)
        scaled = grad * weight[:, None]
        grad_gate = scaled * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))
        out_at = grad_gate_up_ptr + r[:, None].to(tl.int64) * stride_out + c[None, :]
        dtype = grad_gate_up_ptr.dtype.element_ty
        tl.store(out_at, grad_gate.to(dtype), mask=inside)
        tl.store(out_at + inter, (scaled * silu).to(dtype), mask=inside)
    tl.store(grad_weights_ptr + r, grad_weight.to(grad_weights_ptr.dtype.element_ty), mask=row_inside)


def forward_rows(gate_up_NI2: torch.Tensor, weights_N: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up * weight` by the kernel: `[N, I]` in `gate_up`'s dtype."""
    rows, inter = gate_up_NI2.shape[0], gate_up_NI2.shape[1] // 2
    out = gate_up_NI2.new_empty(rows, inter)
    if rows:
        grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(inter, BLOCK_COLUMNS))
        _forward_kernel[grid](
            gate_up_NI2, weights_N, out, rows, inter, gate_up_NI2.stride(0), out.stride(0),
            BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLUMNS,
        )  # fmt: skip
    return out


def backward_rows(grad_NI: torch.Tensor, gate_up_NI2: torch.Tensor, weights_N: torch.Tensor):
    """The gradients of `forward_rows` by the kernel: `(grad_gate_up [N, 2I], grad_weights [N])`."""
    rows, inter = grad_NI.shape
    grad_gate_up = torch.empty_like(gate_up_NI2, memory_format=torch.contiguous_format)
    grad_weights = torch.empty_like(weights_N)
    if rows:
        _backward_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
            grad_NI, gate_up_NI2, weights_N, grad_gate_up, grad_weights,
            rows, inter, grad_NI.stride(0), gate_up_NI2.stride(0), grad_gate_up.stride(0),
            BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLUMNS,
        )  # fmt: skip
    return grad_gate_up, grad_weights
