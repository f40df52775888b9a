import pytest
import torch
from torch import nn

from grpo.models import fp8
from grpo.models.fp8 import (
    E4M3,
    Fp8Linear,
    Fp8LinearFunction,
    convert_to_fp8,
    dequantize_blocks,
    dequantize_tiles,
    fp8_gemm,
    high_precision,
    quantize_blocks,
    quantize_tiles,
)


def test_a_tile_whose_amax_is_448_round_trips_exactly():
    tile = torch.zeros(1, 128)
    tile[0, :5] = torch.tensor([448.0, -256.0, 1.5, 0.25, -0.875])
    q, scale_inv = quantize_tiles(tile)
    assert q.dtype == E4M3 and scale_inv.tolist() == [[1.0]]
    assert torch.equal(dequantize_tiles(q, scale_inv), tile)


def test_power_of_two_scales_round_up():
    tile = torch.full((1, 128), 96.0)
    q, scale_inv = quantize_tiles(tile, power_of_two=True)
    assert scale_inv.item() == 0.25  # 96/448 = 0.214 -> 2^-2
    assert torch.equal(dequantize_tiles(q, scale_inv), tile)  # 96 / 0.25 = 384 is an e4m3 value


def test_ragged_shapes_are_zero_padded_to_whole_tiles_and_blocks():
    q, scale_inv = quantize_tiles(torch.ones(3, 130))
    assert (q.shape, scale_inv.shape) == ((3, 256), (3, 2))
    q, scale_inv = quantize_blocks(torch.ones(130, 200))
    assert (q.shape, scale_inv.shape) == ((256, 256), (2, 2))
    assert dequantize_blocks(q, scale_inv)[130:].abs().sum() == 0


def test_the_transposed_weight_copy_is_the_weight_copy_transposed():
    """`w.T` has the blocks of `w`, so its copy comes from `w`'s by a transpose, exactly."""
    w = (torch.arange(130 * 200).reshape(130, 200) % 37 - 18.0) / 7
    w[128:, :128] *= 100  # each block its own scale
    blocks = quantize_blocks(w)
    q_t, scale_t = fp8.transposed_weight_blocks(w, False, blocks)
    reference_q, reference_scale = quantize_blocks(w.t())
    assert (q_t.shape, scale_t.shape) == ((256, 256), (2, 2))
    assert torch.equal(q_t.view(torch.uint8), reference_q.view(torch.uint8))
    assert torch.equal(scale_t, reference_scale)


def test_quantization_error_is_within_e4m3_rounding():
    torch.manual_seed(0)
    x = torch.randn(16, 256) * torch.logspace(-3, 3, 16).unsqueeze(1)
    q, scale_inv = quantize_tiles(x)
    error = (dequantize_tiles(q, scale_inv) - x).abs()
    # half an ulp of a 3-bit mantissa, or half the smallest subnormal step (2^-9) of the tile's scale
    bound = x.abs() * 2.0**-4 + scale_inv.repeat_interleave(128, dim=1) * 2.0**-10
    assert (error <= bound).all()


@pytest.mark.parametrize("row_scales", [True, False])
def test_the_blockwise_gemm_equals_the_product_of_the_dequantized_operands(monkeypatch, row_scales):
    """Both CPU routes: `torch._scaled_mm` with row-wise scales, and the FP32 emulation for builds
    whose CPU `_scaled_mm` takes per-tensor scales only."""
    if row_scales and not fp8._cpu_scaled_mm_takes_row_scales():
        pytest.skip("this torch's CPU _scaled_mm takes per-tensor scales only")
    monkeypatch.setattr(fp8, "_cpu_scaled_mm_takes_row_scales", lambda: row_scales)
    torch.manual_seed(1)
    xq, xs = quantize_tiles(torch.randn(8, 384))
    wq, ws = quantize_blocks(torch.randn(256, 384))
    expected = dequantize_tiles(xq, xs) @ dequantize_blocks(wq, ws).t()
    got = fp8_gemm(xq, xs, wq, ws, torch.float32)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_fp8_linear_forward_and_gradients_follow_the_high_precision_ones():
    torch.manual_seed(2)
    x = torch.randn(64, 256, requires_grad=True)
    w = torch.randn(192, 256, requires_grad=True)
    y = Fp8LinearFunction.apply(x, w, False)
    grad = torch.randn_like(y)
    y.backward(grad)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(y, x @ w.t()) < 0.06
    assert rel(x.grad, grad @ w) < 0.06
    assert rel(w.grad, grad.t() @ x) < 0.06


