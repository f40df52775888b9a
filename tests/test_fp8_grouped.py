"""The grouped FP8 expert GEMMs compute, per expert, the products of their dequantized operands.

Run in Triton's CPU interpreter (a subprocess with TRITON_INTERPRET=1) on FP8 operands made directly
(every value exact in E4M3) with random FP32 scales; three experts, the middle one empty, row counts
that are not multiples of the tiles.
"""

import os
import subprocess
import sys

import pytest
import torch

from grpo.models.fp8 import E4M3, T

OFFSETS = [70, 70, 200]  # expert 0: rows 0-69, expert 1: none, expert 2: rows 70-199
N, K = 128, 256  # per expert out features (a multiple of 128), in features


def _fp8(rows: int, cols: int, generator) -> torch.Tensor:
    return (torch.randint(-8, 9, (rows, cols), generator=generator).float() * 0.5).to(E4M3)


def _scales(*shape, generator) -> torch.Tensor:
    return torch.rand(*shape, generator=generator) + 0.5


def _tiles(q, scale_RJ):
    return q.float() * scale_RJ.repeat_interleave(T, dim=1)[:, : q.shape[1]]


def _blocks(q, scale_IJ):
    return (
        q.float()
        * scale_IJ.repeat_interleave(T, dim=0).repeat_interleave(T, dim=1)[: q.shape[0], : q.shape[1]]
    )


def _rows(expert: int) -> slice:
    return slice(([0, *OFFSETS])[expert], OFFSETS[expert])


def check_grouped_gemms() -> None:
    from grpo.models.fp8_grouped import expert_gemm, expert_weight_gradient

    generator = torch.Generator().manual_seed(0)
    rows, experts = OFFSETS[-1], len(OFFSETS)
    w_q = _fp8(experts * N, K, generator)
    w_scale = _scales(experts * N // T, K // T, generator=generator)
    w = _blocks(w_q, w_scale)

    # forward: x (rows x K) in 1 x 128 tiles, scales as a column-major view
    x_q, x_scale = _fp8(rows, K, generator), _scales(K // T, rows, generator=generator).t()
    out = expert_gemm(x_q, x_scale, w_q, w_scale, OFFSETS, N, N, transposed=False, dtype=torch.float32)
    x = _tiles(x_q, x_scale)
    for e in range(experts):
        expected = x[_rows(e)] @ w[e * N : (e + 1) * N].t()
        torch.testing.assert_close(out[_rows(e)], expected, rtol=1e-4, atol=1e-3)

    # input gradient: g (rows x N) in tiles along N, times each expert's weight untransposed
    g_q, g_scale = _fp8(rows, N, generator), _scales(N // T, rows, generator=generator).t()
    grad_x = expert_gemm(g_q, g_scale, w_q, w_scale, OFFSETS, N, K, transposed=True, dtype=torch.float32)
    g = _tiles(g_q, g_scale)
    for e in range(experts):
        expected = g[_rows(e)] @ w[e * N : (e + 1) * N]
        torch.testing.assert_close(grad_x[_rows(e)], expected, rtol=1e-4, atol=1e-3)

    # weight gradient: g.T (N x M') in tiles along the rows, x.T (K x M') in 128 x 128 blocks
    padded_rows = 256
    g_t_q, g_t_scale = _fp8(N, padded_rows, generator), _scales(padded_rows // T, N, generator=generator).t()
    x_t_q, x_t_scale = _fp8(K, padded_rows, generator), _scales(K // T, padded_rows // T, generator=generator)
    grad_w = expert_weight_gradient(g_t_q, g_t_scale, x_t_q, x_t_scale, OFFSETS, N, K, torch.float32)
    g_t, x_t = _tiles(g_t_q, g_t_scale), _blocks(x_t_q, x_t_scale)
    for e in range(experts):
        expected = g_t[:, _rows(e)] @ x_t[:, _rows(e)].t()
        torch.testing.assert_close(grad_w[e], expected, rtol=1e-4, atol=1e-3)
    assert not grad_w[1].any()  # the empty expert


def check_against_the_per_expert_layer() -> None:
    """The autograd function (fused quantizers + grouped GEMMs) against one `Fp8LinearFunction` per
    expert. Values in {-224, 0, 224}: every tile's scale is then 0.5 whichever rows it spans, so both
    quantize exactly alike (the interpreter rounds inexact values to FP8 differently from the GPU)."""
    from grpo.models.fp8 import Fp8LinearFunction
    from grpo.models.fp8_grouped import GroupedFp8Function

    generator = torch.Generator().manual_seed(1)

    def signs(*shape):
        return torch.randint(-1, 2, shape, generator=generator).float() * 224.0

    rows, experts = OFFSETS[-1], len(OFFSETS)
    x, w, grad = signs(rows, K).requires_grad_(), signs(experts, N, K).requires_grad_(), signs(rows, N)
    out = GroupedFp8Function.apply(x, w, tuple(OFFSETS))
    out.backward(grad)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    expected = torch.cat([Fp8LinearFunction.apply(x_ref[_rows(e)], w_ref[e], False) for e in (0, 2)])
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-4, atol=1e-2)


def test_grouped_fp8_gemms_in_the_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


if __name__ == "__main__":
    check_grouped_gemms()
    check_against_the_per_expert_layer()
