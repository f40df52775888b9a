"""The grouped FP8 expert GEMMs compute, per expert, the products of their dequantized operands.

Run in Triton's CPU interpreter (a subprocess with TRITON_INTERPRET=1) on FP8 operands made directly
(every value exact in E4M3) with random FP32 scales; three experts, the middle one empty, row counts
that are not multiples of the tiles.
"""

import pytest
import torch
from triton_interpreter import run_in_triton_interpreter

from grpo.models.fp8 import E4M3, T

OFFSETS = [70, 70, 200]  # expert 0: rows 0-69, expert 1: none, expert 2: rows 70-199
N, K = 128, 256  # per expert out features (a multiple of 128), in features


def _fp8(rows: int, cols: int, generator) -> torch.Tensor:
    return (torch.randint(-8, 9, (rows, cols), generator=generator).float() * 0.5).to(E4M3)


def _scales(*shape, generator) -> torch.Tensor:
    return torch.rand(*shape, generator=generator) + 0.5


def _pad_rows(q: torch.Tensor, rows: int) -> torch.Tensor:
    """FP8 rows zero-padded (the zero byte is 0.0 in e4m3)."""
    return torch.nn.functional.pad(q.view(torch.uint8), (0, 0, 0, rows - q.shape[0])).view(E4M3)


def _tiles(q, scale_RJ):
    return q.float() * scale_RJ.repeat_interleave(T, dim=1)[:, : q.shape[1]]


def _blocks(q, scale_IJ):
    return (
        q.float()
        * scale_IJ.repeat_interleave(T, dim=0).repeat_interleave(T, dim=1)[: q.shape[0], : q.shape[1]]
    )


def _spans(offsets: list[int]) -> list[slice]:
    return [slice(start, end) for start, end in zip([0, *offsets[:-1]], offsets)]


def _rows(expert: int) -> slice:
    return _spans(OFFSETS)[expert]


def _ends(offsets: list[int]) -> torch.Tensor:
    return torch.tensor(offsets, dtype=torch.int32)


