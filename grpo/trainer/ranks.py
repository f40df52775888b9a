"""The trainer's ranks as one object for the driver.

With `train.expert_parallel_size: 1` this is one `PolicyTrainer` actor. With more, it starts one actor
per rank; they form a process group at start (a TCP rendezvous on this host, so the trainer ranks
must share the driver's host, as the weight sync's shared memory already requires). Every call
goes to all ranks (the ranks' collectives need each of them), `train_step` with each rank's share of
the batch; the driver gets rank 0's answer. A rank that fails fails the call at once, rather than
leaving the driver waiting on the others, which would be stuck in a collective.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from grpo.config import Recipe, RecipeError
from grpo.rollout.engines import THREAD_ENV
from grpo.trainer.policy_trainer import PolicyTrainer, RolloutBatch


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _all(refs: list) -> list:
    """Results in rank order; raises as soon as any rank raises."""
    import ray

    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return ray.get(refs)


class TrainerRanks:
    def __init__(
        self,
        recipe: Recipe,
        model_path: str,
        pad_id: int,
        gpus_per_rank: float,
        resume_from: str | None = None,
    ):
        import ray

        ranks = recipe.train.expert_parallel_size
        if ranks > 1 and 0 < gpus_per_rank < 1:
            raise RecipeError(
                "train.expert_parallel_size: on GPUs each trainer rank needs a GPU of its own "
                "(NCCL ranks cannot share one): set rollout.colocate: false"
            )
        init_method = f"tcp://127.0.0.1:{free_port()}" if ranks > 1 else ""
        actor = ray.remote(PolicyTrainer).options(
            num_cpus=1, num_gpus=gpus_per_rank, runtime_env={"env_vars": THREAD_ENV}
        )
        config = recipe.model_dump(mode="json")
        self.actors = [
            actor.remote(model_path, config, pad_id, rank, init_method, resume_from) for rank in range(ranks)
        ]
        _all([a.__ray_ready__.remote() for a in self.actors])

    def call(self, method: str, *args, **kwargs):
        """`PolicyTrainer.method(*args, **kwargs)` on every rank; rank 0's result."""
        return _all([getattr(a, method).remote(*args, **kwargs) for a in self.actors])[0]

    def start_train_step(self, batch: RolloutBatch, step: int) -> Callable[[], dict[str, float]]:
        """Starts `train_step` on every rank and returns at once, so that the driver can sample the
        next batch meanwhile (`rollout.overlap`); calling the result waits for rank 0's metrics."""
        ranks = len(self.actors)
        refs = [a.train_step.remote(batch.shard(r, ranks), step) for r, a in enumerate(self.actors)]
        return lambda: _all(refs)[0]
