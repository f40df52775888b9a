"""KL to a frozen reference, per token, by one of Schulman's estimators.

Both take the log ratio of the sampled tokens, which come from the policy (up to `mu`'s passes).
Their gradients, as a loss on those tokens, are of different KLs:
- k3 = r - log r - 1, with r = pi_ref / pi (DeepSeekMath eq. 4, GRPO's default): unbiased and never
  negative as a value; its gradient in expectation is that of the forward KL(pi_ref || pi);
- k2 = (log r)^2 / 2: a biased value, but its gradient in expectation is that of the reverse
  KL(pi || pi_ref), the KL that the RLHF objective penalises.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def kl_k3(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """`pi_ref/pi - log(pi_ref/pi) - 1`."""
    log_ratio_BT = ref_logp_BT - logp_BT
    return torch.exp(log_ratio_BT) - log_ratio_BT - 1.0


def kl_k2(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """`log(pi/pi_ref)^2 / 2`."""
    return 0.5 * (logp_BT - ref_logp_BT) ** 2


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"k3": kl_k3, "k2": kl_k2}
