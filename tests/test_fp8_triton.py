"""The fused Triton quantizers write what the portable ones do, in the padded layouts cuBLASLt reads.

On CPU the kernel runs in Triton's interpreter (a subprocess with TRITON_INTERPRET=1) on FP32 and
BF16 inputs whose every tile has amax 448 * 2^k, so every quantized value is exact: the interpreter's
own FP8 rounding differs from the GPU's on inexact values. On a GPU the same checks run on random
inputs, and the layer's three GEMMs are compared with products of the dequantized operands.
"""

import pytest
import torch
from triton_interpreter import run_in_triton_interpreter

from grpo.models import fp8_deep_gemm
from grpo.models.fp8 import (
    Fp8LinearFunction,
    dequantize_blocks,
    dequantize_tiles,
    fp8_gemm,
    quantize_blocks,
    quantize_tiles,
    trimmed,
)


def _exactly_representable(rows: int, cols: int) -> torch.Tensor:
    values = torch.randint(-7, 8, (rows, cols)).float() * 16
    values[:, ::128] = 448.0
    values[::128, :] = 448.0
    # each 128 x 128 block its own power of two, so that no two blocks' scales are equal
    block_i, block_j = torch.arange(rows)[:, None] // 128, torch.arange(cols)[None, :] // 128
    return values * 2.0 ** (block_i - 2 * block_j - 1)


def _same(padded: torch.Tensor, reference: torch.Tensor) -> bool:
    """`padded` starts with `reference` and is zero elsewhere."""
    inner = padded[: reference.shape[0], : reference.shape[1]]
    rest = padded.float().clone()
    rest[: reference.shape[0], : reference.shape[1]] = 0
    return torch.equal(inner.float(), reference.float()) and not rest.any()


def check_against_portable_quantizers(x: torch.Tensor, p2: bool = False) -> None:
    from grpo.models import fp8_triton

    rows, cols = x.shape
    q, q_scale, t, t_scale = fp8_triton.quantize_activation(x, p2)
    assert (q.shape, t.shape) == ((208, 512), (512, 512))
    assert q_scale.stride() == (1, 208)  # column-major, as cuBLASLt reads tile scales
    reference_q, reference_scale = quantize_tiles(x, p2)
    assert _same(q, reference_q)
    assert torch.equal(q_scale[:rows, : reference_scale.shape[1]], reference_scale)
    reference_q, reference_scale = quantize_blocks(x.t(), p2)
    assert _same(t, reference_q)
    assert torch.equal(t_scale[: reference_scale.shape[0], : reference_scale.shape[1]], reference_scale)

    q, q_scale, t, t_scale = fp8_triton.quantize_output_grad(x, p2)
    reference_q, reference_scale = quantize_tiles(x.t(), p2)
    assert _same(t, reference_q)
    assert torch.equal(t_scale[:cols, : reference_scale.shape[1]], reference_scale)

    q, q_scale = fp8_triton.quantize_weight_blocks(x, p2)
    reference_q, reference_scale = quantize_blocks(x, p2)
    assert _same(q, reference_q)
    assert torch.equal(q_scale[: reference_scale.shape[0], : reference_scale.shape[1]], reference_scale)
    t, t_scale = fp8_triton.quantize_weight_blocks(x.t(), p2)  # the transposed view, read by strides
    assert torch.equal(t.float(), q.float().t()) and torch.equal(t_scale, q_scale.t())
    # the layer's w.T copy, transposed from w's
    transposed, transposed_scale = fp8_triton.transpose_blocks(q, q_scale)
    assert torch.equal(transposed.view(torch.uint8), t.view(torch.uint8))
    assert torch.equal(transposed_scale, t_scale) and transposed_scale.is_contiguous()

    # rows whose layout entry is negative (padding) quantize as zeros, whatever they hold
    layout = torch.arange(rows, dtype=torch.int32, device=x.device) % 3 - 1
    zeroed = torch.where(layout[:, None] >= 0, x, 0.0)
    for quantize in (fp8_triton.quantize_activation, fp8_triton.quantize_output_grad):
        for got, want in zip(quantize(x, p2, layout), quantize(zeroed, p2)):
            assert torch.equal(got.float(), want.float())

    # a batch (the experts' stacked weights, and its per-expert transposed view): each matrix as alone
    stack = torch.stack([x, x.flip(0) * 3])
    for batch in (stack, stack.transpose(1, 2)):
        for quantize in (fp8_triton.quantize_weight_blocks, fp8_triton.quantize_output_grad):
            for copy, alone in zip(quantize(batch, p2), zip(*(quantize(matrix, p2) for matrix in batch))):
                assert all(torch.equal(copy[i].float(), alone[i].float()) for i in range(2))
    # the experts' per-matrix transposes (DeepGEMM's input-gradient copy) from the stack's copy
    q, q_scale = fp8_triton.quantize_weight_blocks(stack, p2)
    t, t_scale = fp8_triton.quantize_weight_blocks(stack.transpose(1, 2), p2)
    transposed, transposed_scale = fp8_triton.transpose_blocks(q, q_scale)
    assert torch.equal(transposed.view(torch.uint8), t.view(torch.uint8))
    assert torch.equal(transposed_scale, t_scale)


