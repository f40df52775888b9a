"""DeepGEMM's mirror, whose FP8 GEMM can add into D (`grpo.models.deep_gemm_mirror`), and the dense
layer's weight gradient added by that GEMM (`fp8_deep_gemm.gemm_add_into`)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from grpo.models import deep_gemm_mirror, fp8_deep_gemm
from grpo.models.deep_gemm_mirror import ADDING_HEADER, HEADER, NEEDED, ORIGINAL

GEMM = "template <typename epilogue_type_t> void gemm() {\n"
EPILOGUE = "    cute::SM90_TMA_STORE_2D::copy(&tensor_map_d, smem_ptr, n_idx, m_idx);\n"


def _fake_deep_gemm(root, header_text: str = GEMM + EPILOGUE, head_splits: bool = True) -> str:
    folder = root / "deep_gemm"
    for path in (HEADER, *NEEDED):
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text("import os\nroot = os.path.dirname(os.path.abspath(__file__))\n")
    (folder / "include" / "deep_gemm" / "common.cuh").write_text("// common\n")
    (folder / HEADER).write_text(header_text)
    for path, needed in NEEDED.items():
        (folder / path).write_text(needed if head_splits or "Epilogue" not in needed else "// none\n")
    return str(folder)


def test_the_mirror_links_everything_but_the_gemm_header(tmp_path, monkeypatch):
    monkeypatch.setenv("DG_JIT_CACHE_DIR", str(tmp_path / "cache"))
    folder = _fake_deep_gemm(tmp_path)

    mirror = deep_gemm_mirror.build(folder)

    assert mirror == deep_gemm_mirror.build(folder)  # built once
    assert os.listdir(tmp_path / "cache") == [os.path.basename(os.path.dirname(mirror))]  # no drafts left
    header = os.path.join(mirror, HEADER)
    assert not os.path.islink(header)
    with open(header) as written:
        assert written.read() == ADDING_HEADER
    assert os.readlink(os.path.join(os.path.dirname(header), ORIGINAL)) == os.path.join(folder, HEADER)
    for linked in (
        "__init__.py",
        "include/cute",
        "include/deep_gemm/common.cuh",
        "include/deep_gemm/epilogue",
    ):
        assert os.readlink(os.path.join(mirror, linked)) == os.path.join(folder, linked)
    assert sorted(os.listdir(os.path.dirname(header))) == sorted([os.path.basename(HEADER), ORIGINAL])


def test_the_package_runs_from_the_mirror_so_its_kernels_compile_from_there(tmp_path, monkeypatch):
    monkeypatch.setenv("DG_JIT_CACHE_DIR", str(tmp_path / "cache"))
    mirror = deep_gemm_mirror.build(_fake_deep_gemm(tmp_path))
    monkeypatch.setitem(sys.modules, "deep_gemm", None)  # gone again after the test

    package = fp8_deep_gemm._package(mirror)

    assert package.root == mirror  # the folder DeepGEMM's `_C.init` compiles its kernels from


def test_deep_gemm_loads_from_the_mirror_and_adds_only_from_there(tmp_path, monkeypatch):
    monkeypatch.setenv("DG_JIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fp8_deep_gemm, "adds_into_d", False)
    monkeypatch.setitem(sys.modules, "deep_gemm", None)
    known = _fake_deep_gemm(tmp_path / "known")
    with open(os.path.join(known, "__init__.py"), "a") as init:
        init.write("def fp8_gemm_nt_skip_head_mid(a, b, d, head_splits):\n    pass\n")

    assert fp8_deep_gemm._mirrored(known).root == deep_gemm_mirror.build(known)
    assert fp8_deep_gemm.adds_into_d

    unknown = _fake_deep_gemm(tmp_path / "unknown", "// a header of another version\n")
    assert fp8_deep_gemm._mirrored(unknown).root == unknown
    assert not fp8_deep_gemm.adds_into_d


def test_a_mirror_that_cannot_be_written_leaves_deep_gemm_in_its_own_folder(tmp_path, monkeypatch):
    def read_only(folder):
        raise PermissionError(13, "Permission denied", str(tmp_path / "cache"))

    monkeypatch.setattr(deep_gemm_mirror, "build", read_only)
    monkeypatch.setattr(fp8_deep_gemm, "adds_into_d", True)
    monkeypatch.setitem(sys.modules, "deep_gemm", None)
    folder = _fake_deep_gemm(tmp_path)

    with pytest.warns(UserWarning, match="mirror was not built.*Permission denied"):
        assert fp8_deep_gemm._mirrored(folder).root == folder
    assert not fp8_deep_gemm.adds_into_d


def test_the_adding_gemm_declines_what_it_cannot_add_into(monkeypatch):
    """`.grad` in FP32 (autograd adds it in FP32) or padded operands: the caller adds."""
    monkeypatch.setattr(fp8_deep_gemm, "library", lambda device: pytest.fail("looked for DeepGEMM"))
    a, b = torch.zeros(512, 256), torch.zeros(384, 256)
    assert not fp8_deep_gemm.gemm_add_into(a, None, b, None, torch.zeros(512, 384))
    assert not fp8_deep_gemm.gemm_add_into(a, None, b, None, torch.zeros(500, 384, dtype=torch.bfloat16))


def test_no_mirror_of_a_header_it_does_not_know(tmp_path, monkeypatch):
    monkeypatch.setenv("DG_JIT_CACHE_DIR", str(tmp_path / "cache"))
    assert deep_gemm_mirror.build(str(tmp_path / "nothing here")) is None
    stored_twice = GEMM + EPILOGUE + "  // cute::SM90_TMA_STORE_2D elsewhere\n"
    assert deep_gemm_mirror.build(_fake_deep_gemm(tmp_path / "a", stored_twice)) is None
    other_name = "template <typename epilogue_t> void gemm() {\n" + EPILOGUE
    assert deep_gemm_mirror.build(_fake_deep_gemm(tmp_path / "b", other_name)) is None
    assert deep_gemm_mirror.build(_fake_deep_gemm(tmp_path / "c", head_splits=False)) is None
    assert not os.path.exists(tmp_path / "cache")
    assert deep_gemm_mirror.build(_fake_deep_gemm(tmp_path / "d")) is not None  # all as expected


def _nvcc_and_deep_gemm() -> tuple[str, str] | tuple[None, str]:
    nvcc = shutil.which("nvcc")
    folder = fp8_deep_gemm._folder()
    if nvcc is None:
        return None, "needs nvcc"
    if folder is None or not os.path.exists(os.path.join(folder, HEADER)):
        return None, "needs DeepGEMM (vLLM's copy or deep_gemm) with its SM90 headers"
    return nvcc, folder


def _ptx_bulk_stores(nvcc: str, mirror: str, epilogue: str, tmp_path) -> str:
    """The PTX of the dense FP8 GEMM as DeepGEMM 2.5 instantiates it at 2048 x 8192 (256 x 128
    blocks), with `epilogue`: its bulk tensor stores and reductions into global memory."""
    source = tmp_path / "kernel.cu"
    source.write_text(
        "#include <deep_gemm/impls/sm90_fp8_gemm_1d2d.cuh>\nusing namespace deep_gemm;\n"
        "static void instantiate() { auto ptr = reinterpret_cast<void*>(&sm90_fp8_gemm_1d2d_impl<"
        "cute::UMMA::Major::K, 0, 2048, 8192, 1, 256, 128, 128, 128, 128, 128, 4, 128, 256, 1, false, 112, "
        f"GemmType::Normal, cutlass::bfloat16_t, epilogue::transform::{epilogue}>); }}\n"
    )
    ptx = tmp_path / "kernel.ptx"
    flags = ["-std=c++20", "--gpu-architecture=sm_90a", "-O3", "--expt-relaxed-constexpr"]
    subprocess.run(
        [nvcc, str(source), "-ptx", "-o", str(ptx), f"-I{mirror}/include", *flags], check=True, timeout=300
    )
    return " ".join(line.split()[0] for line in ptx.read_text().splitlines() if ".global.shared" in line)


def test_only_the_identity_head_split_compiles_to_a_reduce_add(tmp_path, monkeypatch):
    nvcc, folder = _nvcc_and_deep_gemm()
    if nvcc is None:
        pytest.skip(folder)
    monkeypatch.setenv("DG_JIT_CACHE_DIR", str(tmp_path / "cache"))
    mirror = deep_gemm_mirror.build(folder)
    assert mirror is not None, "this DeepGEMM's header is not the one the mirror knows"

    store = "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group"
    add = "cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.bulk_group"
    assert _ptx_bulk_stores(nvcc, mirror, "EpilogueHeadSplits<2048, 0, 0>", tmp_path) == add
    assert _ptx_bulk_stores(nvcc, mirror, "EpilogueIdentity", tmp_path) == store
    assert _ptx_bulk_stores(nvcc, mirror, "EpilogueHeadSplits<64, 64, 64>", tmp_path) == store


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fan_out, in_the_gemm", [(512, True), (384, False)])
def test_the_gemm_adds_the_weight_gradient_as_autograd_would(monkeypatch, fan_out, in_the_gemm):
    """Inside the trainer's scope a second backward adds dW into `.grad` in DeepGEMM's epilogue:
    the same bits as autograd's add of the same GEMM's BF16 dW (both round dW, then the sum). With
    384 outputs the quantized `g.T` has 512 rows (padded for the input gradient's GEMM), more than
    `.grad`: autograd adds."""
    from grpo.models.fp8 import Fp8Linear
    from grpo.models.fused_grad_accumulation import accumulate_into_grad

    if not fp8_deep_gemm.available(torch.device("cuda")):
        pytest.skip("DeepGEMM does not run here: it needs a Hopper GPU and vLLM's copy or deep_gemm")
    assert fp8_deep_gemm.adds_into_d, "DeepGEMM loaded without its mirror"
    added = []
    adding_gemm = fp8_deep_gemm.gemm_add_into

    def spy(*operands):
        added.append(adding_gemm(*operands))
        return added[-1]

    monkeypatch.setattr(fp8_deep_gemm, "gemm_add_into", spy)
    torch.manual_seed(3)
    layers = [Fp8Linear(512, fan_out, bias=False, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    layers[1].weight.data.copy_(layers[0].weight.data)
    batches = [
        (torch.randn(256, 512, device="cuda").bfloat16(), torch.randn(256, fan_out, device="cuda").bfloat16())
        for _ in range(2)
    ]

    for x, grad in batches:
        layers[0](x).backward(grad)
    with accumulate_into_grad():
        for x, grad in batches:
            layers[1](x).backward(grad)

    assert added == [in_the_gemm]  # the first backward found no .grad to add into
    assert torch.equal(layers[1].weight.grad, layers[0].weight.grad)
