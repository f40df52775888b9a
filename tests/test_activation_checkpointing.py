"""`train.gradient_checkpointing`: the trainer's step is the same step, to the bit, while each decoder
layer's forward runs again in the backward; the MoE layer counts its loads once and recomputes its
balance loss over the same real tokens."""

import pytest
import torch

from grpo.models.build import materialize
from grpo.models.moe import moe_layers
from grpo.trainer.policy_trainer import PolicyTrainer, RolloutBatch, pack, token_logprobs


def _batch() -> RolloutBatch:
    # rows of different lengths, so that the micro-batches are padded
    prompts, completions = [[1, 4, 5], [1, 6], [1, 7, 8, 9]], [[9, 10, 11, 12, 13, 14], [15, 16], [17] * 8]
    return RolloutBatch(prompts, completions, [1.0, -0.5, -0.5], [[] for _ in prompts])


@pytest.mark.parametrize(
    ("model", "train"),
    [
        ({"dtype": "float32"}, {}),
        ({"dtype": "bfloat16", "fp8": True}, {}),
        ({"dtype": "float32"}, {"lora": {}}),
    ],
    ids=["fp32", "fp8", "lora"],
)
def test_a_checkpointed_step_is_the_same_step(tmp_path, model, train):
    model_path = materialize("tiny:deepseek_v3", tmp_path / "init")
    results = []
    for checkpointing in (False, True):
        recipe = {
            "model": {"path": model_path, **model},
            "algorithm": {"beta": 0.1, "mu": 2},
            "train": {
                "learning_rate": 1e-2,
                "micro_batch_size": 2,
                "routing_bias_gamma": 0.01,
                "balance_loss_alpha": 0.1,
                "gradient_checkpointing": checkpointing,
                **train,
            },
        }
        trainer = PolicyTrainer(model_path, recipe, pad_id=0)
        forwards = []  # a pre-hook: the recompute stops once it has what the backward needs
        moe_layers(trainer.model)[0].register_forward_pre_hook(lambda *_, seen=forwards: seen.append(1))
        metrics = trainer.train_step(_batch(), 1)
        results.append((metrics, trainer._state(), len(forwards)))
    (plain, plain_state, plain_forwards), (checkpointed, state, forwards) = results
    # the frozen forwards once each (mu > 1's old policy; a LoRA run's KL reference is the policy
    # too), then 2 passes x 2 micro-batches of training forwards, which run again in the backward
    frozen = 4 if "lora" in train else 2
    assert (plain_forwards, forwards) == (frozen + 4, frozen + 8)
    for key in ("loss", "kl", "moe/balance_loss", "moe/max_over_mean_load", "grad_norm"):
        assert checkpointed[key] == plain[key], key
    assert [name for name in plain_state if not torch.equal(state[name], plain_state[name])] == []


def test_the_recomputed_forward_counts_no_expert_loads(tmp_path):
    model_path = materialize("tiny:deepseek_v3", tmp_path / "init")
    recipe = {"model": {"path": model_path}, "train": {"gradient_checkpointing": True}}
    trainer = PolicyTrainer(model_path, recipe, pad_id=0)
    packed = pack([[1, 4, 5], [1, 6]], [[6, 7, 8], [9]], pad_id=0)  # 6 + 3 tokens, 3 of padding
    logp_BL1, _ = token_logprobs(trainer.model, packed.to(trainer.accelerator.device))
    logp_BL1.sum().backward()
    # each real token routed to its top 2 of 8 experts, once
    assert [layer.load_since_update.sum().item() for layer in moe_layers(trainer.model)] == [18.0, 18.0]


def test_a_checkpointed_warm_up_is_the_same_warm_up(tmp_path):
    from safetensors.torch import load_file

    from grpo.config import recipe_from_dict
    from grpo.sft import sft

    finals = []
    for checkpointing in (False, True):
        recipe = recipe_from_dict(
            {
                "run": {"name": f"sft-{checkpointing}", "output_dir": str(tmp_path)},
                "model": {"path": "tiny:deepseek_v3", "moe": "grouped"},
                "sft": {"steps": 3, "batch_size": 4},
                "train": {
                    "routing_bias_gamma": 0.01,
                    "balance_loss_alpha": 0.1,
                    "gradient_checkpointing": checkpointing,
                },
            }
        )
        summary = sft(recipe, log=lambda line: None)
        finals.append(
            (summary["final_loss"], load_file(str(tmp_path / f"sft-{checkpointing}/final/model.safetensors")))
        )
    (plain_loss, plain), (loss, state) = finals
    assert loss == plain_loss
    assert [name for name in plain if not torch.equal(state[name], plain[name])] == []
