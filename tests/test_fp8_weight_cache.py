"""Quantized weight copies are reused only inside a scope and only while the weight is unchanged."""

import pytest
import torch

from grpo.models import fp8
from grpo.models.fp8_weight_cache import quantized, reuse_quantized_weights


def counting(value):
    calls = []

    def quantize():
        calls.append(1)
        return value

    return quantize, calls


def test_nothing_is_kept_outside_a_scope():
    w = torch.ones(2, 2)
    quantize, calls = counting("q")
    assert [quantized(w, "blocks", quantize) for _ in range(3)] == ["q", "q", "q"]
    assert len(calls) == 3


def test_a_copy_is_reused_until_the_weight_changes_in_place():
    w = torch.ones(2, 2)
    quantize, calls = counting("q")
    with reuse_quantized_weights():
        quantized(w, "blocks", quantize)
        quantized(w, "blocks", quantize)
        assert len(calls) == 1
        quantized(w, "transposed", quantize)  # another kind of copy
        assert len(calls) == 2
        with torch.no_grad():
            w.add_(1.0)  # as an optimizer step does
        quantized(w, "blocks", quantize)
        assert len(calls) == 3
        with reuse_quantized_weights():  # a nested scope shares the outer one's copies
            quantized(w, "blocks", quantize)
        quantized(w, "blocks", quantize)
        assert len(calls) == 3
    quantized(w, "blocks", quantize)  # the scope closed: its copies are gone
    assert len(calls) == 4


def _micro_batches(layer, inputs, grad, optimizer=None):
    """fwd+bwd of each input; an optimizer step after the first when `optimizer` is given."""
    outputs = []
    for i, x in enumerate(inputs):
        out = layer(x)
        out.backward(grad)
        outputs.append(out.detach())
        if optimizer is not None and i == 0:
            optimizer.step()
    return outputs, layer.weight.grad.clone()


@pytest.mark.parametrize("step_between", [False, True])
def test_fp8_linear_gives_the_same_results_with_reused_weights(monkeypatch, step_between):
    """Two micro-batches through `Fp8Linear` in a scope equal the same two without one, bit for bit,
    with or without an optimizer step between them; the weight is quantized once per version instead
    of once per micro-batch (its transpose's copy is transposed from that one)."""
    torch.manual_seed(0)
    inputs = [torch.randn(5, 200) for _ in range(2)]
    grad = torch.randn(5, 130)

    def run(scope):
        torch.manual_seed(1)
        layer = fp8.Fp8Linear(200, 130, bias=False)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.5) if step_between else None
        with scope:
            return _micro_batches(layer, inputs, grad, optimizer), layer.weight

    weight_quantizations = []
    real_quantize_blocks = fp8.quantize_blocks

    def spy(t, power_of_two=False):
        if t.shape[1] != 5:  # the weight, not x.T (K x 5)
            weight_quantizations.append(t.shape)
        return real_quantize_blocks(t, power_of_two)

    monkeypatch.setattr(fp8, "quantize_blocks", spy)
    (fresh, fresh_grad), _ = run(torch.enable_grad())
    assert weight_quantizations == [(130, 200)] * 2
    weight_quantizations.clear()
    (reused, reused_grad), _ = run(reuse_quantized_weights())
    assert weight_quantizations == [(130, 200)] * (2 if step_between else 1)
    assert all(torch.equal(a, b) for a, b in zip(reused, fresh))
    assert torch.equal(reused_grad, fresh_grad)


def test_a_forward_without_backward_skips_the_autograd_function(monkeypatch):
    """Under no_grad `fp8_linear` takes the forward-only path (no transposed copies), and its output
    equals the training forward's."""
    torch.manual_seed(0)
    x, w = torch.randn(5, 200), torch.randn(130, 200, requires_grad=True)
    trained = fp8.fp8_linear(x, w)
    assert trained.requires_grad

    def refuse(*args):
        raise AssertionError("the autograd function ran for a forward without backward")

    monkeypatch.setattr(fp8.Fp8LinearFunction, "apply", refuse)
    with torch.no_grad():
        assert torch.equal(fp8.fp8_linear(x, w), trained.detach())


def test_a_train_step_quantizes_each_weight_once_per_version(tmp_path, monkeypatch):
    """`PolicyTrainer.train_step` with FP8 layers, three micro-batches, two optimizer passes (mu 2)
    and a KL reference: a dense policy weight is quantized twice (for the frozen old-logprob pass,
    whose copy the first pass reuses and transposes, and after the first optimizer step), not 9;
    the frozen reference's weight once, not 3 times."""
    from grpo.models.build import materialize
    from grpo.trainer.policy_trainer import PolicyTrainer, RolloutBatch

    model_path = materialize("tiny:deepseek_v3", tmp_path / "model")
    recipe = {
        "model": {"path": model_path, "fp8": True},
        "algorithm": {"beta": 0.04, "mu": 2},
        "train": {"micro_batch_size": 2},
        "rollout": {"max_tokens": 8},
    }
    trainer = PolicyTrainer(model_path, recipe, pad_id=0)
    policy = trainer.accelerator.unwrap_model(trainer.model).model.layers[0].self_attn.o_proj.weight
    reference = trainer.reference.model.layers[0].self_attn.o_proj.weight
    counts = {"policy": 0, "reference": 0}
    real_quantize_blocks = fp8.quantize_blocks

    def spy(t, power_of_two=False):
        for name, weight in (("policy", policy), ("reference", reference)):
            counts[name] += t.data_ptr() == weight.data_ptr()
        return real_quantize_blocks(t, power_of_two)

    monkeypatch.setattr(fp8, "quantize_blocks", spy)
    ids = [[1, 2, 3], [4, 5], [6, 7, 8], [9, 10], [11, 12], [13, 14, 15]]
    batch = RolloutBatch(ids, ids, [1.0, -1.0, 0.5, -0.5, 0.25, -0.25], [[] for _ in ids])
    trainer.train_step(batch, 1)
    assert counts == {"policy": 2, "reference": 1}
