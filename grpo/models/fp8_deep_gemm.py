"""DeepGEMM, DeepSeek's FP8 GEMM library, as the blockwise-scaled GEMM of the FP8 layers on Hopper.

It takes the operands exactly as `fp8_triton` writes them for cuBLASLt (1 x 128 tile scales
column-major, 128 x 128 block scales contiguous, FP32) and gives the same products: on an H100 it ran
the forward and input-gradient GEMMs of DeepSeek-V3's shapes 1.07-1.37x faster than cuBLASLt, and the
weight gradient 1.05-1.28x (`benchmarks/results/deep_gemm_probe_h100.txt`).

Where it comes from: vLLM ships a copy (`vllm/third_party/deep_gemm`), loaded here by its path,
without importing vLLM (whose import rewrites environment variables and patches torch's compiler), and
registered as `deep_gemm`, the name vLLM itself tries first; a standalone `deep_gemm` install wins.
Either is loaded from `deep_gemm_mirror`'s mirror of its folder, whose FP8 GEMM can also add its
product into an existing tensor (`gemm_add_into`), where that mirror can be made.
Its kernels are compiled on first use of each shape (nvcc or NVRTC, a few seconds each; cached on
disk, `DG_JIT_CACHE_DIR`); with no compiler to be found it is not used. By default a kernel has the
GEMM's N and K written into it (`compiled_dims="nk"`); M is read at run time. That suits the forward
and input gradient, whose N and K are the layer's. The weight gradient reduces over the micro-batch's
tokens, so there K is the token count, and every new count compiled the layer's kernel anew (on an
H100 under `train.micro_batch_tokens`, 56 kernels in a fresh machine's first steps against 40). Its K
is therefore read at run time too (`TOKEN_REDUCTION_COMPILED_DIMS`), which costs that GEMM 4-5% at
DeepSeek-V3's shapes (`benchmarks/fp8_first_steps_gpu.py`). Used only on compute
capability 9.0: on Blackwell it would round the FP32 scales to powers of two, which changes the
numbers.

`GRPO_DEEP_GEMM` chooses: `auto` (the default: DeepGEMM where it loads), `off` (dense GEMMs through
cuBLASLt, the experts' through the Triton kernels of `fp8_grouped`), or `on` (an error where it
cannot load).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import warnings
from types import ModuleType

import torch

from grpo.models import deep_gemm_mirror

MODES = ("auto", "on", "off")
mode = os.environ.get("GRPO_DEEP_GEMM", "auto")
"""Read per call, so a benchmark can compare both in one process."""


def _vllm_copy_folder() -> str | None:
    """The folder of vLLM's copy, found without running vLLM's `__init__`."""
    vllm = importlib.util.find_spec("vllm")
    if vllm is None or not vllm.submodule_search_locations:
        return None
    folder = os.path.join(vllm.submodule_search_locations[0], "third_party", "deep_gemm")
    return folder if os.path.exists(os.path.join(folder, "__init__.py")) else None


def _package(folder: str) -> ModuleType:
    """The package in `folder`, run and registered as `deep_gemm`."""
    init = os.path.join(folder, "__init__.py")
    spec = importlib.util.spec_from_file_location("deep_gemm", init, submodule_search_locations=[folder])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["deep_gemm"] = module  # before running it: its own imports are relative
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["deep_gemm"]
        raise
    return module


def _nvrtc_asked() -> bool:
    """Whether DeepGEMM is told to compile through NVRTC rather than nvcc (`DG_JIT_USE_NVRTC`)."""
    return os.environ.get("DG_JIT_USE_NVRTC", "0") not in ("", "0")


def _failure(error: Exception) -> str:
    """A failed DeepGEMM call's error, with the likely cause where NVRTC was asked for: vLLM 0.26's
    DeepGEMM does not compile its SM90 FP8 GEMM through NVRTC on CUDA 13 (its NVRTC options miss
    CUDA 13's `include/cccl` headers, and the kernel calls a launch intrinsic NVRTC does not
    declare; `benchmarks/results/fp8_linear_h200.txt`), and the error then says only that the
    kernel image is invalid."""
    if _nvrtc_asked():
        return f"{error}; DG_JIT_USE_NVRTC is set: unset it to compile DeepGEMM's kernels with nvcc"
    return str(error)


def _can_compile(module: ModuleType) -> bool:
    """Whether DeepGEMM will find its kernel compiler: NVRTC when asked for (`DG_JIT_USE_NVRTC`),
    else nvcc under the CUDA home it chose (a runtime-only CUDA install has none)."""
    if _nvrtc_asked():
        return True
    find_cuda_home = getattr(module, "_find_cuda_home", None)
    if find_cuda_home is None:  # a version this check does not know: its first GEMM will tell
        return True
    home = find_cuda_home()
    return home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))


adds_into_d = False
"""Whether the loaded DeepGEMM is a `deep_gemm_mirror` one, whose FP8 GEMM can add into D."""


def _folder() -> str | None:
    """The folder of the DeepGEMM to load: a standalone install's, else vLLM's copy's."""
    standalone = importlib.util.find_spec("deep_gemm")
    if standalone is not None and standalone.submodule_search_locations:
        return standalone.submodule_search_locations[0]
    return _vllm_copy_folder()


