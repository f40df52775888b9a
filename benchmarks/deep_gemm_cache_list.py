"""The FP8 GEMM kernels DeepGEMM has compiled into its cache, in the order they were written, each
with the template arguments that made it a kernel of its own.

DeepGEMM compiles a kernel per set of template arguments and keeps each in a folder of its cache
(`kernel.<name>.<hash>/`, with its `kernel.cu` and `kernel.cubin`). For its Hopper FP8 GEMM
(`sm90_fp8_gemm_1d2d_impl`, dense and grouped) these are the compiled sides (a 0 is read at run
time: the row count always, the token count of the trainer's weight gradients), the block shape,
pipeline stages, TMA multicast, SM count, GEMM type and epilogue. So the list says why a run
compiled as many kernels as it did (`results/deep_gemm_kernels_token_cap_h100.txt`).

    python3 benchmarks/deep_gemm_cache_list.py [CACHE]   # default: $DG_JIT_CACHE_DIR, else ~/.deep_gemm

Prints a line per kernel, then one JSON object: the count, the kernels per compiled shape, and how
many read K at run time.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
from pathlib import Path

from grpo.models.deep_gemm_mirror import cache_root

IMPL = "sm90_fp8_gemm_1d2d_impl<"
# the template's parameters, in order (DeepGEMM's include/deep_gemm/impls/sm90_fp8_gemm_1d2d.cuh)
PARAMETERS = (
    "major_sfb", "m", "n", "k", "groups", "block_m", "block_n", "block_k",
    "swizzle_a", "swizzle_b", "swizzle_d", "stages", "tma_threads", "math_threads",
    "multicast", "multicast_on_a", "sms", "gemm_type", "cd_dtype", "epilogue",
)  # fmt: skip


def short(value: str) -> str:
    """A C++ name without its namespaces: `epilogue::transform::EpilogueHeadSplits<512, 0, 0>` ->
    `EpilogueHeadSplits<512, 0, 0>`, `GemmType::Normal` -> `Normal`."""
    name, bracket, rest = value.partition("<")
    return name.split("::")[-1] + bracket + rest


def template_arguments(source: str) -> dict[str, str] | None:
    """The FP8 GEMM's template arguments named in a kernel's source; None for another kernel, or
    for a template of other parameters (another DeepGEMM version)."""
    start = source.find(IMPL)
    if start < 0:
        return None
    depth, arguments, current = 1, [], []
    for char in source[start + len(IMPL) :]:
        depth += (char == "<") - (char == ">")
        if depth == 0:
            break
        if char == "," and depth == 1:
            arguments.append("".join(current))
            current = []
        else:
            current.append(char)
    arguments.append("".join(current))
    if len(arguments) != len(PARAMETERS):
        return None
    return dict(zip(PARAMETERS, (short(" ".join(argument.split())) for argument in arguments)))


def kernel_folders(cache: Path) -> list[Path]:
    """The cache's kernel folders, oldest first."""
    folders = (folder for folder in cache.glob("kernel.*") if folder.is_dir())
    return sorted(folders, key=lambda folder: folder.stat().st_mtime)


def compiled_shape(found: dict[str, str]) -> str:
    """What a kernel is compiled for besides its settings: the sides, the GEMM and its epilogue."""
    return f"N {found['n']} K {found['k']} groups {found['groups']} {found['gemm_type']} {found['epilogue']}"


def settings(found: dict[str, str]) -> str:
    """The choices made from the row count: block shape, stages, TMA multicast, SM count."""
    on_a = " on A" if found["multicast_on_a"] == "true" else ""
    return (
        f"block {found['block_m']} x {found['block_n']}, stages {found['stages']},"
        f" multicast {found['multicast']}{on_a}, sms {found['sms']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "cache", nargs="?", type=Path, default=Path(cache_root()), help="DeepGEMM's cache folder"
    )
    args = parser.parse_args()
    kernels = args.cache / "cache"
    if not kernels.is_dir():
        parser.exit(2, f"deep_gemm_cache_list: no kernel folder at {kernels}\n")
    folders = kernel_folders(kernels)
    by_shape: collections.Counter[str] = collections.Counter()
    k_at_run_time = 0
    for folder in folders:
        written = datetime.datetime.fromtimestamp(folder.stat().st_mtime).strftime("%H:%M:%S")
        source = folder / "kernel.cu"
        found = template_arguments(source.read_text()) if source.is_file() else None
        if found is None:
            print(f"{written}  {folder.name}: not a kernel of sm90_fp8_gemm_1d2d's known template")
            continue
        shape = compiled_shape(found)
        print(f"{written}  {shape}  {settings(found)}")
        by_shape[shape] += 1
        k_at_run_time += found["k"] == "0"
    summary = {
        "benchmark": "deep_gemm_cache_list",
        "kernels": len(folders),
        "fp8_gemm": sum(by_shape.values()),
        "k_at_run_time": k_at_run_time,
        "by_shape": dict(by_shape.most_common()),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
