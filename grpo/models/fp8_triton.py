"""Fused FP8 quantizers for the GPU path of `Fp8Linear` (Triton).

Each GEMM operand of the DeepSeek-V3 recipe needs a quantized copy in a given layout: activations in
1 x 128 tiles for the forward, and transposed for the weight gradient (where the tokens are the
reduction); output gradients likewise; weights in 128 x 128 blocks, and transposed for the input
gradient. Done in separate PyTorch passes (quantize, transpose, pad) these copies cost more than the
FP8 GEMMs save. Here one kernel reads each 128 x 128 tile of its input once and writes both copies,
already zero-padded to what cuBLASLt's blockwise GEMM accepts, and the scales already in the layout
it reads (so `fp8.fp8_gemm` copies nothing).

Scales and rounding are those of `fp8.quantize_tiles` / `fp8.quantize_blocks` (`scale_inv = amax /
448`, optionally a power of two; all-zero tiles get the 1e-12 floor); the GPU tests compare them bit
for bit on FP32 inputs. On BF16 inputs they are not bitwise equal (H200, 2026-11-28): a BF16 value
divided by its scale often lands exactly between two E4M3 values, and Triton's division, which is
not IEEE-rounded, sends some of those ties to the other neighbour (seen in `x.T`'s block-scaled
copy), one E4M3 step on that value. Exact division (`tl.div_rn`) removed the difference but made
the quantizers twice as slow, and multiplying each value by its tile's reciprocal made them 17-45%
slower (`benchmarks/results/fp8_linear_h200.txt`); neither was kept.

Padding: the rows of a GEMM's left operand to 16, every other dimension to 512 (4 scale blocks:
cuBLASLt reads scale rows 16-byte aligned). Zeros change no product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grpo.models.fp8 import CUBLAS_ROWS, E4M3, SIDE_ALIGN, T, round_up

ROW_ALIGN = CUBLAS_ROWS

# how a copy is scaled: the direct copy by ROWS or BLOCKS, the transposed one by BLOCKS or COLUMNS
# (of the input tile), or NONE made
NONE, ROWS, BLOCKS, COLUMNS = 0, 1, 2, 3
MAX_GRID_YZ = 65535


@triton.jit
def _scale_inv(amax, POWER_OF_TWO: tl.constexpr):
    scale_inv = tl.maximum(amax, 1e-12) / 448.0  # E4M3_MAX (a literal: jit code reads no globals)
    if POWER_OF_TWO:
        scale_inv = tl.exp2(tl.ceil(tl.log2(scale_inv)))
    return scale_inv


# Integer arguments keep Triton's divisibility-by-16 specialization: with `do_not_specialize` on the
# sizes, this kernel ran 1.6x slower on the H100 (no vectorized stores). The tile stays whole in
# registers, which bounds how many programs share an SM; what the H200 ran fastest
# (`benchmarks/results/fp8_linear_h200.txt`, sessions 16-17):
# - the tile held in its own dtype until each copy converts it: the activation's copies in 80
#   registers a thread instead of 125 (3 programs an SM instead of 2), 4% faster; but the weight's
#   copy 10-15% slower, so weights are converted once, up front;
# - the transposed copy scaled per column made from the transposed tile (its column maxima become
#   row maxima), which lets the output gradient's copies fit `launch_settings`' register cap without
#   spilling: 159 registers a thread instead of 223, 3 programs an SM instead of 2, 7-11% faster
#   (the same code uncapped, or the old code capped, was slower than before);
# - reading the tile in row chunks, twice, or looping persistently over tiles with pipelined loads
#   freed registers too, but ran 5-27% slower at their best settings (session 16).
@triton.jit
def _quantize_kernel(
    x_ptr,
    stride_xb,
    stride_xr,
    stride_xc,
    rows,
    cols,
    layout_ptr,
    q_ptr,
    q_rows,
    q_cols,
    qs_ptr,
    qs_stride,
    t_ptr,
    t_rows,
    t_cols,
    ts_ptr,
    ts_stride,
    DIRECT: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    POWER_OF_TWO: tl.constexpr,
    SKIP_PADDING: tl.constexpr,
):
    """One 128 x 128 tile of `x` -> its direct copy `q` (scaled per row of the tile or per block)
    and its transposed copy `t` (scaled per block or per column of the tile). Axis 2 of the grid
    runs over a batch of matrices (`stride_xb` apart in `x`, each copy and its scales one after
    another). With SKIP_PADDING, the rows whose `layout` entry is negative (padding) read as zeros."""
    if DIRECT == 2:  # the grid's fastest axis: see `_quantize`
        pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    else:
        pid_c, pid_r = tl.program_id(0), tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    x_ptr += pid_b * stride_xb
    q_ptr += pid_b * q_rows * q_cols
    qs_ptr += pid_b * qs_stride * ((q_rows if DIRECT == 2 else q_cols) // 128)
    t_ptr += pid_b * t_rows * t_cols
    ts_ptr += pid_b * ts_stride * ((t_rows if TRANSPOSED == 2 else t_cols) // 128)
    r = pid_r * 128 + tl.arange(0, 128)
    c = pid_c * 128 + tl.arange(0, 128)
    inside = (r[:, None] < rows) & (c[None, :] < cols)
    if SKIP_PADDING:
        inside &= tl.load(layout_ptr + r, mask=r < rows, other=-1)[:, None] >= 0
    x = tl.load(x_ptr + r[:, None] * stride_xr + c[None, :] * stride_xc, mask=inside, other=0.0)
    if DIRECT == 2:  # a weight (see above); `.to(tl.float32)` below is then a no-op
        x = x.to(tl.float32)
    magnitude = tl.abs(x)  # maxima are exact in any float dtype
    block_scale = _scale_inv(tl.max(tl.max(magnitude, axis=1), axis=0).to(tl.float32), POWER_OF_TWO)

    # direct copy: rows x cols, padded to q_rows x q_cols
    if DIRECT == 2:
        q = x.to(tl.float32) / block_scale
        direct_scale_at = qs_ptr + pid_r * qs_stride + pid_c
        tl.store(direct_scale_at, block_scale, mask=(pid_r * 128 < q_rows) & (pid_c * 128 < q_cols))
    else:
        row_scale = _scale_inv(tl.max(magnitude, axis=1).to(tl.float32), POWER_OF_TWO)
        q = x.to(tl.float32) / row_scale[:, None]
        # stored (cols/128) x rows: the column-major layout cuBLASLt reads tile scales in
        tl.store(
            qs_ptr + pid_c * qs_stride + r, row_scale, mask=(r < q_rows) & (c * 0 + pid_c * 128 < q_cols)
        )
    q = tl.clamp(q, -448.0, 448.0).to(tl.float8e4nv)
    q_inside = (r[:, None] < q_rows) & (c[None, :] < q_cols)
    tl.store(q_ptr + r[:, None] * q_cols + c[None, :], q, mask=q_inside)

    # transposed copy: cols x rows, padded to t_rows x t_cols
    if TRANSPOSED != 0:
        if TRANSPOSED == 2:
            t = x.to(tl.float32) / block_scale
            transposed_scale_at = ts_ptr + pid_c * ts_stride + pid_r
            tl.store(transposed_scale_at, block_scale, mask=(pid_c * 128 < t_rows) & (pid_r * 128 < t_cols))
            # transposed in FP8: a quarter of the shared memory of an FP32 transpose (same speed)
            t = tl.trans(tl.clamp(t, -448.0, 448.0).to(tl.float8e4nv))
        else:
            x_t = tl.trans(x).to(tl.float32)
            column_scale = _scale_inv(tl.max(tl.abs(x_t), axis=1), POWER_OF_TWO)
            t = x_t / column_scale[:, None]
            scale_ok = (c < t_rows) & (r * 0 + pid_r * 128 < t_cols)
            tl.store(ts_ptr + pid_r * ts_stride + c, column_scale, mask=scale_ok)
            t = tl.clamp(t, -448.0, 448.0).to(tl.float8e4nv)
        t_inside = (c[:, None] < t_rows) & (r[None, :] < t_cols)
        tl.store(t_ptr + c[:, None] * t_cols + r[None, :], t, mask=t_inside)


# A launch through Triton's JIT dispatch costs about 30 us of CPU (it binds and classifies every
# argument, then looks the kernel up), more than the rest of a small layer's step; the layer makes
# four. So each compiled kernel is also kept here, under what Triton compiled it for, and launched
# directly: the kernel, its warps and register cap, the device, the constexprs, the first input's
# dtype and 16-byte alignment, and each integer's class (`_int_class`). The outputs are fresh
# allocations, aligned like any other, and so is a padded layout
# (`fp8_grouped_deep_gemm.PaddedLayout.layout_P`, a whole `torch.full`).
_compiled: dict[tuple, object] = {}


def _int_class(value: int) -> int:
    """What Triton specializes an integer argument on: being 1, a multiple of 16, or past 32 bits."""
    return (value == 1) | (value % 16 == 0) << 1 | (value >= 2**31) << 2


def launch_through_jit(
    grid: tuple[int, int, int], args: tuple, kernel=_quantize_kernel, num_warps: int = 4, max_registers=None
):
    """`kernel` launched through Triton's JIT dispatch, every argument positional (constexprs
    included, last), with at most `max_registers` a thread where given; returns what Triton
    compiled for them."""
    cap = {} if max_registers is None else {"maxnreg": max_registers}
    return kernel[grid](*args, num_warps=num_warps, **cap)


def _launch(
    grid, args: tuple, kernel=_quantize_kernel, constexprs: int = 4, num_warps: int = 4, max_registers=None
) -> None:
    """`kernel` on `args`, whose last `constexprs` are its constexprs, through `_compiled`."""
    x, given = args[0], args[len(args) - constexprs :]
    integers = tuple(_int_class(a) for a in args[: len(args) - constexprs] if type(a) is int)
    key = (kernel, num_warps, max_registers, x.device, x.dtype, x.data_ptr() % 16 == 0, given, integers)
    compiled = _compiled.get(key)
    if compiled is not None:
        compiled[grid](*args)
        return
    compiled = launch_through_jit(grid, args, kernel, num_warps, max_registers)
    if hasattr(compiled, "packed_metadata"):  # Triton's interpreter (the CPU tests) compiles nothing
        _compiled[key] = compiled


# an SM's 65536 registers over 3 programs of 4 warps (128 threads), in the steps of 8 they come in: 168
THREE_PROGRAMS_OF_4_WARPS = 65536 // (3 * 4 * 32) // 8 * 8


def launch_settings(direct: int, transposed: int) -> tuple[int, int | None]:
    """Warps per program and register cap a thread (None: the compiler's choice) of the quantizer
    making these copies. What the H200 ran fastest (8192 tokens, `probe_quantizer_warps_gpu.py`,
    session 18): copies in tiles only with 4 warps capped to 3 programs an SM (the output gradient's
    8192 x 7168: 76 us, against 91 uncapped, 90 with 8 warps; the activation's alone: 44 against
    47), copies with a block-scaled part with 8 warps (the activation's 8192 x 7168: 63 us against
    65 with 4 capped, 69 uncapped; the weight's 7168 x 2048: 9.7 against 10.2)."""
    if direct == BLOCKS or transposed == BLOCKS:
        return 8, None
    return 4, THREE_PROGRAMS_OF_4_WARPS


def _quantize(x, direct: int, transposed: int, direct_rows: int, power_of_two: bool, layout=None):
    """Returns `(q, q_scale, t, t_scale)`: `q` is `x` padded to direct_rows x SIDE_ALIGN, `t` is
    `x.T` padded to SIDE_ALIGN x SIDE_ALIGN (both None with NONE). Tile scales come as column-major
    views, block scales contiguous. A 3-d `x` is a batch of matrices: each output then has the batch
    as its first axis. With `layout` (int32, one entry per row of a 2-d `x`), rows whose entry is
    negative are quantized as zeros: the padding rows of `fp8_grouped_deep_gemm`'s layout, whatever
    they hold."""
    batch = (x.shape[0],) if x.dim() == 3 else ()  # a 2-d `x` is a batch of one, with no view made
    rows, cols = x.shape[-2:]
    q_rows, q_cols = round_up(rows, direct_rows), round_up(cols, SIDE_ALIGN)
    t_rows, t_cols = (
        (round_up(cols, SIDE_ALIGN), round_up(rows, SIDE_ALIGN)) if transposed != NONE else (0, 0)
    )
    tiles_r, tiles_c = max(round_up(q_rows, T), t_cols) // T, max(q_cols, t_rows) // T
    matrices = batch[0] if batch else 1
    # programs launch along axis 0 first: along a row of tiles (neighbours in memory) for activations
    # and gradients, 1-7% faster than down a column; down a column for weights, 23% faster (H200,
    # `benchmarks/results/fp8_linear_h200.txt`, sessions 17-18)
    grid = (tiles_r, tiles_c, matrices) if direct == BLOCKS else (tiles_c, tiles_r, matrices)
    if grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:  # CUDA would refuse it with an unnamed error
        raise ValueError(
            f"fp8_triton: a {tuple(x.shape)} tensor needs a {grid} grid of 128 x 128 tiles; CUDA launches"
            f" at most {MAX_GRID_YZ} along its second and third axes (split the batch)"
        )
    device = x.device

    def scales(mode, rows, cols):
        return torch.empty(
            batch + ((rows // T, cols // T) if mode == BLOCKS else (cols // T, rows)), device=device
        )

    q, q_scale = (
        torch.empty(batch + (q_rows, q_cols), dtype=E4M3, device=device),
        scales(direct, q_rows, q_cols),
    )
    if transposed != NONE:
        t, t_scale = (
            torch.empty(batch + (t_rows, t_cols), dtype=E4M3, device=device),
            scales(transposed, t_rows, t_cols),
        )
    else:  # placeholders the kernel never touches (no allocations: the layer is launch-bound)
        t, t_scale = q, q_scale
    args = (  # the kernel's, in order: the input, each copy with its scales, the constexprs
        x, x.stride(0) if batch else 0, x.stride(-2), x.stride(-1), rows, cols,
        x if layout is None else layout,  # a placeholder pointer without a layout, never read
        q, q_rows, q_cols, q_scale, q_scale.stride(-2),
        t, t_rows, t_cols, t_scale, max(t_scale.stride(-2), 1),
        direct, transposed, power_of_two, layout is not None,
    )  # fmt: skip
    warps, max_registers = launch_settings(direct, transposed)
    _launch(grid, args, num_warps=warps, max_registers=max_registers)
    q_scale = q_scale if direct == BLOCKS else q_scale.transpose(-2, -1)
    if transposed == NONE:
        return q, q_scale, None, None
    return q, q_scale, t, (t_scale if transposed != COLUMNS else t_scale.transpose(-2, -1))


def quantize_activation(x_MK: torch.Tensor, power_of_two: bool = False, layout_M=None):
    """`x` in 1 x 128 tiles (forward's left operand) and `x.T` in 128 x 128 blocks (the weight
    gradient's right operand, reducing over tokens); `layout_M` as in `_quantize`."""
    return _quantize(x_MK, ROWS, BLOCKS, ROW_ALIGN, power_of_two, layout_M)


def quantize_activation_rows(x_MK: torch.Tensor, power_of_two: bool = False, layout_M=None):
    """`x` alone in 1 x 128 tiles (a forward with no backward to follow): `(q, scale)`."""
    q, q_scale, _, _ = _quantize(x_MK, ROWS, NONE, ROW_ALIGN, power_of_two, layout_M)
    return q, q_scale


def quantize_output_grad(g_MN: torch.Tensor, power_of_two: bool = False, layout_M=None):
    """`g` in 1 x 128 tiles along N (input gradient's left operand) and `g.T` in 1 x 128 tiles along
    the tokens (weight gradient's left operand); `layout_M` as in `_quantize`."""
    return _quantize(g_MN, ROWS, COLUMNS, ROW_ALIGN, power_of_two, layout_M)


def quantize_weight_blocks(w_NK: torch.Tensor, power_of_two: bool = False):
    """`w` alone in 128 x 128 blocks: `(q, scale)`; a 3-d `w` (a stack of experts' weights, or its
    transposed view) per matrix."""
    q, q_scale, _, _ = _quantize(w_NK, BLOCKS, NONE, SIDE_ALIGN, power_of_two)
    return q, q_scale


@triton.jit
def _transpose_kernel(src_ptr, dst_ptr, src_scale_ptr, dst_scale_ptr, rows, cols):
    """One 128 x 128 tile of the byte matrix `src[b]` (rows x cols, contiguous, both multiples of
    128) into `dst[b]` (cols x rows), and its block's scale from `src_scale[b]` ((rows / 128) x
    (cols / 128), contiguous) into `dst_scale[b]`, transposed alike (a separate copy of the scales
    was one more kernel, 1.3 us of a 7168->2048 layer's step on the H200); axis 2 of the grid runs
    over the batch."""
    pid_r, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    src_ptr += pid_b * rows * cols
    dst_ptr += pid_b * rows * cols
    r = pid_r * 128 + tl.arange(0, 128)
    c = pid_c * 128 + tl.arange(0, 128)
    tile = tl.load(src_ptr + r[:, None] * cols + c[None, :])
    tl.store(dst_ptr + c[:, None] * rows + r[None, :], tl.trans(tile))
    blocks_r, blocks_c = rows // 128, cols // 128
    scales_at = pid_b * blocks_r * blocks_c
    scale = tl.load(src_scale_ptr + scales_at + pid_r * blocks_c + pid_c)
    tl.store(dst_scale_ptr + scales_at + pid_c * blocks_r + pid_r, scale)


def transpose_blocks(q: torch.Tensor, scale: torch.Tensor):
    """`quantize_weight_blocks`' copy of `w.T` (of each matrix's transpose, for a stack) from its
    copy of `w`: the bytes and the block scales transposed, a pass over one byte per element
    instead of a quantizer's over the BF16 weight (`fp8.transposed_weight_blocks`)."""
    rows, cols = q.shape[-2:]
    batch = q.shape[0] if q.dim() == 3 else 1
    t = torch.empty(q.shape[:-2] + (cols, rows), dtype=q.dtype, device=q.device)
    t_scale = torch.empty(scale.shape[:-2] + (scale.shape[-1], scale.shape[-2]), device=scale.device)
    args = (q.view(torch.uint8), t.view(torch.uint8), scale.contiguous(), t_scale, rows, cols)
    _launch((rows // T, cols // T, batch), args, _transpose_kernel, constexprs=0)
    return t, t_scale
