"""KL estimators between the policy and a frozen reference, per token (Schulman's k1/k3)."""

from __future__ import annotations

import torch


def kl_k3(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """Unbiased, always non-negative estimator `pi_ref/pi - log(pi_ref/pi) - 1` (DeepSeekMath eq. 4)."""
    log_ratio_BT = ref_logp_BT - logp_BT
    return torch.exp(log_ratio_BT) - log_ratio_BT - 1.0


def kl_k1(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """Naive estimator `log pi - log pi_ref`; unbiased but noisy, reported as a metric only."""
    return logp_BT - ref_logp_BT