def _mirrored(folder: str) -> ModuleType:
    """DeepGEMM from `deep_gemm_mirror`'s mirror of `folder` where one can be made, else from `folder`."""
    global adds_into_d
    try:
        mirror = deep_gemm_mirror.build(folder)
    except OSError as error:  # a read-only cache folder, say
        warnings.warn(
            f"DeepGEMM's mirror was not built ({error}); autograd adds the weight gradients", stacklevel=3
        )
        mirror = None
    module = _package(mirror or folder)
    adds_into_d = mirror is not None and hasattr(module, "fp8_gemm_nt_skip_head_mid")
    return module


@functools.cache
def _load() -> ModuleType | None:
    try:
        if "deep_gemm" in sys.modules:  # loaded already (by vLLM in this process): used as it is
            module = sys.modules["deep_gemm"]
        else:
            folder = _folder()
            module = None if folder is None else _mirrored(folder)
        if module is not None and not _can_compile(module):
            raise RuntimeError("no nvcc under its CUDA home to compile its kernels")
        return module
    except Exception as error:  # noqa: BLE001 (no CUDA toolkit, a build for another torch, ...)
        warnings.warn(f"DeepGEMM is not used ({error}); the FP8 GEMMs use cuBLASLt", stacklevel=2)
        return None


@functools.cache
def _hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


def available(device: torch.device) -> bool:
    """Whether DeepGEMM loads and runs on `device` (a compute capability 9.0 GPU)."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _hopper(index) and _load() is not None


def library(device: torch.device) -> ModuleType | None:
    """DeepGEMM where the FP8 GEMMs on `device` are to use it (per `mode`), else None."""
    if mode not in MODES:
        raise ValueError(f"GRPO_DEEP_GEMM={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "off":
        return None
    if available(device):
        return _load()
    if mode == "on":
        raise RuntimeError(
            "GRPO_DEEP_GEMM=on, but DeepGEMM cannot run here: it needs a compute capability "
            "9.0 GPU and vLLM's copy or the deep_gemm package"
        )
    return None


# DeepGEMM's kernels are persistent: a GEMM's output blocks run in waves over the SMs it is told to
# use (`set_num_sms`; each count is a kernel of its own), in a block shape it picks from the shape,
# that count and the multiples a block's sides must be (`set_block_size_multiple_of`). At its
# defaults it picked 256 x 112 blocks for the weight gradient of a 7168 -> 2048 layer, 195 us on an
# H200 against 179 us in 256 x 128 blocks; and a GEMM whose blocks fill its last wave only partly ran
# 0.5-4% faster on the fewest SMs that keep its number of waves, while fewer waves' worth of SMs made
# the large GEMMs of a 7168 -> 18432 layer 1-9% slower (`benchmarks/probe_deep_gemm_configs_gpu.py`,
# `results/fp8_linear_h200.txt`; the products are bitwise the same). So the dense GEMMs ask for block
# columns that are multiples of 32, on the fewest of the card's SMs or SMS_TRIED that run their
# 256 x 128 blocks in as many waves as the whole card. The grouped GEMMs keep the library's defaults.
BLOCK_M, BLOCK_N = 256, 128  # what DeepGEMM chose at DeepSeek-V3's dense shapes once 112 was ruled out
BLOCK_N_MULTIPLE = 32
SMS_TRIED = (128, 120, 112)
_card_sms: int | None = None
_applied: tuple[int, int] | None = None

TOKEN_REDUCTION_COMPILED_DIMS = "n"
"""The sides compiled into a weight gradient's kernel: N (the layer's), not K (the token count).
A module global, so that a benchmark can put back DeepGEMM's default, "nk", to compare."""


@functools.cache
def _takes_compiled_dims(gemm_function) -> bool:
    """Whether this DeepGEMM's GEMM takes `compiled_dims` (2.x's pybind signature names it)."""
    return "compiled_dims" in (getattr(gemm_function, "__doc__", None) or "")


def _sides_compiled(gemm_function, reduces_over_tokens: bool) -> dict:
    """The keyword that keeps a token count out of the kernel, where there is one and it is needed."""
    if reduces_over_tokens and _takes_compiled_dims(gemm_function):
        return {"compiled_dims": TOKEN_REDUCTION_COMPILED_DIMS}
    return {}


