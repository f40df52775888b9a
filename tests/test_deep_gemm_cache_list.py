"""`benchmarks/deep_gemm_cache_list.py`: the kernels in a DeepGEMM cache and their template arguments."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "deep_gemm_cache_list.py"

# as DeepGEMM writes a kernel's source (the H100's cache, session 37), one argument a line
SOURCE = """#include <deep_gemm/impls/sm90_fp8_gemm_1d2d.cuh>

using namespace deep_gemm;

static void __instantiate_kernel() {{
    auto ptr = reinterpret_cast<void*>(&sm90_fp8_gemm_1d2d_impl<
        cute::UMMA::Major::K,
        0, 1024, {k},
        1,
        {block_m}, 96, 128,
        128, 128, 64,
        10,
        128, 256,
        1, false,
        112, GemmType::Normal,
        cutlass::bfloat16_t,
        epilogue::transform::{epilogue}
    >);
}};
"""


def _kernel(cache: Path, name: str, written: int, source: str | None) -> None:
    folder = cache / "cache" / f"kernel.{name}"
    folder.mkdir(parents=True)
    if source is not None:
        (folder / "kernel.cu").write_text(source)
    os.utime(folder, (written, written))


def _run(cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TZ="UTC")
    return subprocess.run([sys.executable, str(SCRIPT), str(cache)], capture_output=True, text=True, env=env)


def test_each_kernel_is_listed_oldest_first_with_its_template_arguments(tmp_path):
    adding = SOURCE.format(k=0, block_m=64, epilogue="EpilogueHeadSplits<1024, 0, 0>")
    _kernel(tmp_path, "sm90_fp8_gemm_1d2d.bb", 1796659260, adding)  # 16:01:00 UTC: written after the next one
    _kernel(
        tmp_path,
        "sm90_fp8_gemm_1d2d.aa",
        1796659200,
        SOURCE.format(k=512, block_m=256, epilogue="EpilogueIdentity"),
    )
    _kernel(tmp_path, "smxx_layout.cc", 1796659230, "void transpose() {}\n")
    _kernel(
        tmp_path,
        "sm90_fp8_gemm_1d2d.dd",
        1796659290,
        SOURCE.format(k=0, block_m=128, epilogue="EpilogueIdentity"),
    )
    _kernel(tmp_path, "sm90_fp8_gemm_1d2d.ee", 1796659320, None)  # a folder without a source

    done = _run(tmp_path)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:-1] == [
        "16:00:00  N 1024 K 512 groups 1 Normal EpilogueIdentity  block 256 x 96, stages 10, multicast 1, sms 112",
        "16:00:30  kernel.smxx_layout.cc: not a kernel of sm90_fp8_gemm_1d2d's known template",
        "16:01:00  N 1024 K 0 groups 1 Normal EpilogueHeadSplits<1024, 0, 0>  block 64 x 96, stages 10, multicast 1,"
        " sms 112",
        "16:01:30  N 1024 K 0 groups 1 Normal EpilogueIdentity  block 128 x 96, stages 10, multicast 1, sms 112",
        "16:02:00  kernel.sm90_fp8_gemm_1d2d.ee: not a kernel of sm90_fp8_gemm_1d2d's known template",
    ]
    assert json.loads(lines[-1]) == {
        "benchmark": "deep_gemm_cache_list",
        "kernels": 5,
        "fp8_gemm": 3,
        "k_at_run_time": 2,
        "by_shape": {
            "N 1024 K 512 groups 1 Normal EpilogueIdentity": 1,
            "N 1024 K 0 groups 1 Normal EpilogueHeadSplits<1024, 0, 0>": 1,
            "N 1024 K 0 groups 1 Normal EpilogueIdentity": 1,
        },
    }


def test_a_template_of_other_parameters_is_not_read_as_this_one(tmp_path):
    other_version = SOURCE.format(k=0, block_m=64, epilogue="EpilogueIdentity").replace(
        "112, GemmType", "GemmType"
    )
    _kernel(tmp_path, "sm90_fp8_gemm_1d2d.ff", 1796659200, other_version)

    done = _run(tmp_path)

    assert done.stdout.splitlines()[0] == (
        "16:00:00  kernel.sm90_fp8_gemm_1d2d.ff: not a kernel of sm90_fp8_gemm_1d2d's known template"
    )


def test_a_folder_without_kernels_is_one_line_and_exit_2(tmp_path):
    done = _run(tmp_path / "nowhere")

    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == f"deep_gemm_cache_list: no kernel folder at {tmp_path / 'nowhere' / 'cache'}\n"
