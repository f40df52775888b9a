import torch

from grpo.trainer.optim import AdamWBf16Moments


def test_first_steps_match_torch_adamw_on_fp32_parameters():
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))
    theirs.data.copy_(ours.data)
    opt_ours = AdamWBf16Moments([ours], lr=0.1, weight_decay=0.01)
    opt_theirs = torch.optim.AdamW([theirs], lr=0.1, weight_decay=0.01)
    for step in range(3):
        grad = torch.randn(4, 3)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_theirs.step()
        if step == 0:  # the first step uses unrounded moments: equal up to float arithmetic
            torch.testing.assert_close(ours.data, theirs.data)
    # later steps read BF16-rounded moments: the updates (0.1 each) agree to a few parts per thousand
    torch.testing.assert_close(ours.data, theirs.data, atol=2e-3, rtol=0)
    assert opt_ours.state[ours]["exp_avg"].dtype == torch.bfloat16


def test_updates_below_a_bf16_ulp_accumulate_in_the_fp32_master():
    ours = torch.nn.Parameter(torch.ones(1, dtype=torch.bfloat16))
    plain = torch.nn.Parameter(torch.ones(1, dtype=torch.bfloat16))
    opt_ours = AdamWBf16Moments([ours], lr=1e-3)
    opt_plain = torch.optim.AdamW([plain], lr=1e-3, weight_decay=0.0)
    for _ in range(10):  # each Adam step moves by ~lr = 1e-3, an eighth of the ulp at 1.0 (2^-7)
        ours.grad = torch.ones(1, dtype=torch.bfloat16)
        plain.grad = torch.ones(1, dtype=torch.bfloat16)
        opt_ours.step()
        opt_plain.step()
    assert plain.item() == 1.0  # every step rounded away
    assert abs(opt_ours.state[ours]["master"].item() - 0.99) < 1e-5
    assert ours.item() == 0.98828125  # the bf16 value nearest to 0.99 (253/256)


def test_a_saved_state_loads_back_with_its_fp32_master_and_bf16_moments():
    def trained(steps: int):
        param = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
        optimizer = AdamWBf16Moments([param], lr=1e-3)
        for _ in range(steps):
            param.grad = torch.tensor([1.0, -1.0], dtype=torch.bfloat16)
            optimizer.step()
        return param, optimizer

    param, optimizer = trained(4)
    resumed_param = torch.nn.Parameter(param.detach().clone())
    resumed = AdamWBf16Moments([resumed_param], lr=1e-3)
    resumed.load_state_dict(optimizer.state_dict())
    state = resumed.state[resumed_param]
    assert (state["master"].dtype, state["exp_avg"].dtype, state["step"]) == (
        torch.float32,
        torch.bfloat16,
        4,
    )
    for p, o in ((param, optimizer), (resumed_param, resumed)):
        p.grad = torch.tensor([1.0, -1.0], dtype=torch.bfloat16)
        o.step()
    assert torch.equal(resumed.state[resumed_param]["master"], optimizer.state[param]["master"])
    assert resumed.state[resumed_param]["master"].tolist() != resumed_param.float().tolist()
