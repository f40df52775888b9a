"""Optimizer setup, including AdamW with BF16 moments and FP32 master weights (DeepSeek-V3 recipe).

AdamW's two moments are as large as the model twice over; DeepSeek-V3 keeps them in BF16 without
loss of quality. Parameters stored in a low-precision dtype get an FP32 master copy: the update is
applied to the master, and the parameter receives its rounding, so steps smaller than a BF16 ulp
accumulate instead of vanishing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class AdamWBf16Moments(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _state_for(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.bfloat16)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.bfloat16)
            if param.dtype != torch.float32:
                state["master"] = param.detach().float()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Torch's loader casts each saved state tensor to its parameter's dtype, which would round a
        BF16 parameter's FP32 master to BF16 and widen the BF16 moments: put them back as saved."""
        super().load_state_dict(state_dict)
        params = [param for group in self.param_groups for param in group["params"]]
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        for param, index in zip(params, saved_ids):
            if index in state_dict["state"]:
                self.state[param] = {
                    key: value.to(param.device) if torch.is_tensor(value) else value
                    for key, value in state_dict["state"][index].items()
                }

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self._state_for(param)
                state["step"] += 1
                grad = param.grad.float()
                # this step uses the moments in FP32; only what is kept for the next step is rounded
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
                master = state.get("master", param)
                master.mul_(1 - lr * group["weight_decay"])
                denom = (exp_avg_sq / (1 - beta2 ** state["step"])).sqrt_().add_(group["eps"])
                master.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** state["step"]))
                if master is not param:
                    param.copy_(master)
        return loss


def build_optimizer(
    params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, bf16_moments: bool
) -> torch.optim.Optimizer:
    if bf16_moments:
        return AdamWBf16Moments(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
