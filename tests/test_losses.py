import math

import pytest
import torch

from grpo.algorithms.kl import kl_k2, kl_k3
from grpo.algorithms.losses import (
    BatchTotals,
    clipped_surrogate,
    grpo_loss,
    log_ratio,
    sampler_correction,
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
    loss, clipped = clipped_surrogate(logp - old, torch.tensor([1.0]), eps_low=0.2, eps_high=0.3)
    # positive advantage: min(r, clip(r, 0.8, 1.3)) -> 0.5, 0.9, 1.1, 1.3
    assert torch.allclose(loss, -torch.tensor([[0.5, 0.9, 1.1, 1.3]]))
    assert clipped.tolist() == [[False, False, False, True]]
    loss, clipped = clipped_surrogate(logp - old, torch.tensor([-1.0]), eps_low=0.2, eps_high=0.3)
    # negative advantage: min(-r, -clip(r)) -> -0.8, -0.9, -1.1, -1.5
    assert torch.allclose(loss, torch.tensor([[0.8, 0.9, 1.1, 1.5]]))
    assert clipped.tolist() == [[True, False, False, False]]


def test_k3_kl_matches_its_formula_and_is_zero_at_equal_policies():
    logp = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])
    # ratio ref/pi = 0.5: 0.5 - log(0.5) - 1 = 0.193147
    assert kl_k3(logp, ref).item() == pytest.approx(0.5 - math.log(0.5) - 1)
    assert kl_k3(logp, logp).item() == 0.0


def test_k2_kl_is_half_the_squared_log_ratio():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_k2(logp, ref).item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_k2(logp, logp).item() == 0.0


@pytest.mark.parametrize(
    ("estimator", "direction"),
    [(kl_k2, "reverse: KL(pi || pi_ref)"), (kl_k3, "forward: KL(pi_ref || pi)")],
)
def test_each_kl_estimator_as_a_loss_has_the_gradient_of_its_kl_in_expectation(estimator, direction):
    """Over every token of a 4-way policy, weighted by how often the policy samples it (the weights
    held fixed, as sampling is), the estimator's gradient is the named KL's exact gradient."""
    logits = torch.tensor([0.3, -1.2, 0.8, 0.1], dtype=torch.float64, requires_grad=True)
    ref_logp = torch.log_softmax(torch.tensor([1.0, 0.0, -0.5, 0.2], dtype=torch.float64), 0)
    logp = torch.log_softmax(logits, 0)
    p, p_ref = logp.exp(), ref_logp.exp()
    exact = (
        (p * (logp - ref_logp)).sum()
        if direction.startswith("reverse")
        else (p_ref * (ref_logp - logp)).sum()
    )
    [sampled_gradient] = torch.autograd.grad(
        (p.detach() * estimator(logp, ref_logp)).sum(), logits, retain_graph=True
    )
    [exact_gradient] = torch.autograd.grad(exact, logits)
    assert torch.allclose(sampled_gradient, exact_gradient, rtol=0, atol=1e-12)


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


def test_the_sequence_level_ratio_is_each_completions_mean_log_ratio_given_to_every_token():
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.25, 0.75, 9.0], [0.0, 0.25, 0.5]])  # 9.0 is padding
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert torch.equal(log_ratio(logp, old, mask, "token"), logp)
    assert log_ratio(logp, old, mask, "sequence").tolist() == [[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]


def test_gspo_clips_a_completion_as_a_whole():
    # token ratios e^-0.1 and e^0.5 (the first inside 1 +- 0.2, the second above); their mean e^0.2 is
    # above 1.2 too, so under GSPO both tokens lose their gradient
    logp, old, mask = torch.tensor([[-0.1, 0.5]]), torch.zeros(1, 2), torch.ones(1, 2)
    for level, expected in (("token", [[False, True]]), ("sequence", [[True, True]])):
        _, clipped = clipped_surrogate(log_ratio(logp, old, mask, level), torch.tensor([1.0]), 0.2, 0.2)
        assert clipped.tolist() == expected


@pytest.mark.parametrize("aggregate", [seq_mean_token_mean, token_mean, seq_mean_token_sum_norm])
def test_in_one_pass_the_sequence_level_update_is_the_token_levels(aggregate):
    # with pi_old = pi (mu: 1) every ratio is 1, and the two levels give the same gradient
    grads = []
    for level in ("token", "sequence"):
        logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.5, -1.5, 0.0]], requires_grad=True)
        loss, _ = grpo_loss(
            logp,
            logp.detach(),
            None,
            torch.tensor([1.0, -0.5]),
            MASK,
            TOTALS,
            eps_low=0.2,
            eps_high=0.2,
            beta=0.0,
            aggregate=aggregate,
            ratio_level=level,
        )
        loss.backward()
        grads.append(logp.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=0.0)
    assert grads[0][0, 2] == 0.0  # padding


def test_the_sampler_correction_weighs_tokens_by_the_capped_ratio_of_old_policy_to_sampler():
    old = torch.tensor([[0.0, -1.0, 2.0]])
    weight, capped = sampler_correction(old, torch.zeros(1, 3), cap=3.0)
    assert weight.tolist() == [[1.0, torch.exp(torch.tensor(-1.0)).item(), 3.0]]
    assert capped.tolist() == [[False, False, True]]
    # the weights scale the policy-gradient term and carry no gradient of their own
    logp = old.clone().requires_grad_()
    loss, metrics = grpo_loss(
        logp,
        logp.detach(),
        None,
        torch.tensor([1.0]),
        torch.ones(1, 3),
        BatchTotals(sequences=1, tokens=3, max_completion_tokens=3),
        eps_low=0.2,
        eps_high=0.2,
        beta=0.0,
        aggregate=token_mean,
        weight_BT=sampler_correction(logp, torch.zeros(1, 3), cap=3.0)[0],
    )
    loss.backward()
    assert torch.allclose(logp.grad, -weight / 3, rtol=1e-6, atol=0.0)
    assert metrics["policy_loss"].item() == pytest.approx(-(1.0 + math.exp(-1.0) + 3.0) / 3)


