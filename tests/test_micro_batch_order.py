"""Micro-batches of rows of similar length: less padding, the same step."""

import torch

from grpo.models.build import materialize
from grpo.trainer.policy_trainer import PolicyTrainer, RolloutBatch, split_rows

# rows of 2 + 8, 2 + 1, 2 + 7, 2 + 2, 3 + 9 and 3 + 1 tokens, as a group's completions may differ
PROMPTS = [[1, 4], [1, 4], [1, 5], [1, 5], [1, 6, 7], [1, 6, 7]]
COMPLETIONS = [[9] * 8, [10], [11] * 7, [12, 13], [14] * 9, [15]]


def _trainer(model_path: str, ordered: bool, **train) -> PolicyTrainer:
    recipe = {
        "model": {"path": model_path},
        "algorithm": {"beta": 0.1, "mu": 2},
        "train": {
            "micro_batch_size": 2,
            "learning_rate": 1e-2,
            "routing_bias_gamma": 0.01,
            "balance_loss_alpha": 0.01,
            **train,
        },
    }
    trainer = PolicyTrainer(model_path, recipe, pad_id=0)
    trainer.order_rows_by_length = ordered
    return trainer


def _batch() -> RolloutBatch:
    return RolloutBatch(PROMPTS, COMPLETIONS, [1.0, -1.0, 0.5, -0.5, 2.0, -2.0], [[] for _ in PROMPTS])


def test_rows_go_to_micro_batches_in_order_of_length(tmp_path):
    model_path = materialize("tiny:deepseek_v3", tmp_path / "init")
    ordered = _trainer(model_path, True)._micro_batches(_batch())
    assert [rows.tolist() for rows, _ in ordered] == [[1, 3], [5, 2], [0, 4]]  # ties keep their order
    assert [packed.input_ids_BL.shape[1] for _, packed in ordered] == [4, 9, 12]
    as_given = _trainer(model_path, False)._micro_batches(_batch())
    assert [packed.input_ids_BL.shape[1] for _, packed in as_given] == [10, 9, 12]


def test_the_order_of_the_rows_changes_only_the_order_gradients_add_up_in(tmp_path):
    """Each row keeps its advantage and its reference logprobs wherever it goes: the step, two
    passes with a KL term, the balance loss and the routing-bias update, is the same to rounding."""
    model_path = materialize("tiny:deepseek_v3", tmp_path / "init")
    ordered, as_given = _trainer(model_path, True), _trainer(model_path, False)
    got, expected = ordered.train_step(_batch(), 1), as_given.train_step(_batch(), 1)
    for key in ("loss", "policy_loss", "kl", "entropy", "grad_norm", "moe/balance_loss"):
        assert abs(got[key] - expected[key]) <= 1e-6 * max(1.0, abs(expected[key])), key
    state, expected_state = ordered._state(), as_given._state()
    for name, tensor in expected_state.items():
        # Adam's first steps move a weight by up to the learning rate (1e-2) whatever its gradient's
        # size, so where a gradient is near 0 its rounding shows (1.6e-5 seen); a row misplaced
        # would move weights by the rate's order
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=1e-3)


def test_a_token_cap_closes_a_micro_batch_before_its_padded_size_would_pass_it():
    lengths = [3, 4, 4, 9, 10]
    assert split_rows([0, 1, 2, 3, 4], lengths, 8, None) == [[0, 1, 2, 3, 4]]
    assert split_rows([0, 1, 2, 3, 4], lengths, 2, None) == [[0, 1], [2, 3], [4]]
    # 3 rows padded to 4 tokens fit 12; a fourth, of 9, would pad all four to 36
    assert split_rows([0, 1, 2, 3, 4], lengths, 8, 12) == [[0, 1, 2], [3], [4]]
    assert split_rows([0, 1, 2, 3, 4], lengths, 8, 5) == [[0], [1], [2], [3], [4]]  # each alone


def test_the_trainer_cuts_micro_batches_by_tokens_and_takes_the_same_step(tmp_path):
    model_path = materialize("tiny:deepseek_v3", tmp_path / "init")
    capped = _trainer(model_path, True, micro_batch_size=8, micro_batch_tokens=20)
    plain = _trainer(model_path, True)
    assert [rows.tolist() for rows, _ in capped._micro_batches(_batch())] == [[1, 3, 5], [2, 0], [4]]
    got, expected = capped.train_step(_batch(), 1), plain.train_step(_batch(), 1)
    for key in ("loss", "policy_loss", "kl", "entropy", "grad_norm", "moe/balance_loss"):
        assert abs(got[key] - expected[key]) <= 1e-6 * max(1.0, abs(expected[key])), key
