"""An FP8 checkpoint in DeepSeek-V3's format written out again in BF16, so that a run can start from it.

DeepSeek-V3's own release and `grpo export-fp8` store linear weights as E4M3 with an FP32
`weight_scale_inv` per 128 x 128 block. Training needs high-precision master weights, and vLLM takes
the trainer's weights as BF16, so `grpo sft` and `grpo train` start from a BF16 copy written into the
run folder (`build.materialize`), as DeepSeek's `fp8_cast_bf16.py` does for other frameworks. Each
weight is `q * scale_inv` over its blocks (ragged edge blocks included) rounded once to BF16; every
other tensor is copied as it is; an FP8 weight or scale holding NaN or infinity, or a scale of another
shape than its weight's blocks, is an error. The copy takes twice the FP8 checkpoint's disk space,
which is checked before it starts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from grpo.config import RecipeError
from grpo.models.checkpoint_rewrite import check_room, header, rewrite_checkpoint, shards
from grpo.models.fp8 import E4M3, T, dequantize_blocks, pad_fp8, trimmed

SCALE_SUFFIX = "weight_scale_inv"

NON_FINITE_BITS = {E4M3: 0x7F, torch.float8_e5m2: 0x7C}
"""The bits set in every NaN byte (E4M3) or NaN and infinity byte (E5M2), the sign left out."""


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
        if tensor.dtype not in NON_FINITE_BITS:  # not FP8
            out[name] = tensor
            continue
        scale_inv = scales.get(name.removesuffix("weight") + SCALE_SUFFIX)
        if scale_inv is None:
            raise RecipeError(f"FP8 checkpoint: the tensor {name} has no {SCALE_SUFFIX}")
        _check_weight(name, tensor, scale_inv)
        rows, cols = tensor.shape
        padded = pad_fp8(tensor, (-rows) % T, (-cols) % T)
        out[name] = trimmed(dequantize_blocks(padded, scale_inv.float()), rows, cols).to(torch.bfloat16)
    return out


def _check_weight(name: str, q: torch.Tensor, scale_inv: torch.Tensor) -> None:
    """A RecipeError where the FP8 weight `name` cannot be dequantized as it should: NaN or infinity
    in it or its scales (training would be NaN at its first step; the weight's read off the bytes,
    under half the time `torch.isfinite` took on the BF16 copy), not 2-D, or a scale of another shape
    than its blocks (a broadcastable one would scale the blocks wrongly, silently)."""
    bits = NON_FINITE_BITS[q.dtype]
    if bool(((q.view(torch.uint8) & bits) == bits).any()):
        raise RecipeError(f"FP8 checkpoint: the tensor {name} holds NaN or infinite values")
    if q.dim() != 2:
        raise RecipeError(f"FP8 checkpoint: the tensor {name} has {q.dim()} dimensions; FP8 weights have 2")
    blocks = (-(-q.shape[0] // T), -(-q.shape[1] // T))
    if tuple(scale_inv.shape) != blocks:
        raise RecipeError(
            f"FP8 checkpoint: the {SCALE_SUFFIX} of {name} is {' x '.join(map(str, scale_inv.shape))}; "
            f"its {q.shape[0]} x {q.shape[1]} weight has {blocks[0]} x {blocks[1]} blocks of {T} x {T}"
        )
    if not bool(torch.isfinite(scale_inv).all()):
        raise RecipeError(f"FP8 checkpoint: the {SCALE_SUFFIX} of {name} holds NaN or infinite values")


FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
"""How safetensors' headers name the FP8 dtypes."""


def bf16_copy_bytes(src: Path) -> int:
    """The tensor bytes of the BF16 copy of the FP8 checkpoint folder `src`: two bytes an FP8 element,
    no scales, every other tensor as it is. Read off the shards' headers, nothing loaded."""
    total = 0
    for shard in shards(src):
        for name, entry in header(shard).items():
            if name == "__metadata__" or name.endswith(SCALE_SUFFIX):
                continue
            start, end = entry["data_offsets"]
            total += (end - start) * (2 if entry["dtype"] in FP8_DTYPES else 1)
    return total


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
    check_room(dst, bf16_copy_bytes(src), f"the BF16 copy of the FP8 checkpoint {src}")
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    scales = block_scales(src)
    shutil.rmtree(dst, ignore_errors=True)
    rewrite_checkpoint(src, dst, lambda state: dequantized_state(state, scales), config)
    kept.write_text(json.dumps(record))  # last: a copy cut short is made again
    return dst
