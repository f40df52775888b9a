"""The clipped policy-gradient surrogate and the ways to aggregate it over tokens.

Shape legend: B = completions in a micro-batch, T = completion tokens (right-padded).
`mask_BT` is 1.0 on real completion tokens and 0.0 on padding.

Aggregation is normalised by totals of the *whole* rollout batch (`BatchTotals`), so summing the
losses of micro-batches gives exactly the loss of the full batch (gradient accumulation is exact).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from grpo.algorithms.kl import KL_ESTIMATORS


@dataclass(frozen=True)
class BatchTotals:
    """Normalisers taken over the full rollout batch, not the micro-batch."""

    sequences: int
    tokens: int
    max_completion_tokens: int


Aggregate = Callable[[torch.Tensor, torch.Tensor, BatchTotals], torch.Tensor]


def seq_mean_token_mean(loss_BT: torch.Tensor, mask_BT: torch.Tensor, totals: BatchTotals):
    """GRPO: mean over each sequence's tokens, then mean over sequences (long answers weigh less)."""
    per_seq_B = (loss_BT * mask_BT).sum(dim=1) / mask_BT.sum(dim=1).clamp(min=1.0)
    return per_seq_B.sum() / totals.sequences


def token_mean(loss_BT: torch.Tensor, mask_BT: torch.Tensor, totals: BatchTotals):
    """DAPO: every token of the batch weighs the same."""
    return (loss_BT * mask_BT).sum() / totals.tokens


def seq_mean_token_sum_norm(loss_BT: torch.Tensor, mask_BT: torch.Tensor, totals: BatchTotals):
    """Dr. GRPO: token sums divided by a constant (sequences x max length), no length bias."""
    return (loss_BT * mask_BT).sum() / (totals.sequences * totals.max_completion_tokens)


AGGREGATIONS: dict[str, Aggregate] = {
    "seq_mean_token_mean": seq_mean_token_mean,
    "token_mean": token_mean,
    "seq_mean_token_sum_norm": seq_mean_token_sum_norm,
}


def log_ratio(
    logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, mask_BT: torch.Tensor, level: str = "token"
) -> torch.Tensor:
    """`log(pi / pi_old)` of each token (`token`: PPO's and GRPO's), or GSPO's sequence-level ratio
    (`sequence`, Zheng et al., 2025): the mean over the completion's tokens, given to each of them,
    so one completion is clipped as a whole rather than token by token."""
    log_ratio_BT = logp_BT - old_logp_BT
    if level == "token":
        return log_ratio_BT
    tokens_B1 = mask_BT.sum(1, keepdim=True).clamp(min=1.0)
    per_sequence_B1 = (log_ratio_BT * mask_BT).sum(1, keepdim=True) / tokens_B1
    return per_sequence_B1.expand_as(log_ratio_BT)


def clipped_surrogate(
    log_ratio_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic surrogate per token, with DAPO's asymmetric clip range.

    Returns `(loss_BT, clipped_BT)`: the loss to minimise and where clipping removed the gradient.
    """
    ratio_BT = torch.exp(log_ratio_BT)
    adv_B1 = advantages_B.unsqueeze(1)
    unclipped_BT = ratio_BT * adv_B1
    clipped_ratio_BT = ratio_BT.clamp(1.0 - eps_low, 1.0 + eps_high)
    clipped_BT = clipped_ratio_BT * adv_B1
    loss_BT = -torch.minimum(unclipped_BT, clipped_BT)
    return loss_BT, (clipped_BT < unclipped_BT)


def sampler_correction(
    old_logp_BT: torch.Tensor, sampler_logp_BT: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance sampling (Yao et al., 2025): the completions were sampled by vLLM, whose
    logprobs differ from the trainer's (other kernels, FP8 rollouts), so each token's policy-gradient
    term is weighted by `min(pi_old / pi_sampler, cap)`. Returns the weights (no gradient) and where
    the cap cut them."""
    ratio_BT = torch.exp(old_logp_BT.detach() - sampler_logp_BT)
    return ratio_BT.clamp(max=cap), ratio_BT > cap


def grpo_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    ref_logp_BT: torch.Tensor | None,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    totals: BatchTotals,
    *,
    eps_low: float,
    eps_high: float,
    beta: float,
    aggregate: Aggregate,
    ratio_level: str = "token",
    weight_BT: torch.Tensor | None = None,
    kl_estimator: str = "k3",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate (weighted per token by `weight_BT`, e.g. `sampler_correction`'s) plus
    `beta` x the KL to the reference (`kl_estimator`, see `grpo.algorithms.kl`), aggregated by
    `aggregate`.

    Returns `(loss, metrics)`; metric values are sums normalised like the loss, so they also add up
    across micro-batches. `ref_logp_BT` is None exactly when `beta == 0`.
    """
    assert (ref_logp_BT is None) == (beta == 0.0), "a reference is needed iff beta > 0"
    pg_loss_BT, clipped_BT = clipped_surrogate(
        log_ratio(logp_BT, old_logp_BT, mask_BT, ratio_level), advantages_B, eps_low, eps_high
    )
    if weight_BT is not None:
        pg_loss_BT = pg_loss_BT * weight_BT
    loss_BT = pg_loss_BT
    metrics = {"clip_fraction": token_mean(clipped_BT.float(), mask_BT, totals)}
    if ref_logp_BT is not None:
        kl_BT = KL_ESTIMATORS[kl_estimator](logp_BT, ref_logp_BT)
        loss_BT = loss_BT + beta * kl_BT
        metrics["kl"] = token_mean(kl_BT.detach(), mask_BT, totals)
    loss = aggregate(loss_BT, mask_BT, totals)
    metrics["policy_loss"] = aggregate(pg_loss_BT.detach(), mask_BT, totals)
    return loss, metrics
