"""Where the CPU time of one `Fp8Linear` step goes, and what two changes save (a GPU probe, at a shape
where the GPU is idle, so every figure is host time).

`probe_fp8_quantizers_gpu.py` measured 1.1 ms of CPU per FP8 layer step against 0.2 ms for BF16,
of which its pieces (four quantizer calls, three GEMMs) explain about half. This probe splits the
step: the forward alone; the backward as autograd's engine runs it (on a device thread of its own,
for CUDA tensors), the time spent inside it there, and the same backward called directly on this
thread with the node's own saved tensors. Then the two changes it led to, each against the way
before, in one process:
- the backward on the calling thread (`torch.autograd.set_multithreading_enabled(False)`, as
  `PolicyTrainer` now runs it) against the engine's device thread;
- the quantizers' kernel launched directly (`fp8_triton._launch`) against Triton's JIT dispatch
  (the launch before, patched back in for the comparison).
The host is noisy (the same figure moved 2x between calls), so the settings alternate, `ROUNDS`
rounds of 200 calls queued without synchronization each, and each figure is the median round.
Then `cProfile` of the forward, the direct backward and the backward inside the engine: the
functions with the most own time. Last line: one JSON object (microseconds per call).

    python3 benchmarks/probe_fp8_step_cpu_gpu.py
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import json
import pstats
import statistics
import time
from unittest import mock

import torch
from cuda_timing import cpu_us_per_call

from grpo.models import fp8_activation_cache, fp8_triton
from grpo.models.fp8 import Fp8Linear, Fp8LinearFunction

CALLS, ROUNDS = 200, 7


def through_jit_dispatch(
    grid, args, kernel=fp8_triton._quantize_kernel, constexprs=4, num_warps=4, max_registers=None
):
    """The kernels' launch before `fp8_triton._launch` kept compiled ones."""
    fp8_triton.launch_through_jit(grid, args, kernel, num_warps, max_registers)


def quantizer_launch(directly: bool):
    """The quantizers' compiled kernel launched directly (now) or through Triton's JIT (before)."""
    return (
        contextlib.nullcontext()
        if directly
        else mock.patch.object(fp8_triton, "_launch", through_jit_dispatch)
    )


@contextlib.contextmanager
def setting(launch_directly: bool, backward_on_this_thread: bool):
    threads = torch.autograd.set_multithreading_enabled(not backward_on_this_thread)
    with quantizer_launch(launch_directly), threads:
        yield


def alternating(pieces: dict) -> dict:
    """`pieces`: name -> (fn, `setting`'s arguments). Median microseconds per call over `ROUNDS`
    rounds, the pieces taking turns within each round."""
    rounds: dict[str, list[float]] = {name: [] for name in pieces}
    for _ in range(ROUNDS):
        for name, (fn, flags) in pieces.items():
            with setting(*flags):
                rounds[name].append(cpu_us_per_call(fn, calls=CALLS, warmup=10))
    return {name: round(statistics.median(values), 1) for name, values in rounds.items()}


def own_time_lines(profiler: cProfile.Profile, calls: int, lines: int = 14) -> list[str]:
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:lines]
    return [
        f"{own / calls * 1e6:7.1f} us own {total / calls * 1e6:7.1f} us total  {n_calls // calls:3d}x "
        f"{func[2]} ({func[0].rsplit('/', 1)[-1]}:{func[1]})"
        for func, (_, n_calls, own, total, _) in rows
    ]


def profiled(fn) -> list[str]:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(CALLS):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    return own_time_lines(profiler, CALLS)


def inside_engine_backward(step) -> tuple[float, list[str]]:
    """Microseconds spent inside `Fp8LinearFunction.backward` per step when autograd's engine calls
    it on its device thread, and the cProfile of those calls."""
    original = Fp8LinearFunction.backward
    profiler, spent = cProfile.Profile(), []

    def measured(ctx, grad):
        start = time.perf_counter()
        profiler.enable()
        try:
            return original(ctx, grad)
        finally:
            profiler.disable()
            spent.append(time.perf_counter() - start)

    with mock.patch.object(Fp8LinearFunction, "backward", staticmethod(measured)):
        for _ in range(CALLS):
            step()
        torch.cuda.synchronize()
    return round(sum(spent) / len(spent) * 1e6, 1), own_time_lines(profiler, len(spent))


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    m, k, n = 256, 512, 256
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    bf16 = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    fp8 = Fp8Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    # while its output lives, the autograd function's node keeps its saved tensors: its backward may
    # be called again and again
    kept_output = Fp8LinearFunction.apply(x, fp8.weight, False)
    node = kept_output.grad_fn

    def step(layer):
        x.grad = None
        fp8_activation_cache.forget()  # x stands for a new activation each step
        layer(x).backward(g)

    def forward():
        fp8_activation_cache.forget()
        return fp8(x)

    def direct_backward():
        Fp8LinearFunction.backward(node, g)

    before, now, device_thread = (False, False), (True, True), (True, False)
    pieces = {
        "bf16 step, backward on the device thread": (lambda: step(bf16), device_thread),
        "bf16 step, backward on this thread": (lambda: step(bf16), now),
        "fp8 step, before (JIT dispatch, device thread)": (lambda: step(fp8), before),
        "fp8 step, launched directly, device thread": (lambda: step(fp8), device_thread),
        "fp8 step, JIT dispatch, this thread": (lambda: step(fp8), (False, True)),
        "fp8 step, now (launched directly, this thread)": (lambda: step(fp8), now),
        "fp8 forward, before": (forward, before),
        "fp8 forward, now": (forward, now),
        "fp8 backward called directly, before": (direct_backward, before),
        "fp8 backward called directly, now": (direct_backward, now),
        "quantize_output_grad, before": (lambda: fp8_triton.quantize_output_grad(g), before),
        "quantize_output_grad, now": (lambda: fp8_triton.quantize_output_grad(g), now),
        "torch.neg (one ATen kernel, for scale)": (lambda: torch.neg(g), now),
    }
    costs = alternating(pieces)
    with setting(*device_thread):
        costs["fp8 backward inside, run on the device thread"], engine_profile = inside_engine_backward(
            lambda: step(fp8)
        )
    print(costs, flush=True)
    with setting(*now):
        profiles = {
            "forward": profiled(forward),
            "direct backward": profiled(direct_backward),
            "backward run on the device thread": engine_profile,
        }
    for name, lines in profiles.items():
        print(f"-- cProfile, {name}:", *lines, sep="\n", flush=True)
    result = {"probe": "fp8_step_cpu", "device": torch.cuda.get_device_name(), "shape": f"{m}x{k}->{n}"}
    print(json.dumps({**result, "us_per_call": costs, "cprofile": profiles}))


if __name__ == "__main__":
    main()
