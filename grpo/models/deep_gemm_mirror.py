"""DeepGEMM loaded from a mirror of its folder, in which its Hopper FP8 GEMM can add its product into D.

A linear layer's weight gradient is added into `.grad` over an optimizer step's micro-batches. Done by
autograd, that add is a pass of its own after the GEMM: it reads `.grad` and the new gradient and
writes the sum, 26 us of a 680 us FP8 layer step at DeepSeek-V3's 7168 -> 2048 (H100,
`results/fp8_linear_h100.txt`). DeepGEMM's own BF16 GEMM can instead add its output tile into D by a
TMA reduction as it stores it (`cp.reduce.async.bulk.tensor ... .add`); its FP8 GEMM with 1 x 128 and
128 x 128 scales (`sm90_fp8_gemm_1d2d`) only stores.

DeepGEMM compiles its kernels on first use from the headers under its folder's `include/`, the folder
its `__init__` is loaded from. The mirror is that folder made of symbolic links, except for the FP8
GEMM's header, `HEADER`, which becomes `ADDING_HEADER`. That header includes the original under
another name (`ORIGINAL`). Inside it, it turns the epilogue's TMA store into a TMA reduce-add for one
epilogue type only: `EpilogueHeadSplits<n, 0, 0>`. That type maps every column to itself, so it
skips nothing. `fp8_gemm_nt_skip_head_mid(..., head_splits=(n, 0, 0))` asks for it; DeepGEMM's own
callers skip a middle part of some columns, never of none. Every other instantiation compiles to the
original kernel.

The mirror is built once per DeepGEMM folder and header text, under DeepGEMM's kernel cache
(`DG_JIT_CACHE_DIR`, else `~/.deep_gemm`). Where DeepGEMM's headers are not as this module expects
(`can_mirror`), no mirror is built and DeepGEMM loads from its own folder: the layers then add the
gradient as before.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

HEADER = os.path.join("include", "deep_gemm", "impls", "sm90_fp8_gemm_1d2d.cuh")
ORIGINAL = "sm90_fp8_gemm_1d2d_original.cuh"
STORE = "cute::SM90_TMA_STORE_2D::copy(&tensor_map_d,"
EPILOGUE_TYPE = "typename epilogue_type_t"
NEEDED = {  # what ADDING_HEADER names from the other headers: file -> what it must define
    os.path.join("include", "deep_gemm", "epilogue", "transform.cuh"): "struct EpilogueHeadSplits",
    os.path.join("include", "cute", "arch", "copy_sm90_tma.hpp"): "struct SM90_TMA_REDUCE_ADD_2D",
}

ADDING_HEADER = f"""#pragma once
// Written by grpo.models.deep_gemm_mirror: DeepGEMM's {os.path.basename(HEADER)}, whose epilogue adds
// its BF16 tile into D by a TMA reduction where the epilogue type is EpilogueHeadSplits<n, 0, 0>.
#include <cute/arch/copy_sm90_tma.hpp>
#include <deep_gemm/epilogue/transform.cuh>

namespace cute {{
template <typename epilogue_t>
struct GrpoStoreOrAddIntoD: SM90_TMA_STORE_2D {{}};

template <uint32_t kLeft, uint32_t kRight>
struct GrpoStoreOrAddIntoD<deep_gemm::epilogue::transform::EpilogueHeadSplits<kLeft, 0, kRight>>
    : SM90_TMA_REDUCE_ADD_2D {{}};
}}  // namespace cute

// Only the epilogue's store names SM90_TMA_STORE_2D past this point (can_mirror checked it).
#define SM90_TMA_STORE_2D GrpoStoreOrAddIntoD<epilogue_type_t>
#include <deep_gemm/impls/{ORIGINAL}>
#undef SM90_TMA_STORE_2D
"""


def cache_root() -> str:
    """Where DeepGEMM keeps its compiled kernels: the mirrors go beside them."""
    return os.environ.get("DG_JIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".deep_gemm")


def _text(path: str) -> str:
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return ""


def can_mirror(folder: str) -> bool:
    """Whether `ADDING_HEADER` compiles against this DeepGEMM as meant: the GEMM header's epilogue
    type has the name the macro uses, its epilogue's store is the one use of `SM90_TMA_STORE_2D`
    (the name the macro replaces), and the types the wrapper names exist. A wrapper that did not
    compile would take every FP8 GEMM of the layers off DeepGEMM, not only the adding one."""
    header = _text(os.path.join(folder, HEADER))
    return (
        header.count("SM90_TMA_STORE_2D") == 1
        and STORE in header
        and EPILOGUE_TYPE in header
        and all(needed in _text(os.path.join(folder, path)) for path, needed in NEEDED.items())
    )


def _link_all_but(source: str, target: str, keep: str) -> None:
    """`target` as a new folder of links to every entry of `source` but `keep`."""
    os.mkdir(target)
    for name in os.listdir(source):
        if name != keep:
            os.symlink(os.path.join(source, name), os.path.join(target, name))


def _write_mirror(folder: str, target: str) -> None:
    parts = HEADER.split(os.sep)
    source = folder
    for part in parts:
        _link_all_but(source, target, part)
        source, target = os.path.join(source, part), os.path.join(target, part)
    os.symlink(source, os.path.join(os.path.dirname(target), ORIGINAL))
    with open(target, "w") as out:
        out.write(ADDING_HEADER)


def build(folder: str) -> str | None:
    """The mirror of DeepGEMM's package `folder` (made if missing), or None where its header is not
    as expected."""
    folder = os.path.realpath(folder)  # the links must not depend on the working directory
    if not can_mirror(folder):
        return None
    key = "\0".join((folder, _text(os.path.join(folder, HEADER)), ADDING_HEADER)).encode()
    home = os.path.join(cache_root(), f"grpo-mirror-{hashlib.sha256(key).hexdigest()[:16]}")
    mirror = os.path.join(home, "deep_gemm")
    if os.path.isdir(mirror):
        return mirror
    os.makedirs(cache_root(), exist_ok=True)
    draft = tempfile.mkdtemp(dir=cache_root(), prefix="grpo-mirror-draft-")
    try:
        _write_mirror(folder, os.path.join(draft, "deep_gemm"))
        os.rename(draft, home)  # whole, or not at all: another process may be building it too
    except OSError:
        shutil.rmtree(draft, ignore_errors=True)
        if not os.path.isdir(mirror):
            raise
    return mirror