def test_fused_quantizers_in_the_triton_interpreter():
    run_in_triton_interpreter(__file__)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
def test_fused_quantizers_on_the_gpu():
    torch.manual_seed(0)
    for p2 in (False, True):
        check_against_portable_quantizers(_exactly_representable(200, 300).cuda(), p2)
        check_against_portable_quantizers((torch.randn(200, 300) * torch.logspace(-3, 3, 300)).cuda(), p2)


def _within_one_step(padded: torch.Tensor, reference: torch.Tensor) -> bool:
    """`padded` starts with E4M3 values that are `reference`'s or a neighbour of the same sign (one
    code apart), and is zero elsewhere."""
    got = padded[: reference.shape[0], : reference.shape[1]].view(torch.uint8).int()
    want = reference.view(torch.uint8).int()
    rest = padded.float().clone()
    rest[: reference.shape[0], : reference.shape[1]] = 0
    same_sign = (got & 0x80) == (want & 0x80)
    return bool((same_sign & ((got - want).abs() <= 1)).all()) and not rest.any()


@pytest.mark.gpu
@gpu
def test_on_bf16_inputs_the_fused_quantizers_are_within_one_e4m3_step_of_the_portable_ones():
    """Triton's division is not IEEE-rounded, so a BF16 value whose quotient is a tie between two
    E4M3 values may round to the other one (`fp8_triton`'s docstring); the scales are exact."""
    from grpo.models import fp8_triton

    torch.manual_seed(0)
    x = (torch.randn(200, 300) * torch.logspace(-3, 3, 300)).to(torch.bfloat16).cuda()
    q, q_scale, t, t_scale = fp8_triton.quantize_activation(x)
    for (got, got_scale), (want, want_scale) in (
        ((q, q_scale), quantize_tiles(x)),
        ((t, t_scale), quantize_blocks(x.t())),
        (fp8_triton.quantize_output_grad(x)[2:], quantize_tiles(x.t())),
        (fp8_triton.quantize_weight_blocks(x), quantize_blocks(x)),
    ):
        assert _within_one_step(got, want)
        assert torch.equal(got_scale[: want_scale.shape[0], : want_scale.shape[1]], want_scale)


@pytest.mark.gpu
@gpu
def test_a_kernel_launched_directly_is_one_compiled_for_its_arguments():
    """After the first call a quantizer skips Triton's dispatch (`fp8_triton._launch`): inputs that
    Triton compiles differently for (sizes that are multiples of 16 or not, an input 16-byte aligned
    or not) must each get their own kernel, in any order."""
    from grpo.models import fp8_triton

    torch.manual_seed(2)
    base = torch.randn(257, 513, device="cuda") * torch.logspace(-2, 2, 513, device="cuda")
    inputs = [base[:256, :512], base[:200, :300], base[1:201, 1:301], base[:256, :512].contiguous()]
    for x in inputs * 2:
        q, scale = fp8_triton.quantize_activation_rows(x)
        reference_q, reference_scale = quantize_tiles(x)
        assert _same(q, reference_q)
        assert torch.equal(scale[: x.shape[0], : reference_scale.shape[1]], reference_scale)


