"""DeepGEMM's FP8 kernels for a model, compiled before its first step in processes side by side.

DeepGEMM compiles a kernel (nvcc, 3-5 s each on the H100) the first time a GEMM needs it, one after
another in the process that asks. On a fresh H100 the GRPO loop's first step compiled 61 of them
and took 240-258 s, against 2.1 s with them cached (`benchmarks/results/grpo_loop_h100.md`,
session 37). Which kernels a run needs follows from each GEMM's N and K, which the model fixes, and
from its row count M, a micro-batch's tokens: DeepGEMM reads M at run time and picks the block
shape, the TMA multicast and (with `fp8_deep_gemm.dense_sms`) the SM count from it, each choice a
kernel of its own. `warm_up` runs every FP8 GEMM shape of the model at every row count its GEMMs
can see, up to the run's largest micro-batch, one shape per process, so that the kernels
compile in parallel into DeepGEMM's cache on disk, where the trainer finds them. Processes may share
that cache: DeepGEMM compiles each kernel in a folder of its own and renames it into place.

Which row counts: every one DeepGEMM can see, so that what it picks from them does not matter.
The FP8 operands are padded before the GEMM: a dense GEMM's M (the tokens) to a multiple of 16
(`fp8.CUBLAS_ROWS`), a weight gradient's K (the tokens again) to a multiple of 512 (`SIDE_ALIGN`),
and the routed experts' rows to a padded layout's size, a multiple of 128
(`fp8_grouped_deep_gemm.PaddedLayout`). So `row_counts` takes every multiple of 16 up to the
largest micro-batch, `token_counts` every multiple of 512, and `layout_sizes` every layout size up
to the tokens' pairs. One K would not stand for all: DeepGEMM 2.5 weighs a weight gradient's K
when it picks the block shape and the pipeline stages (`get_layout_info`, `get_pipeline_config`).
`row_counts` also takes 1 and a count neither 1 nor a multiple of 16: Triton specializes the
quantizers on each of these classes (`fp8_triton._int_class`).

A job is one GEMM shape, run through the trainer's own code:
- dense (`fp8.Fp8Linear`): the forward at each row count. The input gradient's GEMM is the forward of
  the transposed shape, a job of its own. Where a layer has this shape, the backward at each token
  count, twice: the weight gradient stored, then added into `.grad` (two epilogues, two kernels);
- grouped (`fp8_grouped_deep_gemm`): the experts' forward at each layout size; the transposed shape is
  the input gradient's; once a backward at the largest size (the Triton weight gradient).

A process marks each job it has run with an empty file in the cache (`grpo_warm_up/<key>`), the key
a hash of the job, the dtype, the card, torch's and DeepGEMM's versions, DeepGEMM's `DG_*` settings
and this package's model code: a later run on the same cache starts no process for a marked job. A
mark can outlive a kernel only where someone deletes part of the cache; the kernel then compiles on
first use. A process that fails leaves its kernels to compile on first use, as without the warm-up,
and says so in a warning. Run it where DeepGEMM runs (`fp8_deep_gemm.library`); elsewhere it does
nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from grpo.models.fp8 import CUBLAS_ROWS, SIDE_ALIGN, round_up

MAX_ROWS = 32768
"""The largest row count warmed up: the forward at every count up to it costs the GPU time of
(count / 16) GEMMs of half that size per shape. Larger micro-batches compile on first use."""


@dataclass(frozen=True)
class Job:
    out_features: int
    in_features: int
    rows: int
    """Dense: the largest row count. Grouped: the largest number of (token, expert) pairs."""
    experts: int = 0
    """0 for a dense GEMM; else the routed experts' count in the grouped GEMM."""
    backward: bool = False
    """Also run the backward once: a layer (or the experts) of this very shape is in the model."""


def row_counts(rows: int) -> list[int]:
    """Row counts up to `rows` that, padded to a multiple of `CUBLAS_ROWS`, give every M a dense
    GEMM sees; with 1 and one count of neither 1 nor a multiple of 16, for Triton's quantizers."""
    other = CUBLAS_ROWS + 1
    return sorted({1, rows, *range(CUBLAS_ROWS, rows + 1, CUBLAS_ROWS), *([other] if other <= rows else [])})


def token_counts(rows: int) -> list[int]:
    """Token counts up to `rows` that, padded to a multiple of `SIDE_ALIGN`, give every K a weight
    gradient sees."""
    return sorted({rows, *range(SIDE_ALIGN, rows + 1, SIDE_ALIGN)})


def layout_sizes(pairs: int, experts: int) -> list[int]:
    """Every padded layout size that up to `pairs` pairs among `experts` experts can take."""
    from grpo.models.fp8_grouped_deep_gemm import ALIGNMENT, padded_size

    return list(range(padded_size(1, experts), padded_size(pairs, experts) + 1, ALIGNMENT))