def test_only_the_weight_gradient_gemm_says_it_reduces_over_tokens(monkeypatch):
    # DeepGEMM compiles K into a kernel unless told K is a token count (`fp8_deep_gemm`)
    said = []

    def recording_gemm(*operands, reduces_over_tokens=False):
        said.append((tuple(operands[0].shape), reduces_over_tokens))
        return fp8_gemm(*operands, reduces_over_tokens=reduces_over_tokens)

    monkeypatch.setattr(fp8, "fp8_gemm", recording_gemm)
    x = torch.randn(64, 256, requires_grad=True)
    w = torch.randn(192, 256, requires_grad=True)
    Fp8LinearFunction.apply(x, w, False).sum().backward()
    # the left operands, padded to whole 128-wide tiles: x (64 x 256), grad (64 x 192) and grad.T
    # (192 x 64), which the weight gradient reduces over its 64 tokens
    assert said == [((64, 256), False), ((64, 256), False), ((192, 128), True)]


def test_the_converter_keeps_embedding_head_and_router_in_high_precision():
    model = nn.ModuleDict(
        {
            "embed_tokens": nn.Embedding(10, 128),
            "q_proj": nn.Linear(128, 128, bias=False),
            "mlp": nn.ModuleDict({"gate": nn.Linear(128, 8), "up_proj": nn.Linear(128, 256)}),
            "lm_head": nn.Linear(128, 10),
        }
    )
    weight = model["q_proj"].weight
    assert convert_to_fp8(model) == ["q_proj", "mlp.up_proj"]
    assert type(model["q_proj"]) is Fp8Linear and model["q_proj"].weight is weight
    assert type(model["lm_head"]) is nn.Linear and type(model["mlp"]["gate"]) is nn.Linear


class _Switched(nn.Module):
    """A module with an FP8 switch of its own, as the grouped experts have."""

    fp8 = False


def _decoder_layer():
    return nn.ModuleDict(
        {
            "self_attn": nn.ModuleDict({"q_proj": nn.Linear(128, 128)}),
            "mlp": nn.ModuleDict({"up_proj": nn.Linear(128, 256), "experts": _Switched()}),
        }
    )


def _two_layers():
    return nn.ModuleDict(
        {"layers": nn.ModuleList([_decoder_layer(), _decoder_layer()]), "lm_head": nn.Linear(128, 10)}
    )


def test_the_converter_switches_on_modules_with_their_own_fp8_switch():
    model = _two_layers()
    assert convert_to_fp8(model) == [
        "layers.0.self_attn.q_proj",
        "layers.0.mlp.up_proj",
        "layers.0.mlp.experts",
        "layers.1.self_attn.q_proj",
        "layers.1.mlp.up_proj",
        "layers.1.mlp.experts",
    ]
    assert model["layers"][1]["mlp"]["experts"].fp8 is True


def test_exclusions_keep_the_layers_they_name_by_whole_name_components():
    model = _two_layers()
    assert convert_to_fp8(model, exclude=["self_attn", "layers.1.mlp.experts"]) == [
        "layers.0.mlp.up_proj",
        "layers.0.mlp.experts",
        "layers.1.mlp.up_proj",
    ]
    assert type(model["layers"][0]["self_attn"]["q_proj"]) is nn.Linear
    assert model["layers"][1]["mlp"]["experts"].fp8 is False


@pytest.mark.parametrize("part", ["self", "slf_attn", "lm_head"])
def test_an_exclusion_that_names_no_layer_fp8_would_convert_is_an_error(part):
    with pytest.raises(ValueError, match=rf"^'{part}' names no layer that FP8 would convert$"):
        convert_to_fp8(_two_layers(), exclude=["mlp", part])


def _fit(layer: nn.Linear, steps: int = 60) -> list[float]:
    torch.manual_seed(3)
    target, x = torch.randn(128, 128), torch.randn(256, 128)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = (layer(x) - x @ target.t()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_a_converted_layer_learns_like_the_high_precision_one():
    torch.manual_seed(4)
    reference = nn.Linear(128, 128)
    converted = nn.Linear(128, 128)
    converted.load_state_dict(reference.state_dict())
    convert_to_fp8(nn.ModuleDict({"proj": converted}))
    high, low = _fit(reference), _fit(converted)
    assert low[-1] < 0.5 * low[0]
    assert abs(low[-1] - high[-1]) / high[-1] < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_output_keeps_the_input_dtype(dtype):
    layer = Fp8Linear(128, 128, bias=False).to(dtype)
    assert layer(torch.randn(2, 3, 128, dtype=dtype)).dtype == dtype


def test_high_precision_runs_fp8_layers_as_plain_linears_then_restores_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 64))
    plain = nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 64))
    plain.load_state_dict(model.state_dict())
    convert_to_fp8(model, lambda name, module: True)
    x = torch.randn(3, 256)
    fp8_out = model(x)
    with high_precision(model):
        assert torch.equal(model(x), plain(x))
    assert torch.equal(model(x), fp8_out) and not torch.equal(fp8_out, plain(x))
