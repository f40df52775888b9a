"""Probe: DeepGEMM's FP8 GEMMs (the copy vLLM ships as `vllm.third_party.deep_gemm`) against the
ones the FP8 layers use now, on pre-quantized operands, on a CUDA GPU.

Dense (`Fp8Linear`, 8192 tokens at DeepSeek-V3's shapes): cuBLASLt's blockwise `torch._scaled_mm`
(`fp8.fp8_gemm`) against DeepGEMM's `fp8_gemm_nt` for the forward and input gradient (1 x 128 tiles
times 128 x 128 blocks), and for the weight gradient DeepGEMM's 1 x 128 x 1 x 128 kernel (x.T in tiles
along the tokens, as DeepSeek-V3 does) with BF16 output, and with FP32 output added into an FP32
accumulator. Grouped (the MoE experts, 4096 tokens top-8 over 64 experts): the Triton kernels of
`fp8_grouped` against `m_grouped_fp8_gemm_nt_contiguous` (rows padded to 128 per expert) and
`k_grouped_fp8_gemm_nt_contiguous`. BF16 (`torch.mm`, `torch._grouped_mm`) for scale. Each result's
relative error against an FP32 product of the same dequantized operands. Every DeepGEMM call is
tried and its error printed if it fails: this finds out what the bundled version takes.

    PYTHONPATH=$PWD python3 benchmarks/probe_deep_gemm_gpu.py   # deep_gemm importable
"""

from __future__ import annotations

import json
import time
import traceback

import torch
from cuda_timing import median_ms

from grpo.models import fp8_triton
from grpo.models.fp8 import dequantize_blocks, dequantize_tiles, fp8_gemm
from grpo.models.fp8_grouped import expert_gemm, expert_weight_gradient, quantize_expert_weights

try:
    from vllm.third_party import deep_gemm
except ImportError:
    import deep_gemm

TOKENS = 8192
DENSE = [(7168, 2048), (2048, 7168), (7168, 18432)]
GROUPED = [("dsv3 gate_up", 4096, 8, 64, 7168, 4096), ("dsv3 down", 4096, 8, 64, 2048, 7168)]
results: list[dict] = []


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return round(((got.float() - want).norm() / want.norm()).item(), 5)


