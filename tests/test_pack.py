"""`pack`: the trainer's right-padded micro-batch and its masks."""

import torch

from grpo.trainer.policy_trainer import pack


def test_pack_right_pads_and_marks_the_completion_targets():
    packed = pack([[5, 6], [7]], [[8], [9, 10, 11]], pad_id=0)
    assert torch.equal(packed.input_ids_BL, torch.tensor([[5, 6, 8, 0], [7, 9, 10, 11]]))
    assert torch.equal(packed.attention_mask_BL, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    # logits at t predict token t + 1: a completion token's target position is one before it
    assert torch.equal(packed.completion_mask_BL1, torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))


def test_pack_places_the_engines_logprobs_at_their_tokens_target_positions():
    # row 1's engine gave no logprobs (greedy sampling): nothing is marked there
    packed = pack([[5, 6], [7]], [[8], [9, 10, 11]], pad_id=0, sampler_logprobs=[[-0.5], []])
    assert torch.equal(packed.sampler_logp_BL1, torch.tensor([[0.0, -0.5, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(packed.sampler_mask_BL1, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    packed = pack([[7]], [[9, 10, 11]], pad_id=0, sampler_logprobs=[[-1.0, -2.0, -3.0]])
    assert torch.equal(packed.sampler_logp_BL1, torch.tensor([[-1.0, -2.0, -3.0]]))
    assert torch.equal(packed.sampler_mask_BL1, packed.completion_mask_BL1)