@functools.cache  # asked before every dense GEMM, for a few shapes
def dense_sms(m: int, n: int, card: int) -> int:
    """The fewest SMs, of the card's `card` and SMS_TRIED, that run an m x n output's blocks in as
    many waves as the whole card does."""
    blocks = -(-m // BLOCK_M) * -(-n // BLOCK_N)
    waves = -(-blocks // card)
    return min(sms for sms in (card, *SMS_TRIED) if sms <= card and -(-blocks // sms) == waves)


def use_settings(found: ModuleType, m_n: tuple[int, int] | None) -> None:
    """DeepGEMM's block-shape choice set for a dense GEMM of an m x n output (`m_n`), or its
    defaults for a grouped one (None); it is called only when the setting changes (so a change made
    to DeepGEMM's settings elsewhere in the process goes unseen). A version without these settings
    keeps its own choice."""
    global _card_sms, _applied
    if not hasattr(found, "set_block_size_multiple_of"):
        return
    if _card_sms is None:
        _card_sms = found.get_num_sms()  # the card's: nothing here has changed it yet
    wanted = (_card_sms, 1) if m_n is None else (dense_sms(*m_n, _card_sms), BLOCK_N_MULTIPLE)
    if wanted != _applied:
        found.set_num_sms(wanted[0])
        found.set_block_size_multiple_of((1, wanted[1]))
        _applied = wanted


def gemm(
    a_MK, a_scale_MJ, b_NK, b_scale_IJ, out_dtype: torch.dtype, reduces_over_tokens: bool = False
) -> torch.Tensor | None:
    """`a @ b.T` (operands as `fp8.fp8_gemm` takes them) through DeepGEMM's `fp8_gemm_nt`, or None
    where DeepGEMM is not to be used (the caller runs cuBLASLt). `reduces_over_tokens`: K is a token
    count (a weight gradient), which the kernel then reads at run time. Under `auto`, a DeepGEMM failure
    (a kernel that does not compile, say) warns once and turns DeepGEMM off for the process; the
    grouped GEMMs (`fp8_grouped_deep_gemm`) raise instead, their layout being chosen already."""
    global mode
    found = library(a_MK.device)
    if found is None:
        return None
    out_MN = torch.empty(a_MK.shape[0], b_NK.shape[0], dtype=out_dtype, device=a_MK.device)
    try:
        use_settings(found, out_MN.shape)
        found.fp8_gemm_nt(
            (a_MK, a_scale_MJ),
            (b_NK, b_scale_IJ),
            out_MN,
            **_sides_compiled(found.fp8_gemm_nt, reduces_over_tokens),
        )
    except RuntimeError as error:
        if mode == "on":
            raise RuntimeError(_failure(error)) from error
        warnings.warn(
            f"DeepGEMM failed ({_failure(error)}); the FP8 GEMMs use cuBLASLt from now on", stacklevel=2
        )
        mode = "off"
        return None
    return out_MN


def gemm_add_into(a_MK, a_scale_MJ, b_NK, b_scale_IJ, into_MN: torch.Tensor) -> bool:
    """`into += a @ b.T` (operands as `gemm` takes them, laid out), added by the GEMM's epilogue as
    it stores each BF16 tile (`deep_gemm_mirror`): True where done. It adds a weight gradient, so K
    is a token count, read at run time. False where DeepGEMM cannot here
    (not to be used, no mirror, `into` not a contiguous BF16 tensor of the product's exact shape), and
    then the caller adds. A failure (a kernel that does not compile, say) warns once and leaves the
    adding to the callers from then on."""
    global adds_into_d
    m, n = a_MK.shape[0], b_NK.shape[0]
    if into_MN.dtype != torch.bfloat16 or not into_MN.is_contiguous() or into_MN.shape != (m, n):
        return False
    found = library(a_MK.device)
    if found is None or not adds_into_d:
        return False
    try:
        use_settings(found, (m, n))
        # head splits (n, 0, 0): every column kept, and the mirror's adding epilogue chosen
        found.fp8_gemm_nt_skip_head_mid(
            (a_MK, a_scale_MJ),
            (b_NK, b_scale_IJ),
            into_MN,
            (n, 0, 0),
            **_sides_compiled(found.fp8_gemm_nt_skip_head_mid, reduces_over_tokens=True),
        )
    except RuntimeError as error:
        warnings.warn(
            f"DeepGEMM's adding GEMM failed ({_failure(error)}); autograd adds from now on", stacklevel=2
        )
        adds_into_d = False
        return False
    return True