def check_grouped_gemms() -> None:
    from grpo.models.fp8_grouped import (
        ExpertWeights,
        GemmConfig,
        WeightGradientConfig,
        expert_gemm,
        expert_weight_gradient,
    )

    generator = torch.Generator().manual_seed(0)
    experts = len(OFFSETS)
    w_q = _fp8(experts * N, K, generator)
    w_scale = _scales(experts * N // T, K // T, generator=generator)
    w = _blocks(w_q, w_scale)
    # small tiles and groups: tiles of one expert in several groups, a group spanning experts; the
    # second routing leaves the first expert empty and gives the last exactly one 64-row tile
    for config in (GemmConfig(), GemmConfig(block_m=16, group=2)):
        for offsets in (OFFSETS, [0, 136, 200]):
            rows = offsets[-1]
            # forward: x (rows x K) in 1 x 128 tiles, scales as a column-major view
            x_q, x_scale = _fp8(rows, K, generator), _scales(K // T, rows, generator=generator).t()
            forward = ExpertWeights.forward(w_q, w_scale, N, K)
            out = expert_gemm(x_q, x_scale, forward, _ends(offsets), rows, torch.float32, config)
            x = _tiles(x_q, x_scale)
            for e, span in enumerate(_spans(offsets)):
                expected = x[span] @ w[e * N : (e + 1) * N].t()
                torch.testing.assert_close(out[span], expected, rtol=1e-4, atol=1e-3)

            # input gradient: g (rows x N) in tiles along N, times each expert's weight untransposed,
            # read from the transposed copy of the stacked weight (blocks and scales transposed)
            g_q, g_scale = _fp8(rows, N, generator), _scales(N // T, rows, generator=generator).t()
            w_t_q = w_q.view(torch.uint8).t().contiguous().view(E4M3)
            backward = ExpertWeights.input_gradient(w_t_q, w_scale.t().contiguous(), N, K)
            grad_x = expert_gemm(g_q, g_scale, backward, _ends(offsets), rows, torch.float32, config)
            g = _tiles(g_q, g_scale)
            for e, span in enumerate(_spans(offsets)):
                expected = g[span] @ w[e * N : (e + 1) * N]
                torch.testing.assert_close(grad_x[span], expected, rtol=1e-4, atol=1e-3)

    # weight gradient: g.T (N x M') in tiles along the rows, x.T (K x M') in 128 x 128 blocks, both
    # zero-padded to 512 rows as the quantizers pad them; experts with a partial tile at either end,
    # whole tiles, one exactly one whole tile, one empty; 128- and 256-wide blocks of dW
    offsets, padded_rows = [70, 70, 384, 512], 512
    g_t_q, g_t_scale = (
        _fp8(N, padded_rows, generator),
        _scales(padded_rows // T, 512, generator=generator).t(),
    )
    x_t_q, x_t_scale = (
        _fp8(K, padded_rows, generator),
        _scales(512 // T, padded_rows // T, generator=generator),
    )
    g_t, x_t = _tiles(g_t_q, g_t_scale[:N]), _blocks(x_t_q, x_t_scale[: K // T])
    g_t_q, x_t_q = _pad_rows(g_t_q, 512), _pad_rows(x_t_q, 512)
    for config in (WeightGradientConfig(), WeightGradientConfig(block_n=256, block_k=256, num_warps=4)):
        grad_w = expert_weight_gradient(
            g_t_q, g_t_scale, x_t_q, x_t_scale, _ends(offsets), N, K, torch.float32, config
        )
        for e, rows in enumerate(_spans(offsets)):
            expected = g_t[:, rows] @ x_t[:, rows].t()
            torch.testing.assert_close(grad_w[e], expected, rtol=1e-4, atol=1e-3)
        assert not grad_w[1].any()  # the empty expert
        # added into an existing FP32 gradient instead: the very sum autograd would form
        into = torch.randn(grad_w.shape, generator=generator)
        expected = into + grad_w
        added = expert_weight_gradient(
            g_t_q, g_t_scale, x_t_q, x_t_scale, _ends(offsets), N, K, torch.float32, config, into=into
        )
        assert added is into and torch.equal(into, expected)


def check_the_bulk_copy_weight_gradient() -> None:
    """`fp8_grouped_tma`'s kernel (whole 128-row tiles: the padded layout), dW stored: the same sums
    in the same order as `fp8_grouped`'s kernel, so the same values bit for bit. Experts of two and
    one tiles around an empty one; four blocks of dW each, walked by three programs (the persistent
    loop wraps). Its other mode, adding into `.grad` by a bulk reduction, has no interpreter
    counterpart: `test_the_bulk_copy_weight_gradient_on_the_gpu`."""
    from grpo.models.fp8_grouped import expert_weight_gradient
    from grpo.models.fp8_grouped_tma import launch

    generator = torch.Generator().manual_seed(4)
    offsets, padded_rows, n, k = [256, 256, 384], 512, 256, 256
    g_t_q = _fp8(n, padded_rows, generator)
    g_t_scale = _scales(padded_rows // T, 512, generator=generator).t()  # column-major, as quantized
    x_t_q, x_t_scale = _fp8(k, padded_rows, generator), _scales(k // T, padded_rows // T, generator=generator)
    operands = (g_t_q, g_t_scale, x_t_q, x_t_scale, _ends(offsets))
    out = torch.full((len(offsets), n, k), float("nan"))
    launch(*operands, out, add=False, programs=3)
    assert torch.equal(out, expert_weight_gradient(*operands, n, k, torch.float32))
    g_t, x_t = _tiles(g_t_q, g_t_scale[:n]), _blocks(x_t_q, x_t_scale)
    torch.testing.assert_close(out[2], g_t[:, 256:384] @ x_t[:, 256:384].t(), rtol=1e-4, atol=1e-3)
    assert not out[1].any()  # the empty expert


def check_against_the_per_expert_layer() -> None:
    """The autograd function (fused quantizers + grouped GEMMs) against one `Fp8LinearFunction` per
    expert. Values in {-224, 0, 224}: every tile's scale is then 0.5 whichever rows it spans, so both
    quantize exactly alike (the interpreter rounds inexact values to FP8 differently from the GPU)."""
    from grpo.models.fp8 import Fp8LinearFunction
    from grpo.models.fp8_grouped import GroupedFp8Function, grouped_fp8

    generator = torch.Generator().manual_seed(1)

    def signs(*shape):
        return torch.randint(-1, 2, shape, generator=generator).float() * 224.0

    rows, experts = OFFSETS[-1], len(OFFSETS)
    x, w, grad = signs(rows, K).requires_grad_(), signs(experts, N, K).requires_grad_(), signs(rows, N)
    out = GroupedFp8Function.apply(x, w, _ends(OFFSETS))
    with torch.no_grad():  # the forward-only path quantizes the same way, without the transposes
        train_apply, GroupedFp8Function.apply = GroupedFp8Function.apply, None  # must not be called
        assert torch.equal(grouped_fp8(x, w, _ends(OFFSETS)), out.detach())
        GroupedFp8Function.apply = train_apply
    out.backward(grad)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    expected = torch.cat([Fp8LinearFunction.apply(x_ref[_rows(e)], w_ref[e], False) for e in (0, 2)])
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-4, atol=1e-2)


def check_the_weight_gradient_added_into_grad() -> None:
    """Inside `accumulate_into_grad`, a second backward adds the experts' weight gradient into
    `w.grad` in the kernel (the first finds no `.grad` and returns it to autograd): the same FP32
    gradient as autograd's own accumulation, bit for bit. Frozen experts get no weight gradient."""
    from grpo.models import fp8_grouped
    from grpo.models.fp8_grouped import GroupedFp8Function
    from grpo.models.fused_grad_accumulation import accumulate_into_grad

    generator = torch.Generator().manual_seed(2)
    rows, experts = OFFSETS[-1], len(OFFSETS)
    x = torch.randn(rows, K, generator=generator, requires_grad=True)
    w = torch.randn(experts, N, K, generator=generator).requires_grad_()
    grad = torch.randn(rows, N, generator=generator)

    def two_backward_passes() -> torch.Tensor:
        w.grad = None
        for _ in range(2):
            GroupedFp8Function.apply(x, w, _ends(OFFSETS)).backward(grad)
        return w.grad

    added_in_kernel = []
    kernel = fp8_grouped.expert_weight_gradient

    def spy(*operands, into=None):
        added_in_kernel.append(into is not None)
        return kernel(*operands, into=into)

    fp8_grouped.expert_weight_gradient = spy
    try:
        by_autograd = two_backward_passes().clone()
        with accumulate_into_grad():
            in_place = two_backward_passes()
        w.requires_grad_(False)  # frozen experts: no weight gradient computed at all
        GroupedFp8Function.apply(x, w, _ends(OFFSETS)).backward(grad)
    finally:
        fp8_grouped.expert_weight_gradient = kernel
    assert added_in_kernel == [False, False, False, True]
    assert torch.equal(in_place, by_autograd)


def check_the_padded_layout_kernel(device: str = "cpu") -> None:
    """`PaddedLayout.by_kernel` (the GPU's one launch; on `device`) equals the PyTorch
    `PaddedLayout.of` on the CPU exactly: empty experts first, between and last, whole and partial
    128-row blocks, more rows than one program's block, no rows; 256 experts (64 rows a program)."""
    from grpo.models.fp8_grouped_deep_gemm import PaddedLayout

    generator = torch.Generator().manual_seed(3)
    counts = [torch.randint(0, 300, (experts,), generator=generator) for experts in (64, 64, 256)]
    counts[1][::3] = 0
    cases = [
        [0, 0, 5],
        [3, 3, 133],
        [128, 256, 256, 300],
        [1000],
        [0],
        *(c.cumsum(0).tolist() for c in counts),
    ]
    for ends in cases:
        ends_E = torch.tensor(ends, dtype=torch.int32)
        want, got = PaddedLayout.of(ends_E, ends[-1]), PaddedLayout.by_kernel(ends_E.to(device), ends[-1])
        assert torch.equal(got.layout_P.cpu(), want.layout_P), ends
        assert torch.equal(got.destination_N.cpu(), want.destination_N), ends
        assert torch.equal(got.padded_ends_E.cpu(), want.padded_ends_E), ends


def test_grouped_fp8_gemms_in_the_triton_interpreter():
    run_in_triton_interpreter(__file__)


if __name__ == "__main__":
    check_grouped_gemms()
    check_the_bulk_copy_weight_gradient()
    check_against_the_per_expert_layer()
    check_the_weight_gradient_added_into_grad()
    check_the_padded_layout_kernel()


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _uneven_experts_on_the_gpu():
    """4 experts of 256 x 384, 1000 rows routed unevenly with an empty expert: `(offsets, x, w, grad,
    run)`, where `run(fn)` does `fn()` forward and backward and returns the output and the gradients of
    x and w in FP32."""
    torch.manual_seed(0)
    experts, n, k = 4, 256, 384
    offsets = torch.tensor([300, 300, 700, 1000], device="cuda", dtype=torch.int32)
    x = torch.randn(1000, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(experts, n, k, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(1000, n, device="cuda", dtype=torch.bfloat16)

    def run(fn):
        x.grad = w.grad = None
        out = fn()
        out.backward(grad)
        return out.float(), x.grad.float(), w.grad.float()

    return offsets, x, w, grad, run


@pytest.mark.gpu
@gpu
def test_grouped_fp8_experts_match_the_per_expert_fp8_layers_on_the_gpu(monkeypatch):
    """Random BF16 inputs, uneven routing with an empty expert. Output and input gradient quantize
    their operands exactly as the per-expert path does (row tiles, weight blocks), so they agree to
    the accumulation order; the weight gradient's 128-row tiles of x.T and g.T may span two experts
    here (coarser scales), so it is held to FP8 error against the BF16 product instead."""
    from grpo.models import fp8_deep_gemm
    from grpo.models.fp8_grouped import GroupedFp8Function, grouped_fp8
    from grpo.models.moe import per_expert_fp8

    monkeypatch.setattr(fp8_deep_gemm, "mode", "off")  # the Triton kernels throughout
    offsets, x, w, grad, run = _uneven_experts_on_the_gpu()

    grouped = run(lambda: GroupedFp8Function.apply(x, w, offsets))
    with torch.no_grad():
        forward_only = grouped_fp8(x, w, offsets)
    assert torch.equal(forward_only.float(), grouped[0])
    per_expert = run(lambda: per_expert_fp8(x, w, offsets))
    bf16 = run(lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offsets))

    def error(got, want):
        return ((got - want).norm() / want.norm()).item()

    assert error(grouped[0], per_expert[0]) < 1e-2
    assert error(grouped[1], per_expert[1]) < 1e-2
    assert not grouped[2][1].any()  # the empty expert
    for got, want in zip(grouped, bf16):
        assert error(got, want) < 0.06  # E4M3 rounding of both operands: the FP8 linear measured 3.6-3.7%


def test_the_padded_layout_starts_every_expert_on_a_128_row_boundary():
    from grpo.models.fp8_grouped_deep_gemm import PaddedLayout

    # expert 0: rows 0-2, expert 1: none, expert 2: rows 3-132 (130 rows: two blocks)
    layout = PaddedLayout.of(torch.tensor([3, 3, 133], dtype=torch.int32), 133)
    assert layout.destination_N.tolist() == [0, 1, 2, *range(128, 258)]
    assert layout.padded_ends_E.tolist() == [128, 128, 384]
    assert layout.size == 640  # 133 + 3 * 127, rounded up to 128: an upper bound, no host sync
    expected = torch.full((640,), -1, dtype=torch.int32)
    expected[:3], expected[128:258] = 0, 2
    assert torch.equal(layout.layout_P, expected)
    index = layout.padded_index(torch.arange(133) + 7)
    assert index[:3].tolist() == [7, 8, 9] and index[128:258].tolist() == list(range(10, 140))
    assert not index[3:128].any() and not index[258:].any()  # padding rows: 0


@pytest.mark.gpu
@gpu
def test_deep_gemm_experts_match_the_per_expert_fp8_layers_on_the_gpu(monkeypatch):
    """DeepGEMM's grouped forward and input gradient (rows copied into the padded layout) and the
    Triton weight gradient on that layout, against one FP8 linear per expert: the same quantized
    operands (the padding aligns x.T's 128-row blocks to each expert, as the per-expert layers
    quantize them), so all three agree to the accumulation order. Padding rows holding garbage
    change nothing, the weight gradient included: the quantizers read them as zeros."""
    from grpo.models import fp8_deep_gemm
    from grpo.models.fp8_grouped import grouped_fp8
    from grpo.models.fp8_grouped_deep_gemm import PaddedLayout, grouped_fp8_packed, grouped_fp8_padded
    from grpo.models.moe import per_expert_fp8

    library = fp8_deep_gemm.library(torch.device("cuda"))
    if library is None:
        pytest.skip("DeepGEMM does not run here: it needs a Hopper GPU and vLLM's copy or deep_gemm")
    monkeypatch.setattr(fp8_deep_gemm, "mode", "on")  # experts this small take it only when asked
    offsets, x, w, grad, run = _uneven_experts_on_the_gpu()

    packed = run(lambda: grouped_fp8_packed(library, x, w, offsets))
    with torch.no_grad():
        assert torch.equal(grouped_fp8(x, w, offsets).float(), packed[0])
    per_expert = run(lambda: per_expert_fp8(x, w, offsets))
    for got, want in zip(packed, per_expert):
        assert ((got - want).norm() / want.norm()).item() < 1e-2
    assert not packed[2][1].any()  # the empty expert

    layout = PaddedLayout.of(offsets, 1000)
    garbage = torch.full((layout.size, x.shape[1]), 1e4, device="cuda", dtype=torch.bfloat16)
    x_padded = garbage.index_copy(0, layout.destination_N, x.detach()).requires_grad_()
    w.grad = None
    y_padded = grouped_fp8_padded(library, x_padded, w, layout)
    y_padded.backward(torch.full_like(y_padded, 1e4).index_copy(0, layout.destination_N, grad))
    assert torch.equal(y_padded[layout.destination_N].float(), packed[0])
    assert torch.equal(x_padded.grad[layout.destination_N].float(), packed[1])
    assert torch.equal(w.grad.float(), packed[2])


@pytest.mark.gpu
@gpu
def test_the_padded_layout_kernel_on_the_gpu():
    check_the_padded_layout_kernel("cuda")


@pytest.mark.gpu
@gpu
def test_the_bulk_copy_weight_gradient_on_the_gpu():
    """`fp8_grouped_tma` against `fp8_grouped`'s kernel on quantized random operands, 3 experts of
    256 and 384 rows and an empty one (the padded layout), 384 x 640 weights: dW stored bit for bit
    the same; added into a BF16 `.grad`, within one rounding of autograd's sum (the bulk reduction
    rounds dW to BF16 first, as autograd does; `fp8_grouped`'s kernel rounds the sum once)."""
    from grpo.models import fp8_triton
    from grpo.models.fp8_grouped import expert_weight_gradient
    from grpo.models.fp8_grouped_tma import _runs_here, padded_expert_weight_gradient

    torch.manual_seed(0)
    ends = torch.tensor([256, 256, 640], device="cuda", dtype=torch.int32)
    n, k = 384, 640
    _, _, g_t_q, g_t_scale = fp8_triton.quantize_output_grad(torch.randn(640, n, device="cuda"))
    _, _, x_t_q, x_t_scale = fp8_triton.quantize_activation(torch.randn(640, k, device="cuda"))
    operands = (g_t_q, g_t_scale, x_t_q, x_t_scale, ends, n, k, torch.bfloat16)
    grad = torch.randn(3, n, k, device="cuda", dtype=torch.bfloat16)
    if not _runs_here(grad.device, k, grad.dtype):
        pytest.skip("no bulk copies here: they need compute capability 9.0 (Hopper) or later")
    stored, want = padded_expert_weight_gradient(*operands), expert_weight_gradient(*operands)
    assert torch.equal(stored, want)
    added = padded_expert_weight_gradient(*operands, into=grad.clone())
    by_autograd = grad + want
    unit = (grad.float().abs() + want.float().abs()).clamp(min=1e-30) * 2.0**-8  # BF16: 8 significant bits
    assert ((added.float() - by_autograd.float()).abs() / unit).max().item() <= 1.0
