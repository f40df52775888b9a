"""Expert parallelism over the GPUs of one host (NCCL): the MoE layer's throughput sharded against one GPU.

A DeepSeek-V3-shaped MoE layer (hidden 7168, expert intermediate 2048, 64 routed experts, top-8 of
8 groups, sigmoid routing; no shared expert, which is replicated and would only add the same work
everywhere) is built identically on every rank. Rank 0 first times the whole layer alone on its GPU
(forward + backward of `TOKENS` tokens); then every rank keeps 1/R of the experts
(`grpo.parallel.expert_parallel.shard_experts`) and all ranks time the sharded layer at once, each on
its own `TOKENS` tokens (so R times the tokens per step). Also timed: one all-to-all of the
dispatched activations alone (its bus bandwidth). Both for BF16 experts and for FP8 experts.

Throughput = tokens per second over all ranks; scaling efficiency = sharded throughput / (R x one
GPU's). Median of CUDA-event timings; the sharded figure is the slowest rank's median. Last line: one
JSON object.

    python benchmarks/expert_parallel_gpu.py            # every visible GPU
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cuda_timing import median_ms

from grpo.models.moe import MoeLayer, Routing
from grpo.parallel.expert_parallel import shard_experts
from grpo.trainer.ranks import free_port

TOKENS, HIDDEN, INTER = 4096, 7168, 2048
ROUTING = Routing(
    num_experts=64, top_k=8, scoring="sigmoid", n_group=8, topk_group=4, routed_scaling_factor=2.5
)


def build_layer(device) -> MoeLayer:
    torch.manual_seed(0)
    layer = MoeLayer(HIDDEN, INTER, ROUTING)
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.02)
    return layer.to(device, torch.bfloat16).train()


def step(layer: MoeLayer, x: torch.Tensor, grad: torch.Tensor):
    def run():
        layer(x).backward(grad)

    return run


def all_to_all_gbps(rank: int, ranks: int, device) -> float:
    """Bus bandwidth of one all-to-all of the dispatched activations (TOKENS x top-k rows of HIDDEN
    BF16 values, split evenly over the ranks)."""
    rows = TOKENS * ROUTING.top_k
    send = torch.randn(rows, HIDDEN, device=device, dtype=torch.bfloat16)
    recv = torch.empty_like(send)
    ms = median_ms(lambda: dist.all_to_all_single(recv, send))
    moved = send.numel() * send.element_size() * (ranks - 1) / ranks
    return moved / ms / 1e6


def rank_main(rank: int, ranks: int, init_method: str, out_file: str) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=ranks, device_id=device)
    generator = torch.Generator(device=device).manual_seed(1 + rank)
    x = torch.randn(TOKENS, HIDDEN, device=device, dtype=torch.bfloat16, generator=generator)
    x.requires_grad_()
    grad = torch.randn(TOKENS, HIDDEN, device=device, dtype=torch.bfloat16, generator=generator)
    result = {"ranks": ranks, "tokens_per_rank": TOKENS, "rows": []}
    for fp8 in (False, True):
        layer = build_layer(device)
        layer.experts.fp8 = fp8
        single_ms = median_ms(step(layer, x, grad)) if rank == 0 else 0.0
        dist.barrier()
        shard_experts(layer)
        layer.zero_grad(set_to_none=True)
        sharded_ms = torch.tensor(median_ms(step(layer, x, grad)), device=device)
        dist.all_reduce(sharded_ms, op=dist.ReduceOp.MAX)
        sharded = sharded_ms.item()
        if rank == 0:
            single_tps = TOKENS / single_ms * 1e3
            sharded_tps = ranks * TOKENS / sharded * 1e3
            result["rows"].append(
                {
                    "experts": "fp8" if fp8 else "bf16",
                    "one_gpu_ms": round(single_ms, 3),
                    "sharded_ms_slowest_rank": round(sharded, 3),
                    "one_gpu_tokens_per_s": round(single_tps),
                    "sharded_tokens_per_s": round(sharded_tps),
                    "scaling_efficiency": round(sharded_tps / (ranks * single_tps), 3),
                }
            )
        del layer
        torch.cuda.empty_cache()
    gbps = all_to_all_gbps(rank, ranks, device)
    if rank == 0:
        result["all_to_all_bus_gbps"] = round(gbps, 1)
        with open(out_file, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ranks = torch.cuda.device_count()
    if ranks < 2:
        sys.exit("needs at least 2 CUDA GPUs")
    out_file = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"expert_parallel_{os.getpid()}.json")
    mp.spawn(rank_main, args=(ranks, f"tcp://127.0.0.1:{free_port()}", out_file), nprocs=ranks)
    with open(out_file) as f:
        result = json.load(f)
    for row in result["rows"]:
        print(row)
    print(json.dumps({"benchmark": "expert_parallel_gpu", "device": torch.cuda.get_device_name(), **result}))


if __name__ == "__main__":
    main()
