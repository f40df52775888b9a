"""Host cost of switching DeepGEMM's settings between a dense GEMM and a grouped one
(`fp8_deep_gemm.use_settings`: the dense GEMMs' SM count and block multiple, the grouped GEMMs'
defaults), on a Hopper GPU with DeepGEMM. An MoE layer with shared experts switches a few times per
step; this measures one switch (microseconds of CPU, median of ROUNDS rounds of CALLS switches),
a call that finds the settings already in place, and each DeepGEMM setter alone. Last line: one
JSON object.

    python3 benchmarks/probe_deep_gemm_settings_cost_gpu.py
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from grpo.models import fp8_deep_gemm

CALLS, ROUNDS = 2000, 7
DENSE = (8192, 2048)  # a 7168 -> 2048 layer's output at 8192 tokens


def us_per_call(fn) -> float:
    rounds = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        rounds.append((time.perf_counter() - start) / CALLS * 1e6)
    return round(statistics.median(rounds), 2)


def main() -> None:
    found = fp8_deep_gemm.library(torch.device("cuda"))
    assert found is not None, "needs DeepGEMM on a Hopper GPU"
    card = found.get_num_sms()

    def switch_twice():
        fp8_deep_gemm.use_settings(found, DENSE)
        fp8_deep_gemm.use_settings(found, None)

    result = {
        "probe": "deep_gemm_settings_cost",
        "device": torch.cuda.get_device_name(),
        "switch_us": round(us_per_call(switch_twice) / 2, 2),
        "unchanged_us": us_per_call(lambda: fp8_deep_gemm.use_settings(found, None)),
        "set_num_sms_us": us_per_call(lambda: found.set_num_sms(card)),
        "get_num_sms_us": us_per_call(found.get_num_sms),
        "set_block_size_multiple_of_us": us_per_call(lambda: found.set_block_size_multiple_of((1, 1))),
        "dense_sms": fp8_deep_gemm.dense_sms(*DENSE, card),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
