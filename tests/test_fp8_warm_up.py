"""Which FP8 GEMMs `grpo.models.fp8_warm_up` compiles ahead, for which row and token counts, what a
process runs and what a failed one leaves. That the counts cover every kernel a run then asks for:
the GPU test at the end."""

import json
import random
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

from grpo.models import fp8, fp8_deep_gemm, fp8_warm_up
from grpo.models.fp8 import Fp8Linear
from grpo.models.fp8_warm_up import Job, jobs_for, layout_sizes, row_counts, token_counts
from grpo.models.moe import GroupedExperts, MoeLayer, Routing
from grpo.trainer.policy_trainer import largest_micro_batch


def test_row_counts_pad_to_every_multiple_of_16_and_take_each_class_triton_specializes_on():
    assert row_counts(1) == [1]
    assert row_counts(16) == [1, 16]
    assert row_counts(40) == [1, 16, 17, 32, 40]  # 40 pads to 48


def test_token_counts_pad_to_every_multiple_of_512():
    assert token_counts(100) == [100]
    assert token_counts(512) == [512]
    assert token_counts(1500) == [512, 1024, 1500]  # 1500 pads to 1536


def test_layout_sizes_are_every_size_up_to_so_many_pairs_can_take():
    # two experts: one pair pads to 256 rows (up to 127 rows of padding each), 300 pairs to 640
    assert layout_sizes(1, 2) == [256]
    assert layout_sizes(300, 2) == [256, 384, 512, 640]


def test_every_fp8_shape_and_its_transpose_is_a_job_and_the_layers_shapes_run_the_backward():
    model = nn.Sequential(
        Fp8Linear(1024, 512),
        Fp8Linear(512, 1024),
        Fp8Linear(1024, 1536),
        Fp8Linear(1000, 500),  # padded to 1024 -> 512, the first layer's GEMM
        nn.Linear(512, 640),
    )
    model[1].fp8 = False  # runs in high precision: no FP8 GEMM

    assert jobs_for(model, 100) == [
        Job(512, 1024, 100, backward=True),
        Job(1024, 512, 100),  # the input gradient of 1024 -> 512
        Job(1024, 1536, 100),  # the input gradient of 1024 -> 1536
        Job(1536, 1024, 100, backward=True),
    ]
    assert {job.rows for job in jobs_for(model, 10**6)} == {fp8_warm_up.MAX_ROWS}


def test_experts_through_deep_gemm_are_grouped_jobs_over_every_rank_s_pairs(monkeypatch):
    # gate_up 4 x 800 x 1024 and down 4 x 1024 x 400, padded to 4 x 1024 x 1024 and 4 x 1024 x 512
    layer = MoeLayer(1024, 400, Routing(num_experts=4, top_k=2))
    layer.experts.fp8 = True
    monkeypatch.setattr(GroupedExperts, "deep_gemm", lambda self, x: "DeepGEMM")

    assert jobs_for(layer, 100, ranks=2) == [
        Job(1024, 512, 400, 4, backward=True),  # down: 100 tokens x top-2 x 2 ranks
        Job(512, 1024, 400, 4),  # down's input gradient
        Job(1024, 1024, 400, 4, backward=True),  # gate_up, its own transpose
    ]
    monkeypatch.setattr(GroupedExperts, "deep_gemm", lambda self, x: None)
    assert jobs_for(layer, 100) == []


def test_the_warm_up_does_nothing_where_deep_gemm_does_not_run():
    assert fp8_warm_up.warm_up(Fp8Linear(256, 128), 100, torch.device("cpu")) is None


