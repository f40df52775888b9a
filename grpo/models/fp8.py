"""FP8 (E4M3) training linear layer in the DeepSeek-V3 recipe, and the converter that installs it.

Shape legend: M = tokens, K = input features (the reduction of the forward GEMM), N = output
features; `T` = 128, the tile/block edge. Scales are stored as DeepSeek's `scale_inv`: the factor that
turns FP8 values back into real ones (`x ~= q * scale_inv`).

- Activations are quantized per 1 x 128 tile along the reduction dimension, weights per 128 x 128
  block, with online scales `amax / 448` (optionally rounded up to a power of two).
- All three GEMMs (forward, input gradient, weight gradient) take FP8 operands and accumulate in
  FP32. On CUDA each is one blockwise-scaled GEMM (DeepGEMM's on Hopper where it loads, else
  cuBLASLt's) fed by the fused Triton quantizers of `fp8_triton`; elsewhere a sum over 128-wide
  reduction blocks of row/column-scaled `torch._scaled_mm` calls, which run on CPU too, so every
  property is testable here. The output is in the input's dtype.
- Inside `fused_grad_accumulation.accumulate_into_grad()` (the trainer's train step) the weight
  gradient's GEMM adds into an existing `.grad` itself where DeepGEMM can (`_weight_gradient`).
- Dimensions that are not multiples of 128 are zero-padded inside the quantizers (zeros change
  neither the amax of a tile nor any product).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import nn

from grpo.models import fp8_activation_cache, fp8_deep_gemm, fp8_weight_cache, fused_grad_accumulation

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
T = 128


def _pad_to(x: torch.Tensor, dim: int, multiple: int = T) -> torch.Tensor:
    pad = (-x.shape[dim]) % multiple
    if pad == 0:
        return x
    widths = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, pad]
    return torch.nn.functional.pad(x, widths)


def _scale_inv(amax: torch.Tensor, power_of_two: bool) -> torch.Tensor:
    scale_inv = amax.float().clamp(min=1e-12) / E4M3_MAX
    if power_of_two:
        scale_inv = torch.exp2(torch.ceil(torch.log2(scale_inv)))
    return scale_inv


def quantize_tiles(x_MK: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 1 x 128 tile along K: `(q_MK' e4m3, scale_inv_MJ fp32)`, K' = K padded, J = K' / 128."""
    x_MK = _pad_to(x_MK.contiguous(), 1)  # row-major: cuBLASLt wants the left operand so
    tiles_MJT = x_MK.float().unflatten(1, (-1, T))
    scale_inv_MJ = _scale_inv(tiles_MJT.abs().amax(dim=2), power_of_two)
    q_MJT = (tiles_MJT / scale_inv_MJ.unsqueeze(2)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q_MJT.flatten(1), scale_inv_MJ


def dequantize_tiles(q_MK: torch.Tensor, scale_inv_MJ: torch.Tensor) -> torch.Tensor:
    return (q_MK.float().unflatten(1, (-1, T)) * scale_inv_MJ.unsqueeze(2)).flatten(1)


def quantize_blocks(w_NK: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128 x 128 block: `(q_NK' e4m3, scale_inv_IJ fp32)`, I = N' / 128, J = K' / 128."""
    w_NK = _pad_to(_pad_to(w_NK.contiguous(), 0), 1)
    n, k = w_NK.shape
    blocks_ITJT = w_NK.float().view(n // T, T, k // T, T)
    scale_inv_IJ = _scale_inv(blocks_ITJT.abs().amax(dim=(1, 3)), power_of_two)
    q = (blocks_ITJT / scale_inv_IJ[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.view(n, k), scale_inv_IJ


def dequantize_blocks(q_NK: torch.Tensor, scale_inv_IJ: torch.Tensor) -> torch.Tensor:
    n, k = q_NK.shape
    return (q_NK.float().view(n // T, T, k // T, T) * scale_inv_IJ[:, None, :, None]).view(n, k)


def pad_fp8(q: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad an FP8 tensor (`F.pad` has no FP8 kernels; the zero byte is 0.0 in e4m3); with
    nothing to pad, `q` itself (contiguous), not a copy of it."""
    if not rows and not cols:
        return q.contiguous()
    return torch.nn.functional.pad(q.contiguous().view(torch.uint8), (0, cols, 0, rows)).view(q.dtype)


CUBLAS_ROWS = 16
CUBLAS_BLOCKS = 4
"""cuBLASLt's blockwise GEMM needs 16-byte aligned scale rows (a multiple of 4 K-blocks) and, here,
a multiple of 16 rows of `a` (measured on H100: 22 K-blocks gave garbage)."""
SIDE_ALIGN = CUBLAS_BLOCKS * T
"""The fused quantizers (`fp8_triton`) pad a weight's sides, and a weight gradient's tokens, to a
multiple of this; rows of an activation or gradient to a multiple of `CUBLAS_ROWS`."""


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _aligned_for_cublas(a_MK, a_scale_MJ, b_NK, b_scale_IJ):
    """Zero-pad operands to CUBLAS_ROWS / CUBLAS_BLOCKS (zero padding changes no product)."""
    blocks, rows = (-a_scale_MJ.shape[1]) % CUBLAS_BLOCKS, (-a_MK.shape[0]) % CUBLAS_ROWS
    if blocks or rows:
        a_MK = pad_fp8(a_MK, rows, blocks * T)
        a_scale_MJ = torch.nn.functional.pad(a_scale_MJ, (0, blocks, 0, rows), value=1.0)
    if blocks:
        b_NK = pad_fp8(b_NK, 0, blocks * T)
        b_scale_IJ = torch.nn.functional.pad(b_scale_IJ, (0, blocks), value=1.0)
    return a_MK, a_scale_MJ, b_NK, b_scale_IJ


def _laid_out_for_cublas(a_MK, a_scale_MJ, b_NK, b_scale_IJ) -> bool:
    """Whether the operands already are as cuBLASLt takes them (the fused quantizers' output is):
    checked so that the GEMM costs no extra PyTorch calls, which a launch-bound layer feels."""
    return (
        a_MK.shape[0] % CUBLAS_ROWS == 0
        and a_scale_MJ.shape[1] % CUBLAS_BLOCKS == 0
        and a_scale_MJ.stride(0) == 1
        and a_MK.is_contiguous()
        and b_NK.is_contiguous()
        and b_scale_IJ.is_contiguous()
    )


def trimmed(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """`x[:rows, :cols]`, or `x` itself where that is all of it (no view to make)."""
    return x if x.shape == (rows, cols) else x[:rows, :cols]


@functools.cache
def _cpu_scaled_mm_takes_row_scales() -> bool:
    """Whether this torch's CPU `_scaled_mm` takes row-wise scales: torch 2.13's does, the CPU
    backend of the GPU image's torch 2.11 takes per-tensor scales only ("only supports per-tensor
    scaling for CPU backend")."""
    q = torch.zeros(16, 16, dtype=E4M3)
    try:
        torch._scaled_mm(
            q, q.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32
        )
    except RuntimeError:
        return False
    return True


def fp8_gemm(
    a_MK: torch.Tensor,
    a_scale_MJ: torch.Tensor,
    b_NK: torch.Tensor,
    b_scale_IJ: torch.Tensor,
    out_dtype: torch.dtype,
    reduces_over_tokens: bool = False,
) -> torch.Tensor:
    """`a @ b.T` from FP8 operands: `a` scaled per 1 x 128 tile, `b` per 128 x 128 block; FP32 accumulation.
    `reduces_over_tokens` says that K is a token count (a weight gradient), for DeepGEMM's kernels.

    On CUDA this is one blockwise-scaled GEMM: DeepGEMM's on Hopper where it loads
    (`fp8_deep_gemm`), else `torch._scaled_mm` (cuBLASLt wants the tile scales column-major and the
    block scales as a transposed view; DeepGEMM takes the same layouts). Elsewhere each 128-wide K block is one
    row-wise scaled `torch._scaled_mm` (FP8 x FP8 -> FP32; emulated in FP32 where the CPU build
    takes per-tensor scales only) and the blocks are summed in FP32, the "promote to FP32 every 128
    elements" accumulation of DeepSeek-V3.
    """
    if a_MK.is_cuda:
        m = a_MK.shape[0]
        if not _laid_out_for_cublas(a_MK, a_scale_MJ, b_NK, b_scale_IJ):
            a_MK, a_scale_MJ, b_NK, b_scale_IJ = _aligned_for_cublas(a_MK, a_scale_MJ, b_NK, b_scale_IJ)
            # the scales are read by layout, not by strides: make the layouts explicit
            a_MK, a_scale_MJ = a_MK.contiguous(), a_scale_MJ.t().contiguous().t()
            b_NK, b_scale_IJ = b_NK.contiguous(), b_scale_IJ.contiguous()
        out_MN = fp8_deep_gemm.gemm(a_MK, a_scale_MJ, b_NK, b_scale_IJ, out_dtype, reduces_over_tokens)
        if out_MN is None:
            out_MN = torch._scaled_mm(
                a_MK, b_NK.t(), scale_a=a_scale_MJ, scale_b=b_scale_IJ.t(), out_dtype=out_dtype
            )
        return trimmed(out_MN, m, out_MN.shape[1])
    b_scale_NJ = b_scale_IJ.repeat_interleave(T, dim=0)
    out_MN = None
    for j in range(a_MK.shape[1] // T):
        block = slice(j * T, (j + 1) * T)
        a_Mt, a_scale_M1 = a_MK[:, block], a_scale_MJ[:, j : j + 1].contiguous()
        b_Nt, b_scale_1N = b_NK[:, block], b_scale_NJ[:, j : j + 1].t().contiguous()
        if _cpu_scaled_mm_takes_row_scales():
            part = torch._scaled_mm(
                a_Mt, b_Nt.t(), scale_a=a_scale_M1, scale_b=b_scale_1N, out_dtype=torch.float32
            )
        else:  # the same product, emulated in FP32 (FP8 -> FP32 is exact)
            part = (a_Mt.float() * a_scale_M1) @ (b_Nt.float() * b_scale_1N.t()).t()
        out_MN = part if out_MN is None else out_MN + part
    assert out_MN is not None
    return out_MN.to(out_dtype)


def weight_blocks(w: torch.Tensor, power_of_two: bool, kind: Hashable = "blocks", source=None):
    """`w` (or `source`, a view of it: the experts' stacked weights) in 128 x 128 blocks, a stack
    per matrix: `(q, scale_inv)`, reused while `w` is unchanged inside
    `fp8_weight_cache.reuse_quantized_weights` (`kind` tells apart the layers' copies)."""
    source = w if source is None else source

    def quantize():
        if source.is_cuda:
            from grpo.models import fp8_triton

            return fp8_triton.quantize_weight_blocks(source, power_of_two)
        return quantize_blocks(source, power_of_two)

    return fp8_weight_cache.quantized(w, (kind, power_of_two), quantize)


def transposed_weight_blocks(w: torch.Tensor, power_of_two: bool, blocks, kind: Hashable = "blocks"):
    """`w.T` (for a stack, each matrix's transpose) in 128 x 128 blocks, from `blocks`, `w`'s own
    copy: the same blocks with the same scales, so the same bytes and scales transposed, exactly
    what quantizing `w.T` gives; reused like `blocks` (`kind` tells apart the layers' copies)."""

    def transpose():
        q, scale = blocks
        if q.is_cuda:
            from grpo.models import fp8_triton

            return fp8_triton.transpose_blocks(q, scale)
        return q.transpose(-2, -1).contiguous(), scale.transpose(-2, -1).contiguous()

    return fp8_weight_cache.quantized(w, (kind, "transposed", power_of_two), transpose)


def activation_tiles(x_MK: torch.Tensor, power_of_two: bool):
    """`x` in 1 x 128 tiles: `(q, scale_inv)`, shared with the next layer that reads the same `x`
    (`fp8_activation_cache`)."""

    def quantize():
        if x_MK.is_cuda:
            from grpo.models import fp8_triton

            return fp8_triton.quantize_activation_rows(x_MK, power_of_two)
        return quantize_tiles(x_MK, power_of_two)

    return fp8_activation_cache.quantized(x_MK, ("tiles", power_of_two), quantize)


def activation_tiles_and_blocks(x_MK: torch.Tensor, power_of_two: bool):
    """CUDA: `x` in 1 x 128 tiles and `x.T` in 128 x 128 blocks from one pass
    (`fp8_triton.quantize_activation`), shared like `activation_tiles`."""
    from grpo.models import fp8_triton

    return fp8_activation_cache.quantized(
        x_MK, ("tiles and blocks", power_of_two), lambda: fp8_triton.quantize_activation(x_MK, power_of_two)
    )


def backward_can_follow(*inputs: torch.Tensor) -> bool:
    """Whether autograd will record an op on `inputs`. An autograd function cannot tell from
    inside: its `ctx.needs_input_grad` stays True under `torch.no_grad()`."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def fp8_linear(x_MK: torch.Tensor, w_NK: torch.Tensor, power_of_two: bool = False) -> torch.Tensor:
    """`x @ w.T` with FP8 GEMMs: through the autograd function when a backward can follow, else
    the forward alone (a logprob pass), which quantizes neither `x.T` nor `w.T`."""
    if backward_can_follow(x_MK, w_NK):
        return Fp8LinearFunction.apply(x_MK, w_NK, power_of_two)
    wq_NK, ws_IJ = weight_blocks(w_NK, power_of_two)
    xq_MK, xs_MJ = activation_tiles(x_MK, power_of_two)
    return trimmed(fp8_gemm(xq_MK, xs_MJ, wq_NK, ws_IJ, x_MK.dtype), x_MK.shape[0], w_NK.shape[0])


class Fp8LinearFunction(torch.autograd.Function):
    """The three GEMMs of a linear layer in FP8. On CUDA the operands come from the fused Triton
    quantizers (`fp8_triton`), and the forward keeps the FP8 copies the backward needs instead of
    the BF16 input; elsewhere from the portable quantizers above."""

    @staticmethod
    def forward(ctx, x_MK, w_NK, power_of_two: bool):
        m, k = x_MK.shape
        n = w_NK.shape[0]
        ctx.shape, ctx.power_of_two, ctx.weight = (m, k, n), power_of_two, w_NK
        wq_NK, ws_IJ = blocks = weight_blocks(w_NK, power_of_two)
        wq_KN, ws_JI = transposed_weight_blocks(w_NK, power_of_two, blocks)
        if x_MK.is_cuda:
            xq_MK, xs_MJ, xq_KM, xs_PL = activation_tiles_and_blocks(x_MK, power_of_two)
            ctx.save_for_backward(xq_KM, xs_PL, wq_KN, ws_JI)
        else:
            xq_MK, xs_MJ = activation_tiles(x_MK, power_of_two)
            ctx.save_for_backward(x_MK, wq_KN, ws_JI)
        return trimmed(fp8_gemm(xq_MK, xs_MJ, wq_NK, ws_IJ, x_MK.dtype), m, n)

    @staticmethod
    def backward(ctx, grad_MN):
        m, k, n = ctx.shape
        p2 = ctx.power_of_two
        # input gradient: grad (M x N) @ w (N x K), reducing over N: grad in tiles along N, the
        # weight's transpose in 128 x 128 blocks.
        # weight gradient: grad.T (N x M) @ x (M x K), reducing over the tokens: grad.T in tiles
        # along M, x.T in 128 x 128 blocks
        if grad_MN.is_cuda:
            from grpo.models import fp8_triton

            xq_KM, xs_PL, wq_KN, ws_JI = ctx.saved_tensors
            dtype = grad_MN.dtype
            gq_MN, gs_MI, gq_NM, gs_NL = fp8_triton.quantize_output_grad(grad_MN, p2)
        else:
            x_MK, wq_KN, ws_JI = ctx.saved_tensors
            dtype = x_MK.dtype
            gq_MN, gs_MI = quantize_tiles(grad_MN.to(dtype), p2)
            gq_NM, gs_NL = quantize_tiles(grad_MN.t().to(dtype), p2)
            xq_KM, xs_PL = quantize_blocks(x_MK.t(), p2)
        grad_x_MK = trimmed(fp8_gemm(gq_MN, gs_MI, wq_KN, ws_JI, dtype), m, k)
        return grad_x_MK, _weight_gradient(ctx, gq_NM, gs_NL, xq_KM, xs_PL, dtype), None


def _weight_gradient(ctx, gq_NM, gs_NL, xq_KM, xs_PL, dtype) -> torch.Tensor | None:
    """What `Fp8LinearFunction.backward` returns for the weight: dW, or None where none is wanted or
    where the GEMM itself added dW into the weight's `.grad` (`fused_grad_accumulation`,
    `fp8_deep_gemm.gemm_add_into`)."""
    if not ctx.needs_input_grad[1]:
        return None
    into = fused_grad_accumulation.grad_to_add_into(ctx.weight) if gq_NM.is_cuda else None
    if (
        into is not None
        and _laid_out_for_cublas(gq_NM, gs_NL, xq_KM, xs_PL)
        and fp8_deep_gemm.gemm_add_into(gq_NM, gs_NL, xq_KM, xs_PL, into)
    ):
        return None
    _, k, n = ctx.shape
    return trimmed(fp8_gemm(gq_NM, gs_NL, xq_KM, xs_PL, dtype, reduces_over_tokens=True), n, k)


class Fp8Linear(nn.Linear):
    """`nn.Linear` whose three GEMMs run in FP8; the master weight stays in its own dtype."""

    power_of_two_scales = False
    fp8 = True
    """False runs the plain high-precision GEMM (see `high_precision`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp8:
            return super().forward(x)
        y = fp8_linear(x.reshape(-1, x.shape[-1]), self.weight, self.power_of_two_scales)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


@contextlib.contextmanager
def high_precision(model: nn.Module):
    """Run every FP8 GEMM of `model` (linear layers and experts) in the master weights' precision
    for the duration: what vLLM computes from the same weights, for checking the weight sync."""
    switched = [m for m in model.modules() if getattr(m, "fp8", False) is True]
    for module in switched:
        module.fp8 = False
    try:
        yield
    finally:
        for module in switched:
            module.fp8 = True


HIGH_PRECISION = ("embed", "lm_head", "norm")


def default_fp8_filter(name: str, module: nn.Module) -> bool:
    """DeepSeek-V3 keeps embedding, output head, router gate and norms in high precision."""
    is_router = name.endswith(".gate")
    return (
        isinstance(module, nn.Linear) and not is_router and not any(part in name for part in HIGH_PRECISION)
    )


def has_part(name: str, part: str) -> bool:
    """Whether `part`, one or more whole dotted components (`self_attn`, `layers.0`,
    `mlp.experts`), occurs in the module name `name`."""
    return f".{part}." in f".{name}."


def unmatched_parts(parts: Sequence[str], names: Sequence[str]) -> list[str]:
    """The `parts` that `has_part` finds in none of `names`."""
    return [part for part in parts if not any(has_part(name, part) for name in names)]


def convert_to_fp8(
    model: nn.Module,
    module_filter: Callable[[str, nn.Module], bool] = default_fp8_filter,
    exclude: Sequence[str] = (),
) -> list[str]:
    """Swap the selected `nn.Linear` modules for `Fp8Linear` in place (weights are shared, not
    copied) and switch on the modules with an FP8 switch of their own (`fp8`, the grouped experts);
    returns the converted names. `exclude`: name parts (`has_part`) kept in high precision; one that
    names none of those modules raises ValueError before anything is converted, since a typo would
    otherwise train in FP8 unseen."""
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if (type(module) is nn.Linear and module_filter(name, module))
        or getattr(module, "fp8", None) is False
    ]
    unused = unmatched_parts(exclude, [name for name, _ in candidates])
    if unused:
        raise ValueError(f"{unused[0]!r} names no layer that FP8 would convert")
    converted = []
    for name, module in candidates:
        if any(has_part(name, part) for part in exclude):
            continue
        if type(module) is nn.Linear:
            module.__class__ = Fp8Linear
        else:
            module.fp8 = True
        converted.append(name)
    return converted
