"""Two FP8 layers reading one activation quantize it once, and only while it is alive and unchanged."""

import gc
from unittest import mock

import pytest
import torch

from grpo.models import fp8, fp8_activation_cache, fp8_triton
from grpo.models.fp8_activation_cache import quantized


def counting():
    calls = []

    def quantize():
        calls.append(1)
        return f"copy {len(calls)}"

    return quantize, calls


def test_the_same_unchanged_tensor_gets_the_same_copies():
    x = torch.ones(4, 3)
    quantize, calls = counting()
    assert quantized(x.reshape(-1, 3), "tiles", quantize) == "copy 1"
    assert quantized(x.reshape(-1, 3), "tiles", quantize) == "copy 1"  # another view of x: shared
    assert quantized(x.reshape(-1, 3), "blocks", quantize) == "copy 2"  # another kind of copy
    assert quantized(x.reshape(-1, 3), "tiles", quantize) == "copy 1"  # two entries kept
    assert quantized(x[:2], "tiles", quantize) == "copy 3"  # other rows of the same tensor
    assert quantized(x[2:], "tiles", quantize) == "copy 4"  # same shape, other memory
    assert quantized(x.reshape(-1, 3), "tiles", quantize) == "copy 5"  # no longer among the last two
    with torch.no_grad():
        x.add_(1.0)
    assert quantized(x.reshape(-1, 3), "tiles", quantize) == "copy 6"


def test_the_entry_goes_with_its_tensor():
    fp8_activation_cache.forget()
    x = torch.ones(4, 3)
    quantize, calls = counting()
    quantized(x, "tiles", quantize)
    del x
    gc.collect()
    assert fp8_activation_cache._entries == []
    # a new tensor, possibly at the freed address with the same version, is quantized anew
    assert quantized(torch.ones(4, 3), "tiles", quantize) == "copy 2"


ON_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(
    "device, quantizer",
    [
        ("cpu", (fp8, "quantize_tiles")),
        pytest.param("cuda", (fp8_triton, "quantize_activation"), marks=[pytest.mark.gpu, ON_GPU]),
    ],
)
def test_gate_and_up_read_one_quantized_input_and_compute_what_they_would_apart(device, quantizer):
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    gate, up = (fp8.Fp8Linear(256, 128, bias=False, device=device, dtype=dtype) for _ in range(2))
    x_BLH = torch.randn(2, 3, 256, device=device, dtype=dtype, requires_grad=True)
    apart = []
    for layer in (gate, up):
        fp8_activation_cache.forget()
        y = layer(x_BLH)
        (grad_x,) = torch.autograd.grad(y.float().square().sum(), x_BLH)
        apart.append((y.detach(), grad_x))

    fp8_activation_cache.forget()
    with mock.patch.object(*quantizer, wraps=getattr(*quantizer)) as quantize:
        y_gate, y_up = gate(x_BLH), up(x_BLH)
    assert quantize.call_count == 1
    (grad_x,) = torch.autograd.grad(y_gate.float().square().sum() + y_up.float().square().sum(), x_BLH)
    assert torch.equal(y_gate, apart[0][0]) and torch.equal(y_up, apart[1][0])
    assert torch.equal(grad_x, apart[0][1] + apart[1][1])
