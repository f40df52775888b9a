import torch
from conftest import bos_adding_tokenizer
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


def test_an_sft_sequence_has_one_bos_however_the_tokenizer_adds_them():
    from grpo.sft import sft_batch

    tokenizer = bos_adding_tokenizer()
    assert tokenizer("3=")["input_ids"] == [1, 6, 83]  # <s> is 1, </s> 2, "0" 3, "+" 75, "=" 83
    packed = sft_batch(tokenizer, [("1+1=", "2"), ("3=", "3")])
    assert packed.input_ids_BL.tolist() == [[1, 4, 75, 4, 83, 5, 2], [1, 6, 83, 6, 2, 0, 0]]
    # the loss is over the completion and its end of sequence
    assert packed.completion_mask_BL1.tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 0, 0]]


def test_a_pair_fits_the_context_counting_one_bos():
    from grpo.data import ContextFit

    # <s> 1 + 1 = 2 is six tokens, and the end of sequence needs a seventh position
    pair = {"prompt": "1+1=", "completion": "2"}
    assert ContextFit(bos_adding_tokenizer(), context=7, fields=("prompt", "completion"))(pair)
    assert not ContextFit(bos_adding_tokenizer(), context=6, fields=("prompt", "completion"))(pair)


def test_grpo_sft_compiles_the_fp8_kernels_ahead_for_its_batch_where_asked(tmp_path, monkeypatch):
    from grpo.config import recipe_from_dict
    from grpo.models import fp8_warm_up
    from grpo.sft import sft

    asked = []

    def warm_up(model, rows, device, ranks=1):
        asked.append((rows, device.type))
        return {"jobs": 0}

    monkeypatch.setattr(fp8_warm_up, "warm_up", warm_up)
    tree = {
        "run": {"output_dir": str(tmp_path)},
        "model": {"path": "tiny:deepseek_v3", "fp8": True},
        "data": {"source": "task:arithmetic"},
        "sft": {"steps": 1, "batch_size": 2},
        "train": {"fp8_warm_up": True},
    }
    logs = []
    sft(recipe_from_dict(tree), log=logs.append)
    tree["train"]["fp8_warm_up"] = False
    sft(recipe_from_dict(tree), log=logs.append)

    assert asked == [(2 * 256, "cpu")]  # the batch's rows x the tiny model's 256 positions
    assert logs.count("sft: DeepGEMM's kernels compiled ahead: {'jobs': 0}") == 1
