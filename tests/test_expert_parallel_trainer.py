"""`grpo train`'s trainer with `train.expert_parallel_size: 2` (two processes, each holding half of the
routed experts and training on half of the rollout batch) takes the same optimizer steps as one
process on the whole batch: same weights after the update, same metrics, and rank 0 publishes and
saves the gathered model under the unsharded names. On the CPU the ranks talk through gloo; where
CUDA is there (the trainer then picks NCCL) each rank gets a GPU of its own, as Ray gives each
trainer actor, and the single-process reference runs on a GPU too."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grpo.models.build import materialize
from grpo.trainer.policy_trainer import PolicyTrainer, RolloutBatch
from grpo.trainer.ranks import free_port

PAD = 0


def _recipe(model_path: str, ranks: int, gradient_checkpointing: bool = False) -> dict:
    return {
        "model": {"path": model_path},
        # two optimizer passes against frozen old logprobs, a KL reference, clipping that bites,
        # the routing-bias update and the balance loss: every path whose numbers cross ranks
        "algorithm": {"beta": 0.04, "mu": 2},
        "train": {
            "learning_rate": 1e-2,
            "max_grad_norm": 0.05,
            # rows grouped (and padded) differently on one rank and on two: padding must not count
            "micro_batch_size": 2,
            "routing_bias_gamma": 0.01,
            "balance_loss_alpha": 0.01,
            "expert_parallel_size": ranks,
            "gradient_checkpointing": gradient_checkpointing,
        },
        "rollout": {"max_tokens": 8},
    }


def _batch() -> RolloutBatch:
    generator = torch.Generator().manual_seed(3)

    def ids(length):
        return torch.randint(1, 20, (length,), generator=generator).tolist()

    prompts = [ids(4), ids(3), ids(5), ids(4), ids(2), ids(6)]
    completions = [ids(6), ids(2), ids(8), ids(5), ids(7), ids(3)]
    return RolloutBatch(prompts, completions, [1.0, -0.5, 0.25, -1.0, 0.75, -0.5], [[] for _ in prompts])


def _reference(model_path: str) -> tuple[dict, dict]:
    trainer = PolicyTrainer(model_path, _recipe(model_path, 1), PAD)
    metrics = trainer.train_step(_batch(), 1)
    return trainer._state(), metrics


def _rank_main(
    rank: int,
    model_path: str,
    init_method: str,
    expected_file: str,
    out_dir: str,
    gpus: int,
    checkpointing: bool,
):
    if gpus:  # before CUDA starts in this process: the rank sees its own GPU as cuda:0
        os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)
    expected_state, expected_metrics = torch.load(expected_file)
    trainer = PolicyTrainer(model_path, _recipe(model_path, 2, checkpointing), PAD, rank, init_method)
    metrics = trainer.train_step(_batch().shard(rank, 2), 1)
    for key in (
        "loss",
        "policy_loss",
        "kl",
        "clip_fraction",
        "entropy",
        "grad_norm",
        "moe/max_over_mean_load",
    ):
        assert abs(metrics[key] - expected_metrics[key]) <= 1e-5 * max(1.0, abs(expected_metrics[key])), key
    state = trainer._state()
    assert sorted(state) == sorted(expected_state)
    for name, tensor in expected_state.items():
        # 1% of the learning rate: Adam's normalized step turns a rounding-level gradient difference
        # on a near-zero gradient into a visible one (seen: one weight of 131,072 off by 4e-5)
        torch.testing.assert_close(state[name], tensor, atol=1e-4, rtol=1e-4, msg=name)
    manifest = trainer.publish_weights()
    assert (manifest is None) == (rank != 0)
    trainer.save(out_dir, model_path)
    dist.barrier()
    # gloo's C++ teardown can abort a rank at exit under CPU contention (see test_expert_parallel)
    os._exit(0)


def _gpus_for_two_ranks() -> int:
    """0 on the CPU (gloo), or the GPUs, one per rank; a skip where there is only one."""
    gpus = torch.cuda.device_count()
    if gpus == 1:
        pytest.skip("CUDA is there, so the trainer picks NCCL, which needs a GPU per rank: found 1")
    return gpus


# with activation checkpointing the ranks' all-to-alls run again in the backward, in the same order
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "gradient-checkpointing"])
def test_two_expert_parallel_ranks_take_the_single_process_step(tmp_path, checkpointing):
    from transformers import AutoModelForCausalLM

    gpus = _gpus_for_two_ranks()

    model_path = materialize("tiny:deepseek_v3", tmp_path / "model")
    expected_state, expected_metrics = _reference(model_path)
    assert expected_metrics["grad_norm"] > 0.05  # the clipping bites
    expected_file = str(tmp_path / "expected.pt")
    torch.save((expected_state, expected_metrics), expected_file)
    out_dir = str(tmp_path / "saved")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    mp.spawn(
        _rank_main, args=(model_path, init_method, expected_file, out_dir, gpus, checkpointing), nprocs=2
    )

    saved = AutoModelForCausalLM.from_pretrained(out_dir).state_dict()
    experts = "model.layers.1.mlp.experts.gate_up_proj"
    torch.testing.assert_close(saved[experts], expected_state[experts].cpu(), atol=1e-4, rtol=1e-4)


def _resume_rank_main(
    rank: int, model_path: str, init_methods: list[str], checkpoint: str, out_dir: str, gpus: int
):
    """Two ranks take a step, save, take another; two new ranks resume from the save and take that
    second step: each rank's own optimizer state (its experts' moments) must come back."""
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)
    recipe = _recipe(model_path, 2)
    first = PolicyTrainer(model_path, recipe, PAD, rank, init_methods[0])
    first.train_step(_batch().shard(rank, 2), 1)
    first.save(checkpoint, model_path)
    first.save_training_state(checkpoint)
    first.train_step(_batch().shard(rank, 2), 2)
    expected = first._state()
    first.close()
    resumed = PolicyTrainer(model_path, recipe, PAD, rank, init_methods[1], resume_from=checkpoint)
    resumed.train_step(_batch().shard(rank, 2), 2)
    state = resumed._state()
    if rank == 0:
        differ = [name for name in expected if not torch.equal(state[name], expected[name])]
        torch.save(differ, os.path.join(out_dir, "differ.pt"))
    dist.barrier()
    os._exit(0)


def test_expert_parallel_ranks_resume_each_with_its_own_optimizer_state(tmp_path):
    gpus = _gpus_for_two_ranks()
    model_path = materialize("tiny:deepseek_v3", tmp_path / "model")
    init_methods = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    checkpoint = str(tmp_path / "step-1")
    mp.spawn(_resume_rank_main, args=(model_path, init_methods, checkpoint, str(tmp_path), gpus), nprocs=2)
    assert sorted(p.name for p in (tmp_path / "step-1" / "trainer_state").iterdir()) == [
        "optimizer-rank0.pt",
        "optimizer-rank1.pt",
    ]
    assert torch.load(tmp_path / "differ.pt") == []