@pytest.fixture(params=["off", "on"])
def deep_gemm_mode(request, monkeypatch):
    """Runs a GPU test with cuBLASLt's GEMMs and with DeepGEMM's (`fp8_deep_gemm`)."""
    if request.param == "on" and not fp8_deep_gemm.available(torch.device("cuda")):
        pytest.skip("DeepGEMM does not run here: it needs a Hopper GPU and vLLM's copy or deep_gemm")
    monkeypatch.setattr(fp8_deep_gemm, "mode", request.param)


@pytest.mark.gpu
@gpu
def test_fused_fp8_linear_computes_the_products_of_its_quantized_operands(deep_gemm_mode):
    torch.manual_seed(1)
    x = torch.randn(200, 300, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    w = torch.randn(260, 300, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    grad = torch.randn(200, 260, dtype=torch.bfloat16, device="cuda")
    y = Fp8LinearFunction.apply(x, w, False)
    y.backward(grad)

    def tiles(t):
        return dequantize_tiles(*quantize_tiles(t))[:, : t.shape[1]]

    def blocks(t):
        return dequantize_blocks(*quantize_blocks(t))[: t.shape[0], : t.shape[1]]

    expected = {
        "output": tiles(x) @ blocks(w).t(),
        "input gradient": tiles(grad) @ blocks(w),
        "weight gradient": tiles(grad.t()) @ blocks(x.t()).t(),
    }
    for name, got in zip(expected, (y, x.grad, w.grad)):
        # the same FP8 operands: only the GEMM's accumulation order and the BF16 rounding differ
        error = ((got.float() - expected[name]).norm() / expected[name].norm()).item()
        assert error < 1e-2, name


@pytest.mark.gpu
@gpu
def test_the_blockwise_gemm_takes_operands_as_they_come(deep_gemm_mode):
    """`fp8_gemm` on CUDA pads and lays out the portable quantizers' operands itself (200 rows, 3
    K-blocks: neither is what cuBLASLt takes) and takes the fused quantizers' as they are; both give
    the FP32 product of the same dequantized operands (not the CPU path's `fp8_gemm`: the GPU
    image's CPU build of `_scaled_mm` takes per-tensor scales only)."""
    from grpo.models import fp8_triton

    torch.manual_seed(2)
    x, w = torch.randn(200, 300), torch.randn(260, 300)
    operands = (*quantize_tiles(x), *quantize_blocks(w))
    want = dequantize_tiles(*operands[:2]) @ dequantize_blocks(*operands[2:]).t()
    want = want[:, :260]

    def error(got):
        return ((got.float().cpu() - want).norm() / want.norm()).item()

    portable = fp8_gemm(*(t.cuda() for t in operands), torch.bfloat16)
    fused_x, fused_scale, _, _ = fp8_triton.quantize_activation(x.cuda())
    fused = fp8_gemm(fused_x, fused_scale, *fp8_triton.quantize_weight_blocks(w.cuda()), torch.bfloat16)
    assert portable.shape == (200, 384)  # the weight's rows padded to the block
    assert fused.shape == (208, 512)  # padded by the fused quantizers; the layer trims
    assert error(portable[:, :260]) < 1e-2
    assert error(trimmed(fused, 200, 260)) < 1e-2


def test_a_quantizer_launch_larger_than_cuda_grids_is_refused_with_its_shape():
    """Activations launch their token tiles along the grid's second axis, which CUDA caps at 65535
    programs: past 65535 x 128 rows the quantizer says so instead of CUDA's unnamed launch error."""
    pytest.importorskip("triton")
    from grpo.models import fp8_triton

    too_many_rows = torch.empty(65535 * 128 + 1, 256, dtype=torch.bfloat16, device="meta")
    with pytest.raises(
        ValueError, match=r"fp8_triton: a \(8388481, 256\) tensor needs a \(4, 65536, 1\) grid"
    ):
        fp8_triton.quantize_activation(too_many_rows)
    # a stack of matrices launches along the third axis
    with pytest.raises(ValueError, match="at most 65535 along its second and third axes"):
        fp8_triton.quantize_weight_blocks(torch.empty(65536, 128, 128, device="meta"))


if __name__ == "__main__":
    # BF16 too: the kernel holds a BF16 tile as BF16 until each copy converts it (these values are exact)
    for dtype in (torch.float32, torch.bfloat16):
        for p2 in (False, True):
            torch.manual_seed(0)
            check_against_portable_quantizers(_exactly_representable(200, 300).to(dtype), p2)
