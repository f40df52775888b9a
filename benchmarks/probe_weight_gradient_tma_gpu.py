"""Probe: the FP8 experts' weight-gradient kernel with its tiles moved by the Hopper's tensor memory
accelerator (TMA) against `fp8_grouped`'s, on a CUDA GPU of compute capability 9.0 or later.

`fp8_grouped._weight_gradient_kernel` loads its 128-row tiles of `g.T` and `x.T` through pointer
arithmetic (Triton makes asynchronous copies of them, thread by thread) and stores, or adds into
`.grad`, through pointers too. At DeepSeek-V3's expert shape (512 rows an expert) it runs at about a
third of the card's FP8 rate and takes longer than BF16's grouped weight gradient
(`deep_gemm_probe_h100.txt`). The candidate here is the same sum over the same tiles in the same
order; only the data movement differs: tiles come through tensor descriptors (one bulk copy per
tile), and dW leaves through one too, in three ways:
- `store`: dW stored (the library kernel without `into`);
- `load_add`: `.grad`'s block read through a descriptor, dW added in FP32, the sum stored (the
  library kernel with `into`: one rounding);
- `reduce_add`: dW rounded to BF16 and added into `.grad` by the copy engine itself (a TMA reduction:
  two roundings, like autograd's separate add).

Median milliseconds (CUDA events) per configuration, each run twice in alternating order with the
library kernel; the candidate's output against the library's (the largest difference over the largest
value; 0 where they agree bit for bit), at DeepSeek-V3's expert projections, 64 experts x 512 rows
each (whole 128-row tiles, as the trainer's padded layout gives them). Last line: one JSON object.

    cd benchmarks && PYTHONPATH=<repo> python3 probe_weight_gradient_tma_gpu.py
"""

from __future__ import annotations

import json

import torch
import triton
import triton.language as tl
from cuda_timing import median_ms
from probe_weight_gradient_accumulation_gpu import expert_operands
from triton.tools.tensor_descriptor import TensorDescriptor

from grpo.models.fp8_grouped import expert_weight_gradient

SHAPES = [("dsv3 gate_up", 4096, 7168), ("dsv3 down", 7168, 2048)]  # (name, out features N, in features K)
EXPERTS, ROWS_PER_EXPERT = 64, 512
STORE, LOAD_ADD, REDUCE_ADD = 0, 1, 2
MODES = {"store": STORE, "load_add": LOAD_ADD, "reduce_add": REDUCE_ADD}
CONFIGS = [  # (block_n, block_k, warps, stages[, programs per SM: the persistent kernel])
    (64, 128, 4, 3),
    (128, 128, 8, 3),
    (128, 256, 8, 3),
    (64, 128, 4, 3, 1),
    (64, 128, 4, 3, 2),
    (64, 128, 4, 3, 3),
    (128, 128, 8, 3, 1),
    (128, 128, 8, 3, 2),
    (128, 128, 8, 4, 1),
]


