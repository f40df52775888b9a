"""Probe: would the BF16 copy of an FP8 checkpoint gain from doing its arithmetic on the GPU?

On `fp8_dequantize_cpu.py`'s synthetic checkpoint, alternating: the copy as a run makes it
(`write_bf16_copy`, arithmetic on the CPU), the same copy with each shard's tensors moved to the GPU,
dequantized there by the same `dequantized_state` and moved back, and the I/O floor. Checks that
both copies are bitwise equal. Last line: one JSON object.

    python benchmarks/probe_fp8_dequantize_gpu.py
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from fp8_dequantize_cpu import no_arithmetic, seconds, write_fp8_checkpoint  # noqa: E402

from grpo.models.checkpoint_rewrite import rewrite_checkpoint  # noqa: E402
from grpo.models.fp8_dequantize import block_scales, dequantized_state, write_bf16_copy  # noqa: E402


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="fp8_dequantize_gpu_"))
    src, dst = root / "fp8", root / "bf16"
    elements = write_fp8_checkpoint(src, 4)
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    scales = {name: scale.cuda() for name, scale in block_scales(src).items()}

    def on_the_gpu(state):
        moved = {name: tensor.cuda() for name, tensor in state.items()}
        return {name: tensor.cpu() for name, tensor in dequantized_state(moved, scales).items()}

    runs = {
        "copy": lambda: write_bf16_copy(src, dst),
        "copy_gpu_arithmetic": lambda: rewrite_checkpoint(src, dst, on_the_gpu, config),
        "io_floor": lambda: rewrite_checkpoint(src, dst, no_arithmetic, config),
    }
    times = {name: [] for name in runs}
    for _ in range(3):
        for name, run in runs.items():
            shutil.rmtree(dst, ignore_errors=True)
            times[name].append(seconds(run))
    copies = []
    for name in ("copy", "copy_gpu_arithmetic"):
        shutil.rmtree(dst, ignore_errors=True)
        runs[name]()
        copies.append({shard.name: load_file(str(shard)) for shard in sorted(dst.glob("*.safetensors"))})
    equal = copies[0].keys() == copies[1].keys() and all(
        torch.equal(tensor, copies[1][shard][name])
        for shard, state in copies[0].items()
        for name, tensor in state.items()
    )
    shutil.rmtree(root)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    row = {
        "probe": "fp8_dequantize_gpu",
        "device": torch.cuda.get_device_name(),
        "cpu_threads": torch.get_num_threads(),
        "fp8_elements": elements,
        "seconds": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
        "g_elements_per_s": {name: round(elements / m / 1e9, 3) for name, m in median.items()},
        "gpu_over_cpu_arithmetic": round(median["copy"] / median["copy_gpu_arithmetic"], 3),
        "copies_bitwise_equal": equal,
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
