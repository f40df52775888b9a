"""The routed experts' FP8 weight gradient on rows laid out in whole 128-row tiles (the padded layout
of `fp8_grouped_deep_gemm`), on Hopper: `fp8_grouped`'s sum, in a persistent kernel whose tiles move
through the tensor memory accelerator (TMA).

At DeepSeek-V3's expert shape (512 rows an expert) the weight gradient is nearly half of the FP8
experts' step, and `fp8_grouped._weight_gradient_kernel` runs it at about a third of the rate
DeepGEMM reaches in the experts' other two GEMMs: each 128 x 128 block of dW[e] reduces over only
four row tiles, so a program spends most of its life loading its first tiles and storing its block. Here one program per SM walks the blocks;
Triton pipelines the walk as one loop, so the next block's tiles load (one bulk copy each) while
this block's products run and its result leaves by a bulk store, or, into an existing `.grad`, by a
bulk reduction: the copy engine adds the block, rounded to the gradient's dtype, into `.grad` (two
roundings, as autograd's own accumulation; `fp8_grouped`'s kernel adds in FP32 and rounds once).

The same products in the same order as `fp8_grouped`'s kernel, so a stored dW is the same bit for
bit. Measured on an H100 at DeepSeek-V3's experts, 64 x 512 rows (`benchmarks/probe_weight_gradient_tma_gpu.py`,
session 23): added into a BF16 `.grad` 4.64-4.67 ms against 5.57-5.67 (gate and up, 7168 -> 4096)
and 2.67-2.68 against 2.85-2.87 (down, 2048 -> 7168); stored 3.76-3.79 against 4.38-4.50 and
2.12-2.13 against 2.30-2.32. Rows whose tiles span two experts (the packed layout of
`fp8_grouped`) keep that module's kernel, which zeroes the neighbour's rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grpo.models.fp8_grouped import expert_weight_gradient, weight_gradient_output

BLOCK = 128
"""dW's blocks are BLOCK x BLOCK: the fastest of 64 x 128, 128 x 128 and 128 x 256 (the probe)."""
WARPS, STAGES, PROGRAMS_PER_SM = 8, 3, 1


@triton.jit
def _weight_gradient_kernel(
    g_desc,
    g_t_scale_ptr,
    x_desc,
    x_t_scale_ptr,
    out_desc,
    ends_ptr,
    g_t_scale_stride,
    x_t_scale_stride,
    n_out,
    k_out,
    experts,
    PROGRAMS: tl.constexpr,
    ADD: tl.constexpr,
):
    """Blocks `PROGRAMS` apart, expert by expert (one expert's rows of g.T and x.T are read while
    they sit in L2): dW[e]'s 128 x 128 block = sum over the expert's row tiles of g.T's tile (1 x
    128 scales) times x.T's (one 128 x 128 block scale), stored into `out` or, with `ADD`, reduced into it."""
    n_blocks, k_blocks = tl.cdiv(n_out, 128), tl.cdiv(k_out, 128)
    for block in tl.range(tl.program_id(0), experts * n_blocks * k_blocks, PROGRAMS, flatten=True):
        expert = block // (n_blocks * k_blocks)
        n0 = (block % (n_blocks * k_blocks)) // k_blocks * 128
        k0 = block % k_blocks * 128
        start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0)
        end = tl.load(ends_ptr + expert)
        g_scale_at = g_t_scale_ptr + n0 + tl.arange(0, 128)
        x_scale_at = x_t_scale_ptr + k0 // 128 * x_t_scale_stride
        acc = tl.zeros((128, 128), dtype=tl.float32)
        for tile in range(start // 128, end // 128):
            g = g_desc.load([n0, tile * 128])
            x = x_desc.load([k0, tile * 128])
            g_scale = tl.load(g_scale_at + tile * g_t_scale_stride)
            acc += tl.dot(g, tl.trans(x)) * g_scale[:, None] * tl.load(x_scale_at + tile)
        value = acc.to(out_desc.dtype).reshape(1, 128, 128)
        if ADD:
            out_desc.atomic_add([expert, n0, k0], value)
        else:
            out_desc.store([expert, n0, k0], value)


def launch(g_t_q, g_t_scale, x_t_q, x_t_scale, padded_ends_E, out: torch.Tensor, add: bool, programs: int):
    """The kernel on `expert_weight_gradient`'s operands (every expert's rows whole 128-row tiles),
    dW stored into `out` `[E, N, K]` or, with `add`, added into it; `programs` of them."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    experts, n_out, k_out = out.shape
    blocks = experts * triton.cdiv(n_out, BLOCK) * triton.cdiv(k_out, BLOCK)
    programs = max(1, min(programs, blocks))
    _weight_gradient_kernel[(programs,)](
        TensorDescriptor.from_tensor(g_t_q, [BLOCK, BLOCK]),
        g_t_scale,
        TensorDescriptor.from_tensor(x_t_q, [BLOCK, BLOCK]),
        x_t_scale,
        TensorDescriptor.from_tensor(out, [1, BLOCK, BLOCK]),
        padded_ends_E,
        g_t_scale.stride(1),
        x_t_scale.stride(0),
        n_out,
        k_out,
        experts,
        PROGRAMS=programs,
        ADD=add,
        num_warps=WARPS,
        num_stages=STAGES,
    )
    return out


def _runs_here(device: torch.device, k_out: int, dtype: torch.dtype) -> bool:
    """A CUDA card with a TMA (compute capability 9.0 on), and dW's rows (`k_out` elements of
    `dtype`, contiguous) 16-byte aligned, as bulk copies need."""
    return (
        device.type == "cuda"
        and torch.cuda.get_device_capability(device)[0] >= 9
        and k_out * dtype.itemsize % 16 == 0
    )


def padded_expert_weight_gradient(
    g_t_q, g_t_scale, x_t_q, x_t_scale, padded_ends_E, n_out: int, k_out: int, dtype, into=None
):
    """`fp8_grouped.expert_weight_gradient` for rows in the padded layout (expert e owns rows
    `padded_ends_E[e-1]:padded_ends_E[e]`, both multiples of 128), through this module's kernel
    where it runs, else that one's. With `into`, dW is added into it and `into` returned."""
    if not _runs_here(g_t_q.device, k_out, dtype):
        operands = (g_t_q, g_t_scale, x_t_q, x_t_scale, padded_ends_E, n_out, k_out, dtype)
        return expert_weight_gradient(*operands, into=into)
    out = weight_gradient_output((padded_ends_E.numel(), n_out, k_out), dtype, g_t_q.device, into)
    sms = torch.cuda.get_device_properties(out.device).multi_processor_count
    return launch(
        g_t_q, g_t_scale, x_t_q, x_t_scale, padded_ends_E, out, into is not None, PROGRAMS_PER_SM * sms
    )
