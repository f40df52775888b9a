"""KL to a frozen reference, per token (Schulman's k3 estimator)."""

from __future__ import annotations

import torch


def kl_k3(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """Unbiased, always non-negative estimator `pi_ref/pi - log(pi_ref/pi) - 1` (DeepSeekMath eq. 4)."""
    log_ratio_BT = ref_logp_BT - logp_BT
    return torch.exp(log_ratio_BT) - log_ratio_BT - 1.0
