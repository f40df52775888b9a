"""How fast a run's start writes the BF16 copy of an FP8 checkpoint (`fp8_dequantize.write_bf16_copy`),
against the same checkpoint rewritten with no arithmetic (the I/O floor: every shard read, a BF16
tensor of zeros of each FP8 weight's shape written), and `dequantized_state` alone on a shard already
in memory. The rounds alternate; each figure is the median.

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
from grpo.models.fp8 import E4M3, E4M3_MAX, T
from grpo.models.fp8_dequantize import SCALE_SUFFIX, block_scales, dequantized_state, write_bf16_copy

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
            # clamped: torch 2.11 casts values beyond E4M3's range to NaN (2.13 saturates them)
            values = (torch.randn(rows, cols, generator=generator) * 100).clamp(-E4M3_MAX, E4M3_MAX)
            state[name] = values.to(E4M3)
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
    times = {"copy": [], "io_floor": [], "dequantize_only": []}
    config = json.loads((src / "config.json").read_text())
    for _ in range(args.rounds):
        shutil.rmtree(dst, ignore_errors=True)
        times["copy"].append(seconds(lambda: write_bf16_copy(src, dst)))
        shutil.rmtree(dst)
        times["io_floor"].append(seconds(lambda: rewrite_checkpoint(src, dst, no_arithmetic, config)))
        shutil.rmtree(dst)
        times["dequantize_only"].append(seconds(lambda: dequantized_state(shard, scales)))
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
        "g_elements_per_s_dequantize_only": round(shard_elements / median["dequantize_only"] / 1e9, 3),
        "copy_over_io_floor": round(median["copy"] / median["io_floor"], 3),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
