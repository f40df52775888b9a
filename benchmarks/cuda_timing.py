"""The GPU benchmarks' timer: median of CUDA-event timings after warm-up runs.

A fixed number of runs (not `triton.testing.do_bench`'s time-based count) so that ranks running
collectives together call the same number of times. Imported by the scripts beside it, which run as
`python3 benchmarks/NAME.py` (the script's folder is then on `sys.path`)."""

from __future__ import annotations

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
