"""How fast a run's start writes the BF16 copy of an FP8 checkpoint (`fp8_dequantize.write_bf16_copy`),
against the same checkpoint rewritten with no arithmetic (the I/O floor: every shard read, a BF16
tensor of zeros of each FP8 weight's shape written), and the dequantization alone on a shard already
in memory, two ways: a row of 128 x 128 blocks at a time (`dequantized_weight`, as the copy does) and
the whole weight at once, as before session 26 (a zero-padded copy of the FP8 weight, which these
whole-block shapes leave as it is, then `fp8.dequantize_blocks`, then rounded to BF16).
The rounds alternate; each figure is the median.

The checkpoint is synthetic, in DeepSeek-V3's format: `--shards` shards of DeepSeek-V3's expert
weights (2048 x 7168 and 7168 x 2048, E4M3, a `weight_scale_inv` per 128 x 128 block), written
into `--dir` (a fresh temporary folder by default). Files just written sit in the page cache, so
the floor is the machine's memory and serialization speed, not a cold disk's. Last line: one JSON
object.

    python benchmarks/fp8_dequantize_cpu.py [--shards 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from grpo.models.checkpoint_rewrite import rewrite_checkpoint
from grpo.models.fp8 import E4M3, T, dequantize_blocks
from grpo.models.fp8_dequantize import SCALE_SUFFIX, block_scales, dequantized_weight, write_bf16_copy

SHAPES = [(2048, 7168), (7168, 2048)]  # DeepSeek-V3's routed expert: gate/up and down
WEIGHTS_PER_SHARD = 16


def write_fp8_checkpoint(folder: Path, shards: int) -> int:
    """A synthetic FP8 checkpoint in `folder`; returns its FP8 elements."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    elements, index = 0, {}
    for s in range(shards):
        state = {}
        for w in range(WEIGHTS_PER_SHARD):
            rows, cols = SHAPES[w % 2]
            name = f"model.layers.{s}.mlp.experts.{w}.proj.weight"
            state[name] = (torch.randn(rows, cols, generator=generator) * 100).to(E4M3)
            scale_name = name.removesuffix("weight") + SCALE_SUFFIX
            state[scale_name] = torch.rand(rows // T, cols // T, generator=generator) * 1e-4
            elements += rows * cols
        save_file(state, str(folder / f"model-{s:05d}.safetensors"), metadata={"format": "pt"})
        index.update({name: f"model-{s:05d}.safetensors" for name in state})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config = {
        "model_type": "deepseek_v3",
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [T, T]},
    }
    (folder / "config.json").write_text(json.dumps(config))
    return elements


def no_arithmetic(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What `dequantized_state` writes, in shape and dtype, with nothing computed."""
    return {
        name: torch.zeros(t.shape, dtype=torch.bfloat16) if t.dtype == E4M3 else t
        for name, t in state.items()
        if not name.endswith(SCALE_SUFFIX)
    }


def padded_copy(q: torch.Tensor) -> torch.Tensor:
    """What `fp8._pad_fp8` made of a whole-block weight before session 26: a copy of it."""
    return torch.nn.functional.pad(q.view(torch.uint8), (0, 0, 0, 0)).view(q.dtype)


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="fp8_dequantize_"))
    src, dst = root / "fp8", root / "bf16"
    elements = write_fp8_checkpoint(src, args.shards)
    shard = load_file(str(next(iter(sorted(src.glob("*.safetensors"))))))
    scales = block_scales(src)
    shard_elements = sum(t.numel() for t in shard.values() if t.dtype == E4M3)
    weights = [
        (t, scales[name.removesuffix("weight") + SCALE_SUFFIX])
        for name, t in shard.items()
        if t.dtype == E4M3
    ]
    times = {"copy": [], "io_floor": [], "dequantize_rows": [], "dequantize_whole": []}
    config = json.loads((src / "config.json").read_text())
    for _ in range(args.rounds):
        shutil.rmtree(dst, ignore_errors=True)
        times["copy"].append(seconds(lambda: write_bf16_copy(src, dst)))
        shutil.rmtree(dst)
        times["io_floor"].append(seconds(lambda: rewrite_checkpoint(src, dst, no_arithmetic, config)))
        shutil.rmtree(dst)
        times["dequantize_rows"].append(seconds(lambda: [dequantized_weight(q, s) for q, s in weights]))
        times["dequantize_whole"].append(
            seconds(lambda: [dequantize_blocks(padded_copy(q), s).to(torch.bfloat16) for q, s in weights])
        )
    if args.dir is None:
        shutil.rmtree(root)
    median = {name: statistics.median(t) for name, t in times.items()}
    row = {
        "benchmark": "fp8_dequantize_cpu",
        "cpu_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "fp8_elements": elements,
        "seconds": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
        "g_elements_per_s_copy": round(elements / median["copy"] / 1e9, 3),
        "g_elements_per_s_io_floor": round(elements / median["io_floor"] / 1e9, 3),
        "g_elements_per_s_dequantize_rows": round(shard_elements / median["dequantize_rows"] / 1e9, 3),
        "g_elements_per_s_dequantize_whole": round(shard_elements / median["dequantize_whole"] / 1e9, 3),
        "copy_over_io_floor": round(median["copy"] / median["io_floor"], 3),
        "whole_over_rows": round(median["dequantize_whole"] / median["dequantize_rows"], 3),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
