import torch
from transformers import AutoModelForCausalLM

from grpo.models.moe import balance_loss, convert_moe, moe_layers
from grpo.models.tiny import tiny_deepseek_v3_config
from grpo.sft import sft_loss
from grpo.trainer.policy_trainer import pack


def test_the_sft_loss_adds_the_balance_loss_where_it_is_on():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_deepseek_v3_config(32))
    convert_moe(model)
    model.train()
    packed = pack([[1, 5, 6], [1, 7]], [[8, 9], [10, 11, 12]], 0)
    nll_off, loss_off = sft_loss(model, packed)
    assert loss_off is nll_off and balance_loss(model) is None
    for layer in moe_layers(model):
        layer.balance_loss_alpha = 0.5
    nll, loss = sft_loss(model, packed)
    balance = balance_loss(model)
    assert balance > 0
    assert torch.equal(nll, nll_off) and torch.equal(loss, nll + balance)
