import math

import pytest
import torch

from grpo.algorithms.kl import kl_k3
from grpo.algorithms.losses import (
    BatchTotals,
    clipped_surrogate,
    grpo_loss,
    seq_mean_token_mean,
    seq_mean_token_sum_norm,
    token_mean,
)

MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
LOSS = torch.tensor([[1.0, 3.0, 100.0], [3.0, 3.0, 6.0]])
TOTALS = BatchTotals(sequences=2, tokens=5, max_completion_tokens=4)


def test_seq_mean_token_mean_averages_each_sequence_then_the_sequences():
    # (1+3)/2 = 2 and (3+3+6)/3 = 4 -> mean 3; the padded 100 never counts
    assert seq_mean_token_mean(LOSS, MASK, TOTALS).item() == 3.0


def test_token_mean_weighs_every_token_equally():
    assert token_mean(LOSS, MASK, TOTALS).item() == pytest.approx((1 + 3 + 3 + 3 + 6) / 5)


def test_seq_mean_token_sum_norm_divides_by_a_constant():
    assert seq_mean_token_sum_norm(LOSS, MASK, TOTALS).item() == 16 / (2 * 4)


def test_micro_batches_add_up_to_the_full_batch_loss():
    full = seq_mean_token_mean(LOSS, MASK, TOTALS)
    parts = seq_mean_token_mean(LOSS[:1], MASK[:1], TOTALS) + seq_mean_token_mean(LOSS[1:], MASK[1:], TOTALS)
    assert torch.equal(full, parts)


def test_clipping_uses_separate_low_and_high_bounds():
    old = torch.zeros(1, 4)
    # ratios 0.5, 0.9, 1.1, 1.5
    logp = torch.log(torch.tensor([[0.5, 0.9, 1.1, 1.5]]))
    loss, clipped = clipped_surrogate(logp, old, torch.tensor([1.0]), eps_low=0.2, eps_high=0.3)
    # positive advantage: min(r, clip(r, 0.8, 1.3)) -> 0.5, 0.9, 1.1, 1.3
    assert torch.allclose(loss, -torch.tensor([[0.5, 0.9, 1.1, 1.3]]))
    assert clipped.tolist() == [[False, False, False, True]]
    loss, clipped = clipped_surrogate(logp, old, torch.tensor([-1.0]), eps_low=0.2, eps_high=0.3)
    # negative advantage: min(-r, -clip(r)) -> -0.8, -0.9, -1.1, -1.5
    assert torch.allclose(loss, torch.tensor([[0.8, 0.9, 1.1, 1.5]]))
    assert clipped.tolist() == [[True, False, False, False]]


def test_k3_kl_matches_its_formula_and_is_zero_at_equal_policies():
    logp = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])
    # ratio ref/pi = 0.5: 0.5 - log(0.5) - 1 = 0.193147
    assert kl_k3(logp, ref).item() == pytest.approx(0.5 - math.log(0.5) - 1)
    assert kl_k3(logp, logp).item() == 0.0


def test_grpo_loss_at_ratio_one_is_minus_the_advantage_and_reports_metrics():
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]], requires_grad=True)
    advantages = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    totals = BatchTotals(sequences=2, tokens=4, max_completion_tokens=2)
    loss, metrics = grpo_loss(
        logp,
        logp.detach(),
        logp.detach(),
        advantages,
        mask,
        totals,
        eps_low=0.2,
        eps_high=0.2,
        beta=0.1,
        aggregate=seq_mean_token_mean,
    )
    assert loss.item() == 0.0  # (-1 + 1) / 2, KL is zero
    assert metrics["kl"].item() == 0.0 and metrics["clip_fraction"].item() == 0.0
    loss.backward()
    # d/dlogp of -A*ratio at ratio 1 is -A, times 1/(2 tokens)/(2 sequences)
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, -0.25], [0.25, 0.25]]))


def test_grpo_loss_refuses_a_reference_when_beta_is_zero():
    x = torch.zeros(1, 1)
    with pytest.raises(AssertionError):
        grpo_loss(
            x,
            x,
            x,
            torch.zeros(1),
            torch.ones(1, 1),
            TOTALS,
            eps_low=0.2,
            eps_high=0.2,
            beta=0.0,
            aggregate=token_mean,
        )


def test_the_sampler_gap_compares_each_completion_token_with_the_engines_logprob():
    from grpo.trainer.policy_trainer import PolicyTrainer, RolloutBatch

    # row 0: prompt of 2 tokens, so its completion's logprobs start at position 1; row 1 has none
    batch = RolloutBatch(
        prompt_ids=[[5, 6], [7]],
        completion_ids=[[8, 9], []],
        advantages=[1.0, -1.0],
        sampler_logprobs=[[-0.5, -1.0], []],
    )
    old_BL1 = torch.tensor([[-9.0, -0.25, -1.5], [-9.0, -9.0, -9.0]])
    assert PolicyTrainer._sampler_gap(batch, slice(0, 2), old_BL1) == 0.25 + 0.5
