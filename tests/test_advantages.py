import torch

from grpo.algorithms.advantages import dr_grpo_advantages, grpo_advantages, rloo_advantages, tied_groups


def test_grpo_advantage_is_reward_minus_group_mean_over_unbiased_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    # mean 0.5, unbiased std sqrt(1/3) = 0.57735
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5]]) / (0.5773503 + 1e-4)
    assert torch.allclose(grpo_advantages(rewards), expected, atol=1e-6)


def test_grpo_advantage_of_a_tied_group_is_zero():
    assert torch.equal(grpo_advantages(torch.tensor([[1.0, 1.0, 1.0]])), torch.zeros(1, 3))


def test_dr_grpo_advantage_does_not_divide_by_std():
    rewards = torch.tensor([[2.0, 0.0], [3.0, 3.0]])
    assert torch.equal(dr_grpo_advantages(rewards), torch.tensor([[1.0, -1.0], [0.0, 0.0]]))


def test_rloo_subtracts_the_mean_of_the_other_completions():
    rewards = torch.tensor([[1.0, 0.0, 0.0]])
    # 1 - (0+0)/2 = 1;  0 - (1+0)/2 = -0.5
    assert torch.equal(rloo_advantages(rewards), torch.tensor([[1.0, -0.5, -0.5]]))


def test_tied_groups_flags_groups_whose_rewards_are_all_equal():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    assert tied_groups(rewards).tolist() == [True, False, True]


def test_the_batch_keeps_the_first_groups_with_signal_up_to_the_count_wanted():
    from grpo.algorithms.advantages import first_untied

    tied = torch.tensor([True, False, False, True, False, False])
    assert first_untied(tied, 3).tolist() == [False, True, True, False, True, False]
    assert first_untied(tied, 8).tolist() == [False, True, True, False, True, True]
    assert first_untied(torch.tensor([True, True]), 2).tolist() == [False, False]
