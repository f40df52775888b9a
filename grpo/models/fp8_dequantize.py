"""An FP8 checkpoint in DeepSeek-V3's format written out again in BF16, so that a run can start from it.

DeepSeek-V3's own release and `grpo export-fp8` store linear weights as E4M3 with an FP32
`weight_scale_inv` per 128 x 128 block. Training needs high-precision master weights, and vLLM takes
the trainer's weights as BF16, so `grpo sft` and `grpo train` start from a BF16 copy written into the
run folder (`build.materialize`), as DeepSeek's `fp8_cast_bf16.py` does for other frameworks. Each
weight is `q * scale_inv` over its blocks (ragged edge blocks included) rounded once to BF16; every
other tensor is copied as it is. The copy takes twice the FP8 checkpoint's disk space.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from grpo.config import RecipeError
from grpo.models.checkpoint_rewrite import rewrite_checkpoint, shards
from grpo.models.fp8 import E4M3, T

SCALE_SUFFIX = "weight_scale_inv"
FP8_DTYPES = (E4M3, torch.float8_e5m2)  # DeepSeek-V3 stores E4M3; an E5M2 export dequantizes the same way


def fp8_block_quantized(quantization: dict | None, where: str) -> bool:
    """Whether a checkpoint's `quantization_config` says DeepSeek-V3's FP8 format; a RecipeError
    naming `where` (the key and path) for any other quantization, which a run cannot start from."""
    if quantization is None:
        return False
    method, blocks = quantization.get("quant_method"), list(quantization.get("weight_block_size") or [])
    if method == "fp8" and blocks == [T, T]:
        return True
    raise RecipeError(
        f"{where} is quantized ({method}, blocks {blocks}); training starts from BF16 or from FP8 in 128 x 128 blocks only"
    )


def dequantized_state(
    state: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`state` with each FP8 weight as a BF16 weight, scaled by its `weight_scale_inv` from `scales`
    (the whole checkpoint's: a shard may hold a weight whose scale sits in another), the scales gone."""
    out = {}
    for name, tensor in state.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if tensor.dtype not in FP8_DTYPES:
            out[name] = tensor
            continue
        scale_inv = scales.get(name.removesuffix("weight") + SCALE_SUFFIX)
        if scale_inv is None:
            raise RecipeError(f"FP8 checkpoint: the tensor {name} has no {SCALE_SUFFIX}")
        try:
            out[name] = dequantized_weight(tensor, scale_inv.float())
        except ValueError as error:
            raise RecipeError(f"FP8 checkpoint: the tensor {name} {error}") from None
    return out


def dequantized_weight(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """`q * scale_inv` over 128 x 128 blocks (edge blocks may be ragged), rounded once to BF16. One
    row of blocks at a time: its FP32 product stays in the CPU's cache and no padded copy is made
    (with `exact_float32`, 1.4-2.0x faster than a padded copy and `fp8.dequantize_blocks` on the
    whole weight, on 2 cores: `benchmarks/results/fp8_dequantize_cpu.txt`)."""
    rows, cols = q.shape
    out = torch.empty(rows, cols, dtype=torch.bfloat16)
    for i in range(0, rows, T):
        column_scales = scale_inv[i // T].repeat_interleave(T)[:cols]
        out[i : i + T] = exact_float32(q[i : i + T]).mul_(column_scales)
    return out


E4M3_TO_FP32_EXPONENT = 2.0**120
"""E4M3's exponent and mantissa bits moved into FP32's place read as a value 2^-120 of theirs (the
biases are 7 and 127), subnormals included; multiplying by a power of two is exact. E4M3's subnormals
pass through FP32 subnormals, which `torch.set_flush_denormal(True)` would zero (nothing here sets it;
the test of every E4M3 value would catch it)."""


def exact_float32(q: torch.Tensor) -> torch.Tensor:
    """The FP8 tensor `q` in FP32, exactly. E4M3 goes through its bits, because torch's CPU cast from
    E4M3 took 2.6x as long as one from uint8; its NaN bytes (0x7F, 0xFF) are a ValueError, not a
    number a checkpoint could mean."""
    if q.dtype != E4M3:
        return q.to(torch.float32)
    bits = q.view(torch.uint8).to(torch.int32)
    magnitude = bits & 0x7F
    if bool((magnitude == 0x7F).any()):
        raise ValueError("holds NaN")
    return ((bits & 0x80) << 24 | magnitude << 20).view(torch.float32).mul_(E4M3_TO_FP32_EXPONENT)


def block_scales(src: Path) -> dict[str, torch.Tensor]:
    """Every `weight_scale_inv` of the checkpoint folder `src` (1/16384 of the weights' elements)."""
    from safetensors import safe_open

    scales = {}
    for shard in shards(src):
        with safe_open(str(shard), "pt") as f:
            names = f.keys()  # the handle itself is not iterable
            scales.update({name: f.get_tensor(name) for name in names if name.endswith(SCALE_SUFFIX)})
    return scales


SOURCE_RECORD = ".fp8_source"
"""The file in a BF16 copy that says which FP8 files it was made from (JSON; no `.json` suffix, so
that loaders globbing for configs never pick it up)."""


def _source_record(src: Path) -> dict:
    """What identifies the checkpoint folder `src`'s files: its path, each file's size and time."""
    stats = {f.name: f.stat() for f in sorted(src.iterdir()) if f.is_file()}
    return {
        "src": str(src.resolve()),
        "files": {name: [st.st_size, st.st_mtime_ns] for name, st in stats.items()},
    }


def write_bf16_copy(src: Path, dst: Path) -> Path:
    """The FP8 checkpoint folder `src` written into `dst` in BF16, replacing what `dst` held; returns
    `dst`. Where `dst` already holds the copy of the same files (a rerun of a run), it is kept: a
    large model's copy takes minutes to write."""
    if dst.resolve() in (src.resolve(), *src.resolve().parents):
        raise RecipeError(f"{src} lies in {dst}, where its BF16 copy goes; give another run.name (or --out)")
    record = _source_record(src)
    kept = dst / SOURCE_RECORD
    if kept.is_file() and json.loads(kept.read_text()) == record:
        return dst
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    scales = block_scales(src)
    shutil.rmtree(dst, ignore_errors=True)
    rewrite_checkpoint(src, dst, lambda state: dequantized_state(state, scales), config)
    kept.write_text(json.dumps(record))  # last: a copy cut short is made again
    return dst
