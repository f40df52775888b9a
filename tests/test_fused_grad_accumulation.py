"""When a weight-gradient kernel may add into `.grad` in place (`fused_grad_accumulation`)."""

import torch

from grpo.models.fused_grad_accumulation import accumulate_into_grad, grad_to_add_into


def _weight_with_grad(dtype=torch.float32) -> torch.nn.Parameter:
    weight = torch.nn.Parameter(torch.zeros(2, 3, dtype=dtype))
    weight.grad = torch.ones(2, 3, dtype=dtype)
    return weight


# a backward runs with grad mode off (unless create_graph=True): the calls below mimic one
@torch.no_grad()
def test_the_grad_is_handed_out_only_inside_the_scope():
    weight = _weight_with_grad()
    assert grad_to_add_into(weight) is None
    with accumulate_into_grad():
        assert grad_to_add_into(weight) is weight.grad
        with accumulate_into_grad():
            assert grad_to_add_into(weight) is weight.grad
        assert grad_to_add_into(weight) is weight.grad  # the outer scope is still open
    assert grad_to_add_into(weight) is None


@torch.no_grad()
def test_autograd_accumulates_where_an_in_place_add_would_go_unseen_or_wrong():
    with accumulate_into_grad():
        assert grad_to_add_into(None) is None
        assert grad_to_add_into(torch.nn.Parameter(torch.zeros(2, 3))) is None  # no .grad yet
        weight = _weight_with_grad()
        with torch.enable_grad():
            derived = weight * 2
        derived.grad = torch.ones(2, 3)
        assert grad_to_add_into(derived) is None  # not a leaf
        weight.grad = torch.ones(3, 2).t()
        assert grad_to_add_into(weight) is None  # not contiguous
        assert grad_to_add_into(_weight_with_grad(torch.float64)) is None  # not a dtype the kernels write
        hooked = _weight_with_grad()
        hooked.register_hook(lambda grad: grad)
        assert grad_to_add_into(hooked) is None
        post_hooked = _weight_with_grad()
        post_hooked.register_post_accumulate_grad_hook(lambda weight: None)
        assert grad_to_add_into(post_hooked) is None


def test_no_in_place_add_while_a_backward_builds_a_graph():
    weight = _weight_with_grad()
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(grad_to_add_into(weight))
            return grad

    x = torch.ones(2, requires_grad=True)
    with accumulate_into_grad():
        Probe.apply(x).sum().backward()
        torch.autograd.grad(Probe.apply(x).sum(), x, create_graph=True)
    assert seen[0] is weight.grad and seen[1] is None
