"""Starting Ray and a set of vLLM engine actors, and spreading prompts over them.

Shared by training (`grpo.orchestrator`) and evaluation (`grpo.eval`).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from grpo.rollout.vllm_engine import Completion, SamplingSpec, VllmEngine

# Idle OpenMP threads sleep instead of spinning: engines and the trainer take turns on the same
# cores, and a spinning neighbour steals half of them.
THREAD_ENV = {"OMP_NUM_THREADS": str(os.cpu_count() or 1), "OMP_WAIT_POLICY": "PASSIVE"}


def start_ray(address: str | None, cpus_needed: float) -> None:
    import ray

    if address:
        _check_answers(address)
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as error:
            raise ValueError(f"--ray-address {address}: {str(error).splitlines()[0]}") from None
    else:
        # Logical CPUs only: on a 2-core machine the trainer and the engine take turns anyway.
        ray.init(
            num_cpus=max(os.cpu_count() or 1, int(cpus_needed + 0.999)),
            include_dashboard=False,
            log_to_driver=False,
        )


def _check_answers(address: str, timeout_s: float = 10.0) -> None:
    """Ray retries a HOST:PORT where nothing listens for many minutes; a plain connection says so at once."""
    host, colon, port = address.rpartition(":")
    if not colon or "://" in address or not port.isdigit():  # `auto`, `ray://...`: Ray's own lookup
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise ValueError(
            f"--ray-address {address}: nothing answers there ({error.strerror or error})"
        ) from None


def start_engines(
    model_path: str,
    dtype: str,
    seed: int,
    count: int,
    cpus_per_engine: float,
    engine_kwargs: dict[str, Any],
    gpus_per_engine: float | None = None,
) -> list:
    """`count` VllmEngine Ray actors (by default one GPU each where there are GPUs); returns when all are up."""
    import ray
    import torch

    env = {
        **THREAD_ENV,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    gpus = gpus_per_engine if gpus_per_engine is not None else float(torch.cuda.is_available())
    engines = [
        ray.remote(VllmEngine)
        .options(num_cpus=cpus_per_engine, num_gpus=gpus, runtime_env={"env_vars": env})
        .remote(model_path, dtype, seed + i, engine_kwargs)
        for i in range(count)
    ]
    ray.get([engine.__ray_ready__.remote() for engine in engines])
    return engines


def rollout(engines: list, prompt_ids: list[list[int]], spec: SamplingSpec) -> list[list[Completion]]:
    """Spread prompts over the engines (contiguous shards) and gather the groups in order."""
    import ray

    shard = -(-len(prompt_ids) // len(engines))
    futures = [
        engine.generate.remote(prompt_ids[i * shard : (i + 1) * shard], spec)
        for i, engine in enumerate(engines)
        if prompt_ids[i * shard : (i + 1) * shard]
    ]
    return [group for part in ray.get(futures) for group in part]