def timed(row: dict, name: str, fn, flops: int, want=None, pick=lambda out: out) -> None:
    """Times `fn` into `row[name]` (ms, TFLOP/s, error), or its exception's last line."""
    try:
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        first_s = time.perf_counter() - start  # includes DeepGEMM's JIT compile
        ms = median_ms(fn, repeats=20, warmup=3)
        entry = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9), "first_call_s": round(first_s, 2)}
        if want is not None:
            entry["rel_error"] = rel_error(pick(out), want)
        row[name] = entry
    except Exception as error:  # noqa: BLE001 (a probe: record what the library said)
        row[name] = {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"}
        traceback.print_exc()
    print(name, row[name], flush=True)


def dense(k: int, n: int) -> dict:
    m = TOKENS
    row: dict = {"shape": f"{m}x{k}->{n}"}
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    flops = 2 * m * n * k
    xq, xs, xq_t, xs_t = fp8_triton.quantize_activation(x)  # x.T in 128 x 128 blocks
    _, _, xq_tt, xs_tt = fp8_triton.quantize_output_grad(x)  # x.T in tiles along the tokens
    gq, gs, gq_t, gs_t = fp8_triton.quantize_output_grad(g)
    wq, ws = fp8_triton.quantize_weight_blocks(w)
    wq_t, ws_t = fp8_triton.quantize_weight_blocks(w.t())
    want_y = dequantize_tiles(xq, xs) @ dequantize_blocks(wq, ws).t()
    want_dx = dequantize_tiles(gq, gs) @ dequantize_blocks(wq_t, ws_t).t()
    want_dw = dequantize_tiles(gq_t, gs_t) @ dequantize_tiles(xq_tt, xs_tt).t()

    timed(row, "bf16_forward", lambda: x @ w.t(), flops)
    timed(row, "bf16_input_gradient", lambda: g @ w, flops)
    timed(row, "bf16_weight_gradient", lambda: g.t() @ x, flops)
    bf16 = torch.bfloat16
    timed(row, "cublas_forward", lambda: fp8_gemm(xq, xs, wq, ws, bf16), flops, want_y)
    timed(row, "cublas_input_gradient", lambda: fp8_gemm(gq, gs, wq_t, ws_t, bf16), flops, want_dx)
    timed(row, "cublas_weight_gradient", lambda: fp8_gemm(gq_t, gs_t, xq_t, xs_t, bf16), flops, want_dw)

    y, dx = torch.empty(m, n, device="cuda", dtype=bf16), torch.empty(m, k, device="cuda", dtype=bf16)
    dw = torch.empty(n, k, device="cuda", dtype=bf16)
    dw32 = torch.zeros(n, k, device="cuda", dtype=torch.float32)

    def dg(out, a, b, **kwargs):
        deep_gemm.fp8_gemm_nt(a, b, out, **kwargs)
        return out

    timed(row, "dg_forward", lambda: dg(y, (xq, xs), (wq, ws)), flops, want_y)
    timed(row, "dg_input_gradient", lambda: dg(dx, (gq, gs), (wq_t, ws_t)), flops, want_dx)
    timed(
        row, "dg_weight_gradient_1d1d_bf16",
        lambda: dg(dw, (gq_t, gs_t), (xq_tt, xs_tt), recipe=(1, 1, 128)), flops, want_dw,
    )  # fmt: skip
    timed(
        row, "dg_weight_gradient_1d2d_bf16",
        lambda: dg(dw, (gq_t, gs_t), (xq_t, xs_t)), flops, want_dw,
    )  # fmt: skip

    def accumulate():
        dw32.zero_()
        return dg(dw32, (gq_t, gs_t), (xq_tt, xs_tt), c=dw32, recipe=(1, 1, 128))

    timed(row, "dg_weight_gradient_1d1d_fp32_accumulate", accumulate, flops, want_dw)
    return row


def grouped(name: str, tokens: int, top_k: int, experts: int, k: int, n: int) -> dict:
    indices = torch.rand(tokens, experts, device="cuda").topk(top_k, dim=-1).indices
    counts = torch.bincount(indices.flatten(), minlength=experts).tolist()
    ends = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    rows = sum(counts)
    align = deep_gemm.get_mk_alignment_for_contiguous_layout()
    padded = [(c + align - 1) // align * align for c in counts]
    starts, pstarts = [0], [0]
    for c, p in zip(counts, padded):
        starts.append(starts[-1] + c)
        pstarts.append(pstarts[-1] + p)
    row: dict = {"shape": name, "rows": rows, "padded_rows": pstarts[-1], "alignment": align}
    flops = 2 * rows * n * k
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(experts, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    g = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    offs = ends

    # the project's kernels (rows unpadded)
    xq, xs, xq_t, xs_t = fp8_triton.quantize_activation(x)
    gq, gs, gq_t, gs_t = fp8_triton.quantize_output_grad(g)
    forward, input_gradient = quantize_expert_weights(w)
    bf16 = torch.bfloat16
    timed(row, "bf16_forward", lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs), flops)
    timed(row, "bf16_weight_gradient", lambda: torch._grouped_mm(x.t(), g, offs=offs), flops)
    timed(row, "triton_forward", lambda: expert_gemm(xq, xs, forward, ends, rows, bf16), flops)
    timed(row, "triton_input_gradient", lambda: expert_gemm(gq, gs, input_gradient, ends, rows, bf16), flops)
    timed(
        row, "triton_weight_gradient",
        lambda: expert_weight_gradient(gq_t, gs_t, xq_t, xs_t, ends, n, k, bf16), flops,
    )  # fmt: skip

    # DeepGEMM: each expert's rows padded (with zeros) to the alignment
    xp = torch.zeros(pstarts[-1], k, device="cuda", dtype=bf16)
    gp = torch.zeros(pstarts[-1], n, device="cuda", dtype=bf16)
    layout = torch.full((pstarts[-1],), -1, device="cuda", dtype=torch.int32)
    for e in range(experts):
        xp[pstarts[e] : pstarts[e] + counts[e]] = x[starts[e] : starts[e + 1]]
        gp[pstarts[e] : pstarts[e] + counts[e]] = g[starts[e] : starts[e + 1]]
        layout[pstarts[e] : pstarts[e] + counts[e]] = e
    xpq, xps, _, _ = fp8_triton.quantize_activation(xp)
    gpq, gps, gpq_t, gps_t = fp8_triton.quantize_output_grad(gp)
    _, _, xpq_t, xps_t = fp8_triton.quantize_output_grad(xp)  # x.T in tiles along the tokens
    wq = forward.q.view(experts, n, k)
    ws = forward.scale.view(experts, n // 128, k // 128)
    wtq, wts = fp8_triton.quantize_weight_blocks(w.transpose(1, 2).reshape(experts * k, n))
    wtq, wts = wtq.view(experts, k, n), wts.view(experts, k // 128, n // 128)

    want_y = torch.cat(
        [
            dequantize_tiles(xpq[pstarts[e] : pstarts[e + 1]], xps[pstarts[e] : pstarts[e + 1]])
            @ dequantize_blocks(wq[e], ws[e]).t()
            for e in range(experts)
        ]
    )
    y = torch.empty(pstarts[-1], n, device="cuda", dtype=bf16)
    dx = torch.empty(pstarts[-1], k, device="cuda", dtype=bf16)

    def m_grouped(out, a, b):
        deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, b, out, layout)
        return out

    real = layout >= 0
    timed(
        row, "dg_forward", lambda: m_grouped(y, (xpq, xps), (wq, ws)), flops, want_y[real], lambda o: o[real]
    )
    del want_y
    timed(row, "dg_input_gradient", lambda: m_grouped(dx, (gpq, gps), (wtq, wts)), flops)

    # k-grouped: each expert's block of g.T [n, k_e] and x.T [k, k_e] contiguous, one after another
    def per_expert_blocks(q_t):
        return torch.cat([q_t[:, pstarts[e] : pstarts[e + 1]].contiguous().flatten() for e in range(experts)])

    a_flat, b_flat = per_expert_blocks(gpq_t[:n]), per_expert_blocks(xpq_t[:k])
    sfa, sfb = gps_t[:n, : pstarts[-1] // 128], xps_t[:k, : pstarts[-1] // 128]
    ks = padded
    ks_tensor = torch.tensor(ks, device="cuda", dtype=torch.int32)
    dw32 = torch.zeros(experts, n, k, device="cuda", dtype=torch.float32)

    def k_grouped():
        dw32.zero_()
        deep_gemm.k_grouped_fp8_gemm_nt_contiguous((a_flat, sfa), (b_flat, sfb), dw32, ks, ks_tensor, dw32)
        return dw32

    e0 = slice(pstarts[0], pstarts[1])
    want_dw0 = dequantize_tiles(gpq_t[:n, e0], gps_t[:n, e0.start // 128 : e0.stop // 128]) @ (
        dequantize_tiles(xpq_t[:k, e0], xps_t[:k, e0.start // 128 : e0.stop // 128]).t()
    )
    timed(row, "dg_weight_gradient_k_grouped_fp32", k_grouped, flops, want_dw0, lambda o: o[0])
    return row


def main() -> None:
    print("deep_gemm", deep_gemm.__version__, torch.cuda.get_device_name(), flush=True)
    for k, n in DENSE:
        results.append(dense(k, n))
        torch.cuda.empty_cache()
    for shape in GROUPED:
        results.append(grouped(*shape))
        torch.cuda.empty_cache()
    print(json.dumps({"device": torch.cuda.get_device_name(), "results": results}))


if __name__ == "__main__":
    main()
