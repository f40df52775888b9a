#!/usr/bin/env bash
# DeepGEMM for a GPU machine without vLLM, from vLLM's wheel alone: extracts the wheel's
# vllm/third_party/deep_gemm (about 30 MB for one Python version, against 435 MB for vLLM and what it
# needs) into DEST/vllm/third_party/deep_gemm. With DEST on PYTHONPATH, `grpo.models.fp8_deep_gemm` finds
# it the way it finds vLLM's copy (DEST/vllm is a namespace package: nothing of vLLM is imported).
# The machine still needs the CUDA toolkit's nvcc to compile the kernels (the lent GPU image has it).
#
#   benchmarks/deep_gemm_from_vllm_wheel.sh DEST [PYTHON_TAG]     e.g. .dg cp312 (the default)
#   then, on the GPU machine: export PYTHONPATH=$PWD/DEST:$PYTHONPATH  (carry DEST to it), or
#   DEEP_GEMM_DIR=DEST benchmarks/h100_loop.sh install fp8_profile
set -euo pipefail
if [ $# -lt 1 ]; then
    sed -n 2,10p "$0" >&2
    exit 2
fi
dest=$1 tag=${2:-cp312}
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: -d "$wheels" vllm==0.26.0
python3 - "$wheels"/vllm-*.whl "$dest" "$tag" <<'PY'
import sys
import zipfile

wheel, dest, tag = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive:
    for member in archive.namelist():
        # the compiled extension comes once per Python version; keep the one the GPU machine runs
        other_python = "/_C.cpython-" in member and f"/_C.cpython-{tag[2:]}-" not in member
        if member.startswith("vllm/third_party/deep_gemm/") and not other_python:
            archive.extract(member, dest)
PY
du -sh "$dest/vllm/third_party/deep_gemm"