def jobs_for(model: nn.Module, rows: int, ranks: int = 1) -> list[Job]:
    """The FP8 GEMM shapes DeepGEMM sees for the model (the weights' sides padded to a multiple of
    `SIDE_ALIGN`, as the quantizers pad them: two layers may share one), for micro-batches of up to
    `rows` tokens (`MAX_ROWS` at most). `ranks`: the expert-parallel group's size, whose ranks' pairs
    may all reach one rank's experts."""
    from grpo.models.fp8 import Fp8Linear
    from grpo.models.moe import MoeLayer

    rows = min(rows, MAX_ROWS)
    layers = {
        (round_up(m.out_features, SIDE_ALIGN), round_up(m.in_features, SIDE_ALIGN))
        for m in model.modules()
        if isinstance(m, Fp8Linear) and m.fp8
    }
    shapes = layers | {(k, n) for n, k in layers}
    jobs = [Job(n, k, rows, backward=(n, k) in layers) for n, k in sorted(shapes)]
    experts: dict[tuple[int, int, int], int] = {}
    for moe in model.modules():
        if isinstance(moe, MoeLayer) and moe.experts.deep_gemm(moe.experts.gate_up_proj) is not None:
            pairs = rows * moe.gate.routing.top_k * ranks
            for weight_ENK in (moe.experts.gate_up_proj, moe.experts.down_proj):
                e, n, k = weight_ENK.shape
                shape = (e, round_up(n, SIDE_ALIGN), round_up(k, SIDE_ALIGN))
                experts[shape] = max(experts.get(shape, 0), pairs)
    for (e, n, k), pairs in sorted(experts.items()):
        jobs.append(Job(n, k, pairs, e, backward=True))
        if (e, k, n) not in experts:
            jobs.append(Job(k, n, pairs, e))
    return jobs


def marks(jobs: list[Job], dtype: torch.dtype, setting: dict) -> list[Path]:
    """Where each job's mark goes once it has run: beside DeepGEMM's kernels, named by a hash of the
    job and of all else its kernels follow from (`kernel_setting`, the dtype, the model code)."""
    from grpo.models.deep_gemm_mirror import cache_root

    code = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):  # the layers, quantizers, GEMM wrappers
        code.update(source.read_bytes())
    common = {**setting, "dtype": str(dtype), "code": code.hexdigest()}
    folder = Path(cache_root()) / "grpo_warm_up"

    def key(job: Job) -> str:
        return hashlib.sha256(json.dumps({**common, **asdict(job)}, sort_keys=True).encode()).hexdigest()

    return [folder / key(job) for job in jobs]


def kernel_setting(deep_gemm: ModuleType, index: int) -> dict:
    """What a GEMM's kernels follow from besides the job: the card, DeepGEMM's version and settings;
    torch's, for a new image (its CUDA toolkit)."""
    return {
        "card": torch.cuda.get_device_name(index),
        "torch": torch.__version__,
        "deep_gemm": getattr(deep_gemm, "__version__", "unknown"),
        "env": {name: value for name, value in os.environ.items() if name.startswith("DG_")},
    }


def warm_up(model: nn.Module, rows: int, device: torch.device, ranks: int = 1) -> dict | None:
    """Compile the kernels of `jobs_for(model, rows, ranks)` in processes side by side (as many as
    jobs not marked as run on this cache, at most one per CPU this process may use), and wait for
    them; None where DeepGEMM does not run the FP8 GEMMs here. Returns the jobs, those marked before,
    the processes, the seconds and the failed processes."""
    from grpo.models import fp8_deep_gemm

    found = None if device.type != "cuda" else fp8_deep_gemm.library(device)
    if found is None:
        return None
    jobs = jobs_for(model, rows, ranks)
    if not jobs:
        return None
    dtype = next(model.parameters()).dtype  # the activations' too
    index = torch.cuda.current_device() if device.index is None else device.index
    start = time.perf_counter()
    setting = kernel_setting(found, index)
    todo = [(job, mark) for job, mark in zip(jobs, marks(jobs, dtype, setting)) if not mark.exists()]
    report = {"jobs": len(jobs), "marked_before": len(jobs) - len(todo), "processes": 0, "failed": 0}
    if todo:
        report.update(_run_processes(todo, dtype, index))
    return {**report, "seconds": round(time.perf_counter() - start, 1)}


