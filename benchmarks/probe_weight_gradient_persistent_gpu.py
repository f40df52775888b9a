"""Probe: a persistent form of the FP8 experts' weight-gradient kernel against `fp8_grouped`'s.

`fp8_grouped._weight_gradient_kernel` runs one program per 128 x 128 block of dW[e]; at DeepSeek-V3's
expert shape (512 rows an expert) a program makes only 4 MMA steps, then its epilogue, so the loads
of the next block wait for the store of this one (the kernel alone runs at ~450 TFLOP/s there). The
candidate here runs a fixed number of programs, each looping over blocks; with `flatten` Triton
pipelines the loop nest as one loop, so the next block's loads overlap this block's MMAs and store.
It reduces each block over the expert's 128-row tiles in one loop (the neighbour's rows of an edge
tile zeroed), where the library's kernel takes the edge tiles last: sums in another order, so the
two agree to BF16 rounding, not bit for bit.

Median milliseconds (CUDA events) at DeepSeek-V3's projections, 64 experts x 512 rows and 16 x 2048
(the same rows and FLOPs in longer reductions, with a quarter of the output), for the library kernel
and the candidate in a few settings, with and without adding into `.grad`; and the largest
difference between the two over the largest value of the result (0 where they agree bit for bit:
no edge tiles here, so the same sums in the same order). Last line: one JSON object.

    PYTHONPATH=$PWD python3 benchmarks/probe_weight_gradient_persistent_gpu.py
"""

import json

import torch
import triton
import triton.language as tl
from cuda_timing import median_ms
from probe_weight_gradient_accumulation_gpu import expert_operands

from grpo.models.fp8_grouped import expert_weight_gradient


@triton.jit
def _persistent_kernel(
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
    experts,
    PROGRAMS: tl.constexpr,
    FLATTEN: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    n_blocks, k_blocks = tl.cdiv(n_out, 128), tl.cdiv(k_out, 128)
    blocks = experts * n_blocks * k_blocks
    for block in tl.range(tl.program_id(0), blocks, PROGRAMS, flatten=FLATTEN):
        expert = block // (n_blocks * k_blocks)
        pid_n = (block % (n_blocks * k_blocks)) // k_blocks
        pid_k = block % k_blocks
        start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0)
        end = tl.load(ends_ptr + expert)
        ns = pid_n * 128 + tl.arange(0, 128)
        ks = pid_k * 128 + tl.arange(0, 128)
        acc = tl.zeros((128, 128), dtype=tl.float32)
        for tile in range(start // 128, (end + 127) // 128):
            ms = tile * 128 + tl.arange(0, 128)
            mine = (ms >= start) & (ms < end)
            g = tl.load(g_t_ptr + ns[:, None] * g_t_stride + ms[None, :])
            g = tl.where(mine[None, :], g, tl.zeros_like(g))
            x = tl.load(x_t_ptr + ks[None, :] * x_t_stride + ms[:, None])
            g_scale = tl.load(g_t_scale_ptr + tile * g_t_scale_stride + ns)
            x_scale = tl.load(x_t_scale_ptr + pid_k * x_t_scale_stride + tile)
            acc += tl.dot(g, x) * g_scale[:, None] * x_scale
        out_at = out_ptr + expert * n_out * k_out + ns[:, None] * k_out + ks[None, :]
        inside = (ns[:, None] < n_out) & (ks[None, :] < k_out)
        if ACCUMULATE:
            acc += tl.load(out_at, mask=inside).to(tl.float32)
        tl.store(out_at, acc.to(out_ptr.dtype.element_ty), mask=inside)


def persistent(g_t_q, g_t_scale, x_t_q, x_t_scale, ends_E, n_out, k_out, dtype, programs, flatten, warps, stages,
               into=None):  # fmt: skip
    experts = ends_E.numel()
    out = into if into is not None else torch.empty(experts, n_out, k_out, dtype=dtype, device=g_t_q.device)
    _persistent_kernel[(programs,)](
        g_t_q, g_t_scale, x_t_q, x_t_scale, out, ends_E,
        g_t_q.stride(0), g_t_scale.stride(1), x_t_q.stride(0), x_t_scale.stride(0), n_out, k_out, experts,
        PROGRAMS=programs, FLATTEN=flatten, ACCUMULATE=into is not None, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


SHAPES = [("dsv3 gate_up", 4096, 7168), ("dsv3 down", 7168, 2048)]  # (name, out features N, in features K)
LAYOUTS = [(64, 512), (16, 2048)]  # (experts, rows per expert): the same rows in all
SMS = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 0
SETTINGS = [  # (programs per SM, flatten, warps, stages)
    (1, True, 8, 3),
    (2, True, 8, 3),
    (1, False, 8, 3),
    (2, False, 8, 3),
    (1, True, 8, 4),
]


def measure(name: str, n: int, k: int, experts: int, rows_per_expert: int) -> dict:
    operands, grad = expert_operands(n, k, experts, rows_per_expert)
    row = {
        "shape": f"{name}: {experts} experts x {rows_per_expert} rows, {k}->{n}",
        "library_ms": median_ms(lambda: expert_weight_gradient(*operands)),
        "library_into_grad_ms": median_ms(lambda: expert_weight_gradient(*operands, into=grad)),
    }
    reference = expert_weight_gradient(*operands).float()
    largest = reference.abs().max()
    for per_sm, flatten, warps, stages in SETTINGS:
        label = f"persistent_{per_sm}x_sms_{'flat' if flatten else 'nested'}_w{warps}_s{stages}"
        try:
            args = (*operands, per_sm * SMS, flatten, warps, stages)
            row[f"{label}_ms"] = median_ms(lambda args=args: persistent(*args))
            row[f"{label}_into_grad_ms"] = median_ms(lambda args=args: persistent(*args, into=grad))
            row[f"{label}_max_diff_over_max"] = (
                (persistent(*args).float() - reference).abs().max() / largest
            ).item()
        except Exception as error:  # a setting Triton cannot compile is reported, not fatal
            row[label] = f"{type(error).__name__}: {str(error)[:160]}"
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()}


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    results = []
    for name, n, k in SHAPES:
        for experts, rows_per_expert in LAYOUTS:
            results.append(measure(name, n, k, experts, rows_per_expert))
            print(results[-1], flush=True)
            torch.cuda.empty_cache()
    print(
        json.dumps(
            {"probe": "weight_gradient_persistent", "device": torch.cuda.get_device_name(),
             "triton": triton.__version__, "sms": SMS, "rows": results}
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
