"""How the FP8 layers find DeepGEMM and choose whether to use it (`grpo.models.fp8_deep_gemm`).
The GEMMs themselves are compared on a GPU in `test_fp8_triton.py`."""

import sys

import pytest
import torch

from grpo.models import fp8_deep_gemm


def test_vllms_copy_loads_as_deep_gemm_without_importing_vllm(tmp_path, monkeypatch):
    vllm = tmp_path / "vllm"
    package = vllm / "third_party" / "deep_gemm"
    package.mkdir(parents=True)
    (vllm / "__init__.py").write_text("raise RuntimeError('vllm itself was imported')\n")
    (package / "__init__.py").write_text("from .kernels import fp8_gemm_nt\n")
    (package / "kernels.py").write_text("def fp8_gemm_nt(a, b, d):\n    return 'called'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)  # another test may have imported it
    monkeypatch.delitem(sys.modules, "deep_gemm.kernels", raising=False)
    monkeypatch.setitem(sys.modules, "deep_gemm", None)  # gone again after the test

    module = fp8_deep_gemm._package(fp8_deep_gemm._vllm_copy_folder())

    assert module is sys.modules["deep_gemm"]
    assert module.fp8_gemm_nt(None, None, None) == "called"
    assert "vllm" not in sys.modules


def test_a_copy_that_fails_to_load_leaves_no_module_behind(tmp_path, monkeypatch):
    package = tmp_path / "vllm" / "third_party" / "deep_gemm"
    package.mkdir(parents=True)
    (tmp_path / "vllm" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("raise ImportError('no CUDA toolkit')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.delitem(sys.modules, "deep_gemm", raising=False)

    with pytest.raises(ImportError, match="no CUDA toolkit"):
        fp8_deep_gemm._package(fp8_deep_gemm._vllm_copy_folder())
    assert "deep_gemm" not in sys.modules


def test_an_unknown_mode_is_named_in_the_error(monkeypatch):
    monkeypatch.setattr(fp8_deep_gemm, "mode", "yes")
    with pytest.raises(ValueError, match=r"GRPO_DEEP_GEMM='yes': expected one of auto, on, off"):
        fp8_deep_gemm.gemm(torch.zeros(1, 128), None, torch.zeros(1, 128), None, torch.bfloat16)


def test_off_chooses_cublas_without_looking_for_deep_gemm(monkeypatch):
    monkeypatch.setattr(fp8_deep_gemm, "mode", "off")
    monkeypatch.setattr(fp8_deep_gemm, "available", lambda device: pytest.fail("looked for DeepGEMM"))
    assert fp8_deep_gemm.gemm(torch.zeros(1, 128), None, torch.zeros(1, 128), None, torch.bfloat16) is None


class _FailingLibrary:
    @staticmethod
    def fp8_gemm_nt(a, b, d):
        raise RuntimeError("nvcc: not found")


def test_a_failing_kernel_under_auto_warns_once_and_leaves_deep_gemm_off(monkeypatch):
    monkeypatch.delenv("DG_JIT_USE_NVRTC", raising=False)
    monkeypatch.setattr(fp8_deep_gemm, "mode", "auto")
    monkeypatch.setattr(fp8_deep_gemm, "library", lambda device: _FailingLibrary)
    with pytest.warns(UserWarning, match="DeepGEMM failed \\(nvcc: not found\\); the FP8 GEMMs use cuBLASLt"):
        assert (
            fp8_deep_gemm.gemm(torch.zeros(1, 128), None, torch.zeros(1, 128), None, torch.bfloat16) is None
        )
    assert fp8_deep_gemm.mode == "off"


def test_a_failure_under_nvrtc_says_to_compile_with_nvcc(monkeypatch):
    monkeypatch.setenv("DG_JIT_USE_NVRTC", "1")
    monkeypatch.setattr(fp8_deep_gemm, "mode", "auto")
    monkeypatch.setattr(fp8_deep_gemm, "library", lambda device: _FailingLibrary)
    expected = (
        "DeepGEMM failed (nvcc: not found; DG_JIT_USE_NVRTC is set: unset it to compile DeepGEMM's kernels "
        "with nvcc); the FP8 GEMMs use cuBLASLt from now on"
    )
    with pytest.warns(UserWarning) as caught:
        fp8_deep_gemm.gemm(torch.zeros(1, 128), None, torch.zeros(1, 128), None, torch.bfloat16)
    assert [str(warning.message) for warning in caught] == [expected]


def test_a_failing_kernel_under_on_raises(monkeypatch):
    monkeypatch.setattr(fp8_deep_gemm, "mode", "on")
    monkeypatch.setattr(fp8_deep_gemm, "library", lambda device: _FailingLibrary)
    with pytest.raises(RuntimeError, match="nvcc: not found"):
        fp8_deep_gemm.gemm(torch.zeros(1, 128), None, torch.zeros(1, 128), None, torch.bfloat16)


def test_a_cuda_home_without_nvcc_cannot_compile_deep_gemms_kernels(tmp_path, monkeypatch):
    class Library:
        @staticmethod
        def _find_cuda_home():
            return str(tmp_path)

    monkeypatch.delenv("DG_JIT_USE_NVRTC", raising=False)
    assert not fp8_deep_gemm._can_compile(Library)  # a runtime-only CUDA install
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    assert fp8_deep_gemm._can_compile(Library)
    (tmp_path / "bin" / "nvcc").unlink()
    monkeypatch.setenv("DG_JIT_USE_NVRTC", "1")
    assert fp8_deep_gemm._can_compile(Library)


def test_dense_gemms_run_on_the_fewest_sms_that_keep_their_waves_of_blocks():
    # 256 x 128 blocks of the output over 132 SMs: 448 blocks take 4 waves on 112 to 132 SMs; 512
    # take 4 on 128 (5 on 120); 1792 take 14 on 128; 4608 take 35 on 132 but 36 on 128
    assert fp8_deep_gemm.dense_sms(2048, 7168, 132) == 112
    assert fp8_deep_gemm.dense_sms(8192, 2048, 132) == 128
    assert fp8_deep_gemm.dense_sms(8192, 7168, 132) == 128
    assert fp8_deep_gemm.dense_sms(8192, 18432, 132) == 132
    assert fp8_deep_gemm.dense_sms(100, 300, 132) == 112  # one wave of 3 blocks
    assert fp8_deep_gemm.dense_sms(8192, 2048, 114) == 112  # 5 waves on a card of 114 SMs or on 112


def test_deep_gemms_settings_change_only_between_dense_and_grouped_gemms_or_shapes(monkeypatch):
    calls = []

    class Library:
        get_num_sms = staticmethod(lambda: 132)
        set_num_sms = staticmethod(lambda sms: calls.append(("sms", sms)))
        set_block_size_multiple_of = staticmethod(lambda multiples: calls.append(("multiples", multiples)))

    monkeypatch.setattr(fp8_deep_gemm, "_card_sms", None)
    monkeypatch.setattr(fp8_deep_gemm, "_applied", None)
    for m_n in ((2048, 7168), (2048, 7168), None, None, (8192, 2048)):
        fp8_deep_gemm.use_settings(Library, m_n)
    assert calls == [
        ("sms", 112), ("multiples", (1, 32)),
        ("sms", 132), ("multiples", (1, 1)),
        ("sms", 128), ("multiples", (1, 32)),
    ]  # fmt: skip


class _RecordingLibrary:
    """DeepGEMM 2.x's two dense GEMMs as far as `gemm` and `gemm_add_into` see them: pybind
    signatures that name `compiled_dims`, and the keywords each call passed."""

    calls: list = []

    @staticmethod
    def fp8_gemm_nt(a, b, d, **keywords):
        """fp8_gemm_nt(a, b, d, c=None, recipe=None, compiled_dims: str = 'nk', ...)"""
        _RecordingLibrary.calls.append(("fp8_gemm_nt", keywords))

    @staticmethod
    def fp8_gemm_nt_skip_head_mid(a, b, d, head_splits, **keywords):
        """fp8_gemm_nt_skip_head_mid(a, b, d, head_splits, ..., compiled_dims: str = 'nk', ...)"""
        _RecordingLibrary.calls.append(("fp8_gemm_nt_skip_head_mid", keywords))


def test_only_a_weight_gradient_keeps_its_token_count_out_of_deep_gemms_kernel(monkeypatch):
    monkeypatch.setattr(fp8_deep_gemm, "mode", "auto")
    monkeypatch.setattr(fp8_deep_gemm, "library", lambda device: _RecordingLibrary)
    monkeypatch.setattr(fp8_deep_gemm, "adds_into_d", True)
    monkeypatch.setattr(_RecordingLibrary, "calls", [])
    a, b = torch.zeros(4, 128), torch.zeros(8, 128)

    fp8_deep_gemm.gemm(a, None, b, None, torch.bfloat16)
    fp8_deep_gemm.gemm(a, None, b, None, torch.bfloat16, reduces_over_tokens=True)
    assert fp8_deep_gemm.gemm_add_into(a, None, b, None, torch.zeros(4, 8, dtype=torch.bfloat16))

    assert _RecordingLibrary.calls == [
        ("fp8_gemm_nt", {}),
        ("fp8_gemm_nt", {"compiled_dims": "n"}),
        ("fp8_gemm_nt_skip_head_mid", {"compiled_dims": "n"}),
    ]


def test_a_deep_gemm_without_compiled_dims_is_called_as_before(monkeypatch):
    calls = []

    class Library:
        @staticmethod
        def fp8_gemm_nt(a, b, d):  # no pybind signature naming compiled_dims
            calls.append("called")

    monkeypatch.setattr(fp8_deep_gemm, "mode", "auto")
    monkeypatch.setattr(fp8_deep_gemm, "library", lambda device: Library)
    out = fp8_deep_gemm.gemm(torch.zeros(4, 128), None, torch.zeros(8, 128), None, torch.bfloat16, True)
    assert calls == ["called"] and out.shape == (4, 8)