@triton.jit
def _tma_kernel(
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
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MODE: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks, k_blocks = tl.cdiv(n_out, BLOCK_N), tl.cdiv(k_out, BLOCK_K)
    expert = pid // (n_blocks * k_blocks)
    pid_n = (pid % (n_blocks * k_blocks)) // k_blocks
    pid_k = pid % k_blocks
    start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(ends_ptr + expert)
    n0, k0 = pid_n * BLOCK_N, pid_k * BLOCK_K
    ns = n0 + tl.arange(0, BLOCK_N)
    ks = k0 + tl.arange(0, BLOCK_K)
    x_scale_at = x_t_scale_ptr + (ks // 128) * x_t_scale_stride
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    whole_from, whole_to = (start + 127) // 128, end // 128
    for tile in range(whole_from, whole_to):
        g = g_desc.load([n0, tile * 128])
        x = x_desc.load([k0, tile * 128])
        g_scale = tl.load(g_t_scale_ptr + tile * g_t_scale_stride + ns)
        x_scale = tl.load(x_scale_at + tile)
        acc += tl.dot(g, tl.trans(x)) * g_scale[:, None] * x_scale[None, :]
    for tile in range(start // 128, (end + 127) // 128):
        if (tile < whole_from) | (tile >= whole_to):
            ms = tile * 128 + tl.arange(0, 128)
            mine = (ms >= start) & (ms < end)
            g = g_desc.load([n0, tile * 128])
            g = tl.where(mine[None, :], g, tl.zeros_like(g))
            x = x_desc.load([k0, tile * 128])
            g_scale = tl.load(g_t_scale_ptr + tile * g_t_scale_stride + ns)
            x_scale = tl.load(x_scale_at + tile)
            acc += tl.dot(g, tl.trans(x)) * g_scale[:, None] * x_scale[None, :]
    if MODE == 1:
        acc += out_desc.load([expert, n0, k0]).reshape(BLOCK_N, BLOCK_K).to(tl.float32)
    value = acc.to(out_desc.dtype).reshape(1, BLOCK_N, BLOCK_K)
    if MODE == 2:
        out_desc.atomic_add([expert, n0, k0], value)
    else:
        out_desc.store([expert, n0, k0], value)


@triton.jit
def _persistent_tma_kernel(
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
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MODE: tl.constexpr,
):
    """`_tma_kernel` looping over blocks (PROGRAMS of them at a time), the loop nest flattened so
    that Triton pipelines the next block's loads under this one's MMAs and bulk store. Whole 128-row
    tiles only (every expert's rows start and end on a tile boundary, as in the padded layout)."""
    n_blocks, k_blocks = tl.cdiv(n_out, BLOCK_N), tl.cdiv(k_out, BLOCK_K)
    for block in tl.range(tl.program_id(0), experts * n_blocks * k_blocks, PROGRAMS, flatten=True):
        expert = block // (n_blocks * k_blocks)
        pid_n = (block % (n_blocks * k_blocks)) // k_blocks
        pid_k = block % k_blocks
        start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0)
        end = tl.load(ends_ptr + expert)
        n0, k0 = pid_n * BLOCK_N, pid_k * BLOCK_K
        ns = n0 + tl.arange(0, BLOCK_N)
        ks = k0 + tl.arange(0, BLOCK_K)
        x_scale_at = x_t_scale_ptr + (ks // 128) * x_t_scale_stride
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for tile in range(start // 128, end // 128):
            g = g_desc.load([n0, tile * 128])
            x = x_desc.load([k0, tile * 128])
            g_scale = tl.load(g_t_scale_ptr + tile * g_t_scale_stride + ns)
            x_scale = tl.load(x_scale_at + tile)
            acc += tl.dot(g, tl.trans(x)) * g_scale[:, None] * x_scale[None, :]
        if MODE == 1:
            acc += out_desc.load([expert, n0, k0]).reshape(BLOCK_N, BLOCK_K).to(tl.float32)
        value = acc.to(out_desc.dtype).reshape(1, BLOCK_N, BLOCK_K)
        if MODE == 2:
            out_desc.atomic_add([expert, n0, k0], value)
        else:
            out_desc.store([expert, n0, k0], value)


def tma_weight_gradient(operands, config, mode: int, out: torch.Tensor) -> torch.Tensor:
    """dW of `operands` (`expert_operands`' order) stored into `out` `[E, N, K]`, or added into it."""
    g_t_q, g_t_scale, x_t_q, x_t_scale, ends, n, k, _ = operands
    block_n, block_k, warps, stages, *per_sm = config
    args = (
        TensorDescriptor.from_tensor(g_t_q, [block_n, 128]),
        g_t_scale,
        TensorDescriptor.from_tensor(x_t_q, [block_k, 128]),
        x_t_scale,
        TensorDescriptor.from_tensor(out, [1, block_n, block_k]),
        ends,
        g_t_scale.stride(1),
        x_t_scale.stride(0),
        n,
        k,
    )
    if per_sm:
        sms = torch.cuda.get_device_properties(out.device).multi_processor_count if out.is_cuda else 4
        programs = per_sm[0] * sms
        kernel, grid, args = _persistent_tma_kernel, (programs,), (*args, ends.numel(), programs)
    else:
        kernel, grid = _tma_kernel, (ends.numel() * triton.cdiv(n, block_n) * triton.cdiv(k, block_k),)
    kernel[grid](
        *args,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        MODE=mode,
        num_warps=warps,
        num_stages=stages,
    )
    return out


def largest_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    return round(((got.float() - want.float()).abs().max() / want.float().abs().max()).item(), 6)


def measure(name: str, n: int, k: int) -> dict:
    operands, grad = expert_operands(n, k, EXPERTS, ROWS_PER_EXPERT)
    library = expert_weight_gradient(*operands)
    library_into = expert_weight_gradient(*operands, into=grad.clone())
    out, timed_grad = torch.empty_like(grad), grad.clone()  # the timed additions pile up in `timed_grad`
    row = {"shape": f"{name}: {EXPERTS} experts x {ROWS_PER_EXPERT} rows, {k}->{n}", "configs": []}
    for config in CONFIGS:
        entry = {"config": config}
        try:
            entry["diff_store"] = largest_difference(
                tma_weight_gradient(operands, config, STORE, out), library
            )
            for mode_name in ("load_add", "reduce_add"):
                added = tma_weight_gradient(operands, config, MODES[mode_name], grad.clone())
                entry[f"diff_{mode_name}"] = largest_difference(added, library_into)
                del added
        except Exception as error:  # a configuration the compiler or the card refuses: say so, go on
            entry["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            row["configs"].append(entry)
            print(name, entry, flush=True)
            continue
        for _ in range(2):  # alternating with the library kernel, so that a drift of the card shows
            for mode_name, mode in MODES.items():
                target = out if mode == STORE else timed_grad
                entry.setdefault(f"{mode_name}_ms", []).append(
                    round(
                        median_ms(lambda c=config, m=mode, t=target: tma_weight_gradient(operands, c, m, t)),
                        3,
                    )
                )
            row.setdefault("library_ms", []).append(
                round(median_ms(lambda: expert_weight_gradient(*operands)), 3)
            )
            row.setdefault("library_into_ms", []).append(
                round(median_ms(lambda: expert_weight_gradient(*operands, into=timed_grad)), 3)
            )
        row["configs"].append(entry)
        print(name, entry, flush=True)
    return row


def main() -> None:
    assert torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9, "needs a Hopper GPU"
    torch.manual_seed(0)
    rows = []
    for name, n, k in SHAPES:
        rows.append(measure(name, n, k))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    print(json.dumps({"probe": "weight_gradient_tma", "device": torch.cuda.get_device_name(), "rows": rows}))


if __name__ == "__main__":
    main()