def _as_on_a_gpu(monkeypatch, tmp_path, cpus=2):
    """`warm_up` past its DeepGEMM check, with the kernel cache (and the marks) under `tmp_path`."""
    monkeypatch.setenv("DG_JIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fp8_deep_gemm, "library", lambda device: "DeepGEMM")
    monkeypatch.setattr(fp8_warm_up, "kernel_setting", lambda found, index: {"card": "H100"})
    monkeypatch.setattr(fp8_warm_up.os, "sched_getaffinity", lambda pid: set(range(cpus)))


def test_a_failed_warm_up_process_warns_and_is_counted(monkeypatch, tmp_path):
    _as_on_a_gpu(monkeypatch, tmp_path)
    no_such_gpu = torch.device("cuda", 99)  # each process fails as it sets it, here or on a GPU machine

    with pytest.warns(
        UserWarning, match=r"a DeepGEMM warm-up process failed \(.+\); its kernels compile on first use"
    ):
        report = fp8_warm_up.warm_up(Fp8Linear(1024, 512), 100, no_such_gpu)

    assert report is not None
    assert (report["jobs"], report["processes"], report["failed"]) == (2, 2, 2)
    assert not (tmp_path / "grpo_warm_up").exists()  # no job is marked as run


def test_a_job_is_marked_per_card_dtype_and_shape_beside_the_kernels(monkeypatch, tmp_path):
    monkeypatch.setenv("DG_JIT_CACHE_DIR", str(tmp_path))
    jobs = [Job(512, 1024, 100, backward=True), Job(1024, 512, 100)]
    h100 = fp8_warm_up.marks(jobs, torch.bfloat16, {"card": "H100"})

    assert [mark.parent for mark in h100] == [tmp_path / "grpo_warm_up"] * 2
    assert h100 == fp8_warm_up.marks(jobs, torch.bfloat16, {"card": "H100"})
    assert len(set(h100)) == 2
    others = [
        fp8_warm_up.marks(jobs, torch.bfloat16, {"card": "H200"}),
        fp8_warm_up.marks(jobs, torch.float16, {"card": "H100"}),
        fp8_warm_up.marks(
            [Job(512, 1024, 101, backward=True), Job(1024, 512, 101)], torch.bfloat16, {"card": "H100"}
        ),
    ]
    assert all(set(h100).isdisjoint(marks) for marks in others)


def test_the_warm_up_starts_processes_only_for_jobs_not_marked_as_run(monkeypatch, tmp_path):
    _as_on_a_gpu(monkeypatch, tmp_path, cpus=4)
    layer = Fp8Linear(1024, 512)  # jobs: 512 x 1024 with its backward, 1024 x 512
    started = []

    class Started:
        def __init__(self, command, **kwargs):
            started.append(json.loads(command[-1]))

        def wait(self):
            return 0

    monkeypatch.setattr(fp8_warm_up.subprocess, "Popen", Started)
    mark, _ = fp8_warm_up.marks(jobs_for(layer, 100), torch.float32, {"card": "H100"})
    mark.parent.mkdir()
    mark.touch()

    report = fp8_warm_up.warm_up(layer, 100, torch.device("cuda", 0))
    assert report.pop("seconds") >= 0
    assert report == {"jobs": 2, "marked_before": 1, "processes": 1, "failed": 0}
    assert [request["jobs"] for request in started] == [[asdict(Job(1024, 512, 100))]]

    for request in started:  # as if each process had run its jobs
        for done in request["marks"]:
            Path(done).touch()
    started.clear()
    report = fp8_warm_up.warm_up(layer, 100, torch.device("cuda", 0))
    assert report.pop("seconds") >= 0
    assert report == {"jobs": 2, "marked_before": 2, "processes": 0, "failed": 0}
    assert started == []


def test_a_warm_up_process_runs_its_jobs_gemms_at_each_count(monkeypatch, capsys, tmp_path):
    """The process's own code (`main`), on the CPU's path: a layer's forward at each row count, then
    its backward at each token size, the weight gradient stored and then added; then the job's mark."""
    gemms = []  # (rows of the left operand, whether it reduces over tokens, the padded reduced side)
    gemm = fp8.fp8_gemm

    def recorded(a, a_scale, b, b_scale, dtype, reduces_over_tokens=False):
        gemms.append((a.shape[0], reduces_over_tokens, a.shape[1]))
        return gemm(a, a_scale, b, b_scale, dtype, reduces_over_tokens)

    monkeypatch.setattr(fp8, "fp8_gemm", recorded)
    job = Job(256, 128, 600, backward=True)
    mark = tmp_path / "grpo_warm_up" / "job"
    request = {"device": "cpu", "dtype": "torch.float32", "jobs": [asdict(job)], "marks": [str(mark)]}
    monkeypatch.setattr(sys, "argv", ["fp8_warm_up", json.dumps(request)])

    fp8_warm_up.main()

    forwards = [1, 16, 17, *range(32, 600, 16), 600]
    assert gemms[: len(forwards)] == [(m, False, 128) for m in forwards]
    backward = [  # forward, input gradient, weight gradient (K: the tokens, padded to 128 on the CPU)
        step for k, padded in ((512, 512), (512, 512), (600, 640), (600, 640))
        for step in ((k, False, 128), (k, False, 256), (256, True, padded))
    ]  # fmt: skip
    assert gemms[len(forwards) :] == backward
    report = json.loads(capsys.readouterr().out)
    assert report == {**asdict(job), "seconds": report["seconds"]}
    assert mark.exists()


def test_the_largest_micro_batch_is_the_token_cap_or_one_row_past_it():
    assert largest_micro_batch(rows_cap=8, tokens_cap=None, context=100) == 800
    assert largest_micro_batch(rows_cap=8, tokens_cap=4096, context=100) == 4096
    assert largest_micro_batch(rows_cap=8, tokens_cap=64, context=100) == 100


def _deep_gemm_runs() -> bool:
    return torch.cuda.is_available() and fp8_deep_gemm.library(torch.device("cuda")) is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _deep_gemm_runs(), reason="needs a Hopper GPU where DeepGEMM runs")
def test_after_the_warm_up_no_token_count_compiles_a_kernel():
    """Shapes no other test uses (2560 -> 1536 and back, sides the quantizers do not pad), so that
    their kernels are new to the cache; then forward and backward, the weight gradient stored and
    added, at counts on each side of every padding edge (16 rows, 512 tokens) and at random ones.
    A second warm-up on the same cache starts no process."""
    from grpo.models.deep_gemm_mirror import cache_root
    from grpo.models.fused_grad_accumulation import accumulate_into_grad

    def kernels() -> set[str]:
        return {path.name for path in (Path(cache_root()) / "cache").glob("kernel.*")}

    model = nn.Sequential(Fp8Linear(2560, 1536), Fp8Linear(1536, 2560)).to("cuda", torch.bfloat16)
    report = fp8_warm_up.warm_up(model, 1100, torch.device("cuda"))
    assert report is not None and report["failed"] == 0
    warmed = kernels()

    edges = [1, 2, 15, 16, 17, 100, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 1100]
    counts = edges + random.Random(0).sample(range(1, 1101), 20)
    for m in counts:
        x = torch.randn(m, 2560, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()  # the weight gradients stored
        with accumulate_into_grad():
            model(x).sum().backward()  # and added into .grad
    torch.cuda.synchronize()

    assert kernels() == warmed
    again = fp8_warm_up.warm_up(model, 1100, torch.device("cuda"))  # every job marked as run
    assert again is not None and (again["marked_before"], again["processes"]) == (report["jobs"], 0)
