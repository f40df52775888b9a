"""The fused FP8 quantizers (`fp8_triton`) per number of warps a program and register cap a thread,
on a CUDA GPU (the quantizers' settings, `fp8_triton.launch_settings`, replaced by one for all; the
transpose keeps its own). `regs` is what the compiled kernel uses, `spills` what it spills.

Each copy `Fp8Linear` makes at DeepSeek-V3's shapes (8192 tokens): the activation (1 x 128 tiles and
its transpose in blocks; alone in tiles for a forward without backward), the output gradient (tiles
both ways), the weight in blocks. Every setting is timed twice, in reversed order the second time (a
drift of the card shows as a difference between the two): the kernel's device time under
`torch.profiler`, mean of CALLS calls (host time excluded), and its outputs compared with the
default setting's (`same`: every byte and scale equal; `default` marks that setting). `GB/s` counts
bytes read and written; a device-to-device copy (`clone`, same profiler) of each input is the
bandwidth reference (`clone_GB/s`). Last line: one JSON object.

    cd benchmarks && python3 probe_quantizer_warps_gpu.py
"""

from __future__ import annotations

import json
from unittest import mock

import torch
from cuda_timing import kernel_us_per_call

from grpo.models import fp8_triton
from grpo.models.fp8_triton import BLOCKS, COLUMNS, NONE, ROWS

SETTINGS = [(4, None), (4, fp8_triton.THREE_PROGRAMS_OF_4_WARPS), (4, 128), (8, None), (8, 80), (16, None)]
CALLS = 20


def outputs_equal(got, want) -> bool:
    def raw(t):
        return t.view(torch.uint8) if t.dtype == fp8_triton.E4M3 else t

    return all(torch.equal(raw(a), raw(b)) for a, b in zip(got, want))


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    x = torch.randn(8192, 7168, device="cuda", dtype=torch.bfloat16)
    g_small = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 7168, device="cuda", dtype=torch.bfloat16)
    w_t = w.T.contiguous()  # a 2048 -> 7168 layer's weight
    cases = {  # name: (call, bytes moved, the copies it makes)
        "activation 8192x7168": (lambda: fp8_triton.quantize_activation(x), x.numel() * 4, (ROWS, BLOCKS)),
        "activation 8192x2048": (lambda: fp8_triton.quantize_activation(g_small), g_small.numel() * 4, (ROWS, BLOCKS)),
        "output_grad 8192x2048": (lambda: fp8_triton.quantize_output_grad(g_small), g_small.numel() * 4, (ROWS, COLUMNS)),
        "output_grad 8192x7168": (lambda: fp8_triton.quantize_output_grad(x), x.numel() * 4, (ROWS, COLUMNS)),
        "activation rows 8192x7168": (lambda: fp8_triton.quantize_activation_rows(x), x.numel() * 3, (ROWS, NONE)),
        "weight 2048x7168": (lambda: fp8_triton.quantize_weight_blocks(w), w.numel() * 3, (BLOCKS, NONE)),
        "weight 7168x2048": (lambda: fp8_triton.quantize_weight_blocks(w_t), w.numel() * 3, (BLOCKS, NONE)),
    }  # fmt: skip
    defaults = {name: fp8_triton.launch_settings(*copies) for name, (_, _, copies) in cases.items()}
    reference = {name: call() for name, (call, _, _) in cases.items()}
    clone_us = {t.shape: kernel_us_per_call(t.clone, CALLS) for t in (x, g_small, w)}
    copy_us = clone_us[x.shape]
    rows = []
    for warps, cap in SETTINGS + SETTINGS[::-1]:
        with mock.patch.object(fp8_triton, "launch_settings", lambda *copies, setting=(warps, cap): setting):
            for name, (call, moved, _) in cases.items():
                fp8_triton._compiled.clear()  # to read this setting's kernels below
                us = kernel_us_per_call(call, CALLS)
                same = outputs_equal(call(), reference[name])
                regs, spills = zip(*((k.n_regs, k.n_spills) for k in fp8_triton._compiled.values()))
                default = (warps, cap) == defaults[name]
                rows.append({"copy": name, "warps": warps, "cap": cap, "default": default, "us": round(us, 1), "GB/s": round(moved / us / 1e3), "same": same, "regs": max(regs), "spills": max(spills)})  # fmt: skip
                print(rows[-1], flush=True)
    print(
        json.dumps(
            {
                "probe": "quantizer_warps",
                "device": torch.cuda.get_device_name(),
                "activation_clone_us": round(copy_us, 1),
                "activation_clone_GB/s": round(x.numel() * 4 / copy_us / 1e3),
                "clone_GB/s": {
                    "x".join(map(str, shape)): round(shape.numel() * 4 / us / 1e3)
                    for shape, us in clone_us.items()
                },
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