def _run_processes(todo: list[tuple[Job, Path]], dtype: torch.dtype, index: int) -> dict:
    processes = min(len(todo), len(os.sched_getaffinity(0)))
    # the costliest first, dealt round: the shares end near together
    todo.sort(key=lambda pair: pair[0].rows * pair[0].out_features * pair[0].in_features, reverse=True)
    shares = [todo[i::processes] for i in range(processes)]
    # the processes import what this one does from where it does (a Ray actor's path included);
    # -P, since `-m` would put the working folder first (a source tree beside the install in use)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    with tempfile.TemporaryDirectory() as logs, contextlib.ExitStack() as files:
        running = []
        for i, share in enumerate(shares):
            request = {
                "device": f"cuda:{index}",
                "dtype": str(dtype),
                "jobs": [asdict(job) for job, _ in share],
                "marks": [str(mark) for _, mark in share],
            }
            log = files.enter_context(open(os.path.join(logs, f"{i}.log"), "w+"))
            command = [sys.executable, *safe_path, "-m", __name__, json.dumps(request)]
            running.append((subprocess.Popen(command, env=env, stdout=log, stderr=log), log))
        failures = [_last_line(log) for process, log in running if process.wait() != 0]
    for failure in failures:
        warnings.warn(
            f"a DeepGEMM warm-up process failed ({failure}); its kernels compile on first use", stacklevel=3
        )
    return {"processes": processes, "failed": len(failures)}


def _last_line(log) -> str:
    log.seek(0)
    return (log.read().strip().splitlines() or ["no output"])[-1]


# ---- in each process ------------------------------------------------------------------------------
def run_dense(job: Job, device: torch.device, dtype: torch.dtype) -> None:
    from grpo.models.fp8 import fp8_linear
    from grpo.models.fp8_weight_cache import reuse_quantized_weights
    from grpo.models.fused_grad_accumulation import accumulate_into_grad

    w_NK = torch.randn(job.out_features, job.in_features, device=device, dtype=dtype)
    x_MK = torch.randn(job.rows, job.in_features, device=device, dtype=dtype)
    with torch.no_grad(), reuse_quantized_weights():
        for m in row_counts(job.rows):
            fp8_linear(x_MK[:m], w_NK)
    if job.backward:
        w_NK.requires_grad_(True)
        grad_MN = torch.randn(job.rows, job.out_features, device=device, dtype=dtype)
        for k in token_counts(job.rows):
            for scope in (contextlib.nullcontext(), accumulate_into_grad()):  # stored, then added
                with scope:
                    fp8_linear(x_MK[:k], w_NK).backward(grad_MN[:k])


def run_grouped(job: Job, device: torch.device, dtype: torch.dtype) -> None:
    from grpo.models.fp8_deep_gemm import library
    from grpo.models.fp8_grouped_deep_gemm import ALIGNMENT, PaddedLayout, grouped_fp8_padded

    found = library(device)
    assert found is not None, "DeepGEMM does not load in the warm-up process"
    e = job.experts
    sizes = layout_sizes(job.rows, e)
    w_ENK = torch.randn(e, job.out_features, job.in_features, device=device, dtype=dtype)
    x_PK = torch.randn(sizes[-1], job.in_features, device=device, dtype=dtype)

    def layout(size: int) -> PaddedLayout:
        pairs = size - e * (ALIGNMENT - 1)  # the fewest pairs whose layout is this size
        ends_E = torch.arange(1, e + 1, device=device, dtype=torch.int64) * pairs // e
        return PaddedLayout.of(ends_E.to(torch.int32), pairs)

    with torch.no_grad():
        for size in sizes:
            grouped_fp8_padded(found, x_PK[:size], w_ENK, layout(size))
    if job.backward:
        w_ENK.requires_grad_(True)
        y_PN = grouped_fp8_padded(found, x_PK, w_ENK, layout(sizes[-1]))
        y_PN.backward(torch.randn_like(y_PN))


def main() -> None:
    """A process's part: `argv[1]` is JSON of the device ("cuda:0"; "cpu" runs the same code on the
    CPU's path, for its test), the dtype, the jobs and their marks. Prints a JSON line as each job is
    done, and leaves its mark."""
    request = json.loads(sys.argv[1])
    device = torch.device(request["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = getattr(torch, request["dtype"].removeprefix("torch."))
    torch.manual_seed(0)
    for fields, mark in zip(request["jobs"], request["marks"], strict=True):
        job = Job(**fields)
        start = time.perf_counter()
        (run_grouped if job.experts else run_dense)(job, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        print(json.dumps({**fields, "seconds": round(time.perf_counter() - start, 1)}), flush=True)
        with contextlib.suppress(OSError):  # unmarked, the next run compiles it ahead again
            Path(mark).parent.mkdir(parents=True, exist_ok=True)
            Path(mark).touch()


if __name__ == "__main__":
    main()
