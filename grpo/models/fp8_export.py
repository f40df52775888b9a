"""Export a Hugging Face checkpoint in DeepSeek-V3's FP8 format (`grpo export-fp8 SRC DST`).

Every linear weight but the embedding, output head and router gates becomes E4M3 with an FP32
`weight_scale_inv` per 128 x 128 block, as in DeepSeek-V3's own release, except those not in whole
blocks and those vLLM fuses with such a one (`high_precision_linears`); everything else is written
in BF16, except the routing bias, which stays FP32 as there (it only breaks near-ties between
experts). `--keep PART` keeps more linear weights in BF16 (e.g. `self_attn`, for a model trained
with `model.fp8_exclude: [self_attn]`; `--recipe` reads those parts from the run's recipe).
`config.json` gains the `quantization_config` that transformers (FineGrainedFP8) and vLLM
(block-wise FP8) read. Norms are 1-D and never quantized. The export's size is read off the
source's safetensors headers first, and a disk without room for it is refused before anything is
written.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from grpo.config import output_folder
from grpo.models.checkpoint_rewrite import check_room, header, rewrite_checkpoint, shards
from grpo.models.fp8 import E4M3, has_part, quantize_blocks, unmatched_parts

QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
KEEP_HIGH_PRECISION = ("embed_tokens", "lm_head", ".gate.weight")


def _fp8_candidate(name: str, dims: int) -> bool:
    """A linear weight that DeepSeek-V3 stores in FP8 (checkpoints hold floating-point weights)."""
    return dims == 2 and name.endswith(".weight") and not any(part in name for part in KEEP_HIGH_PRECISION)


def _whole_blocks(shape) -> bool:
    return shape[0] % 128 == 0 and shape[1] % 128 == 0


# vLLM loads these projections of one block as a single fused layer, whose parts must share one
# precision ("Detected some but not all shards of ...fused_qkv_a_proj are quantized", seen on the H100)
FUSED_PARTNERS = {
    "q_a_proj": ("kv_a_proj_with_mqa",),
    "kv_a_proj_with_mqa": ("q_a_proj",),
    "q_proj": ("k_proj", "v_proj"),
    "k_proj": ("q_proj", "v_proj"),
    "v_proj": ("q_proj", "k_proj"),
    "gate_proj": ("up_proj",),
    "up_proj": ("gate_proj",),
}


def high_precision_linears(shapes: dict[str, tuple[int, ...]], keep: Sequence[str] = ()) -> list[str]:
    """Module names of the linear weights (given `name -> shape` of a whole checkpoint) that stay
    BF16: those named by a part of `keep` (`fp8.has_part`, as `model.fp8_exclude` names them), those
    not in whole 128 x 128 blocks, and those vLLM fuses with one of these. DeepSeek-V3's release also
    quantizes ragged ones (kv_a_proj_with_mqa: 576 rows), but transformers cannot dequantize those
    ("not divisible by scale grid")."""
    candidates = {
        name.removesuffix(".weight"): shape
        for name, shape in shapes.items()
        if _fp8_candidate(name, len(shape))
    }
    unused = unmatched_parts(keep, list(candidates))
    if unused:
        raise ValueError(f"kept part {unused[0]!r} names no weight the export would quantize")
    chosen = [
        module
        for module, shape in candidates.items()
        if not _whole_blocks(shape) or any(has_part(module, part) for part in keep)
    ]
    kept = set(chosen)
    for module in chosen:
        prefix, _, leaf = module.rpartition(".")
        kept.update(
            f"{prefix}.{partner}"
            for partner in FUSED_PARTNERS.get(leaf, ())
            if f"{prefix}.{partner}.weight" in shapes
        )
    return sorted(kept)


def _becomes(name: str, dims: int, floating: bool, high_precision: set[str]) -> str:
    """What the export makes of a tensor: "fp8" (E4M3 with block scales: the linear weights but the
    modules in `high_precision`), "bf16" (other floating-point tensors but the routing bias, which
    stays FP32) or "same"."""
    if _fp8_candidate(name, dims) and name.removesuffix(".weight") not in high_precision:
        return "fp8"
    if floating and not name.endswith("e_score_correction_bias"):
        return "bf16"
    return "same"


def fp8_state(state: dict[str, torch.Tensor], high_precision: set[str]) -> dict[str, torch.Tensor]:
    """The export's tensors (`_becomes`)."""
    out = {}
    for name, tensor in state.items():
        becomes = _becomes(name, tensor.dim(), tensor.is_floating_point(), high_precision)
        if becomes == "fp8":
            rows, cols = tensor.shape
            q, scale_inv = quantize_blocks(tensor)
            out[name] = q[:rows, :cols].contiguous()
            out[name.removesuffix("weight") + "weight_scale_inv"] = scale_inv
        else:
            out[name] = tensor.to(torch.bfloat16) if becomes == "bf16" else tensor
    return out


FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
"""The bytes of an element of each floating-point dtype, as safetensors' headers name them."""


def export_bytes(headers: dict[str, dict], high_precision: set[str]) -> int:
    """The tensor bytes of the export, from the source's safetensors headers (`name -> entry`)."""
    total = 0
    for name, entry in headers.items():
        shape, (start, end) = entry["shape"], entry["data_offsets"]
        becomes = _becomes(name, len(shape), entry["dtype"] in FLOAT_BYTES, high_precision)
        if becomes == "fp8":  # a byte an element, an FP32 scale a 128 x 128 block
            total += shape[0] * shape[1] + 4 * -(-shape[0] // 128) * -(-shape[1] // 128)
        elif becomes == "bf16":
            total += (end - start) // FLOAT_BYTES[entry["dtype"]] * 2
        else:
            total += end - start
    return total


def export_fp8(src: str | Path, dst: str | Path, keep: Sequence[str] = ()) -> dict[str, int]:
    """Write the FP8 copy of the checkpoint folder `src` into `dst`, the modules named by `keep` in
    BF16 (`high_precision_linears`); returns tensor counts."""
    src, dst = Path(src), Path(dst)
    files = shards(src)
    if not (src / "config.json").is_file() or not files:
        raise ValueError(
            f"export-fp8: {src} is not a Hugging Face checkpoint folder (config.json + *.safetensors)"
        )
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise ValueError(
            f"export-fp8: {src} is already quantized ({config['quantization_config'].get('quant_method')})"
        )
    headers = {}  # the whole checkpoint's first: fused partners may sit in two shards
    for shard in files:
        headers.update({name: entry for name, entry in header(shard).items() if name != "__metadata__"})
    not_converted = high_precision_linears({name: tuple(e["shape"]) for name, e in headers.items()}, keep)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        # into `src` it would replace the weights it reads; into another checkpoint, mix the two
        raise ValueError(f"export-fp8: {dst} exists and is not an empty folder; give a new one")
    keep_high_precision = set(not_converted)
    check_room(dst, export_bytes(headers, keep_high_precision), f"the FP8 export of {src}")
    # both spellings: transformers reads `modules_to_not_convert`, vLLM `ignored_layers`
    config["quantization_config"] = {
        **QUANTIZATION_CONFIG,
        "modules_to_not_convert": not_converted,
        "ignored_layers": not_converted,
    }
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    output_folder(dst.parent, "export-fp8: DST")
    counts = rewrite_checkpoint(src, dst, lambda state: fp8_state(state, keep_high_precision), config)
    return {"fp8": counts[E4M3], "bf16": counts[torch.bfloat16]}
