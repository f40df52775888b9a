"""The GPU benchmarks' timers: median of CUDA-event timings after warm-up runs (`median_ms`), the
CPU time of calls queued without synchronization (`cpu_us_per_call`), the profiler's record of
calls (`profiled`) and the device time of their kernels (`kernel_us_by_name`, `kernel_us_per_call`).

A fixed number of runs (not `triton.testing.do_bench`'s time-based count) so that ranks running
collectives together call the same number of times. Imported by the scripts beside it, which run as
`python3 benchmarks/NAME.py` (the script's folder is then on `sys.path`)."""

from __future__ import annotations

import time

import torch


def median_ms(fn, repeats: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def cpu_us_per_call(fn, calls: int = 50, warmup: int = 5) -> float:
    """Microseconds of host time per call of `fn`, `calls` calls queued back to back with no
    synchronization between them: what Python and the launches cost, unless the GPU's queue fills."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return round(elapsed / calls * 1e6, 1)


def profiled(fn, calls: int, warmup: int = 1):
    """`torch.profiler`'s record (CUDA activity only) of `calls` calls of `fn`, after `warmup`
    calls outside it; read it with `key_averages()` or `events()`."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof


def kernel_us_by_name(fn, calls: int) -> list[tuple[str, float]]:
    """Each kernel `fn` launches (memsets included) with its microseconds of device time per call,
    under `torch.profiler`, mean of `calls` calls after one outside it; host time is not counted."""
    prof = profiled(fn, calls)
    return [(e.key, e.device_time_total / calls) for e in prof.key_averages() if e.device_time_total > 0]


def kernel_us_per_call(fn, calls: int) -> float:
    """Microseconds of device time per call of the kernels `fn` launches, memsets left out (as
    `kernel_us_by_name`)."""
    return sum(us for name, us in kernel_us_by_name(fn, calls) if "Memset" not in name)