def test_the_sampler_gap_compares_each_completion_token_with_the_engines_logprob():
    from grpo.trainer.policy_trainer import pack, sampler_gap

    # row 0: prompt of 2 tokens, so its completion's logprobs start at position 1; row 1 has none
    packed = pack([[5, 6], [7]], [[8, 9], [10]], pad_id=0, sampler_logprobs=[[-0.5, -1.0], []])
    old_BL1 = torch.tensor([[-9.0, -0.25, -1.5], [-9.0, -9.0, -9.0]])
    assert sampler_gap(old_BL1, packed).item() == 0.25 + 0.5


def _step_on_shifted_engine_logprobs(tmp_path, algorithm: dict) -> dict:
    """One train step on three rows (advantages 1, -0.5, -0.5; 6, 2 and 8 completion tokens) whose
    engine logprobs are the trainer's own minus log 2, log 2 and log 10: the engine gave rows 0
    and 1 half the trainer's probability and row 2 a tenth."""
    from grpo.models.build import materialize
    from grpo.trainer.policy_trainer import PolicyTrainer, RolloutBatch

    model_path = materialize("tiny:deepseek_v3", tmp_path / "init")
    trainer = PolicyTrainer(model_path, {"model": {"path": model_path}, "algorithm": algorithm}, pad_id=0)
    prompts, completions = [[1, 4, 5], [1, 6], [1, 7, 8]], [[9, 10, 11, 12, 13, 14], [15, 16], [17] * 8]
    own = [
        logprobs[len(prompt) - 1 :]
        for prompt, logprobs in zip(
            prompts, trainer.sequence_logprobs([p + c for p, c in zip(prompts, completions)])
        )
    ]
    shifts = [math.log(2), math.log(2), math.log(10)]
    sampler = [[value - shift for value in row] for row, shift in zip(own, shifts)]
    return trainer.train_step(RolloutBatch(prompts, completions, [1.0, -0.5, -0.5], sampler), 1)


SHIFTED_GAP = (8 * math.log(2) + 8 * math.log(10)) / 16  # the trainer's logprobs against the engine's


def test_the_trainer_weighs_each_token_by_the_capped_ratio_to_the_engines_logprob(tmp_path):
    metrics = _step_on_shifted_engine_logprobs(tmp_path, {"sampler_ratio_cap": 3.0})
    # weights 2, 2 and 10 capped at 3; at ratio 1 the loss is -mean(A * weight): -(2 - 1 - 1.5) / 3
    assert metrics["policy_loss"] == pytest.approx(0.5 / 3, rel=1e-5)
    assert metrics["sampler_ratio_capped"] == 8 / 16  # row 2's tokens of the 16
    assert metrics["sampler_logprob_diff"] == pytest.approx(SHIFTED_GAP, rel=1e-5)


def test_with_the_sampler_as_old_policy_the_ratio_is_to_the_engines_logprob_and_clipped(tmp_path):
    """`old_policy: sampler`: pi_old is the engine's logprob, so the ratios are 2, 2 and 10, clipped
    at 1.2 where the advantage is positive; with `old_policy: trainer` every ratio is 1."""
    sampler = _step_on_shifted_engine_logprobs(tmp_path / "sampler", {"old_policy": "sampler"})
    trainer = _step_on_shifted_engine_logprobs(tmp_path / "trainer", {"old_policy": "trainer"})
    # -min(r A, clip(r) A) per row: -1.2 (A 1, r 2), 1.0 (A -0.5, r 2), 5.0 (A -0.5, r 10); mean of rows
    assert sampler["policy_loss"] == pytest.approx((-1.2 + 1.0 + 5.0) / 3, rel=1e-5)
    assert sampler["clip_fraction"] == 6 / 16  # row 0's tokens
    assert trainer["policy_loss"] == pytest.approx(0.0, abs=1e-6) and trainer["clip_fraction"] == 0.0
    # the gap is the trainer's logprobs against the engine's, whichever is pi_old
    assert sampler["sampler_logprob_diff"] == pytest.approx(SHIFTED_GAP, rel=1e-5)


def test_the_trainer_takes_the_kl_estimator_the_recipe_names(tmp_path):
    """With `mu: 2` the second pass sees a policy that moved from the reference: each estimator's
    mean then differs, and each is the one `algorithm.kl_estimator` names."""
    from grpo.models.build import materialize
    from grpo.trainer.policy_trainer import PolicyTrainer, RolloutBatch

    model_path = materialize("tiny:deepseek_v3", tmp_path / "init")
    batch = RolloutBatch([[1, 4, 5], [1, 6]], [[9, 10, 11], [12, 13]], [1.0, -1.0], [[], []])

    def kl(estimator: str) -> float:
        algorithm = {"beta": 0.1, "mu": 2, "kl_estimator": estimator}
        recipe = {"model": {"path": model_path}, "algorithm": algorithm, "train": {"learning_rate": 1e-2}}
        return PolicyTrainer(model_path, recipe, pad_id=0).train_step(batch, 1)["kl"]

    k2, k3 = kl("k2"), kl("k3")
    # the first pass adds 0 (policy = reference); the same first step leads to the same second pass,
    # where log ratios x are small: k3 = x^2/2 - x^3/6 + ..., k2 = x^2/2
    assert k2 > 0 and k3 > 0 and k2 != k3 and k3 == pytest.approx(k2, rel=0.5)
