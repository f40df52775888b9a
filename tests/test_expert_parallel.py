"""Expert parallelism with 2 and 4 processes equals the single-process MoE layer: under gloo on the CPU,
and under NCCL with one GPU per rank where the machine has the GPUs."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grpo.models.moe import MoeLayer, Routing
from grpo.parallel.expert_parallel import experts_per_rank, shard_experts

TOKENS_PER_RANK, HIDDEN = 6, 16


def _layer(fp8: bool = False) -> MoeLayer:
    torch.manual_seed(0)
    routing = Routing(num_experts=8, top_k=2, n_group=2, topk_group=1, routed_scaling_factor=2.0)
    shared = torch.nn.Linear(HIDDEN, HIDDEN)
    layer = MoeLayer(HIDDEN, 8, routing, shared_experts=shared)
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.3)
    layer.experts.fp8 = fp8  # the switch `fp8.convert_to_fp8` sets unless `fp8_exclude` names the experts
    return layer


def _inputs(ranks: int, device):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(ranks * TOKENS_PER_RANK, HIDDEN, generator=generator)
    upstream = torch.randn(ranks * TOKENS_PER_RANK, HIDDEN, generator=generator)
    return x.to(device), upstream.to(device)


def _reference(ranks: int, device, fp8: bool):
    layer = _layer(fp8).to(device)
    x, upstream = _inputs(ranks, device)
    x.requires_grad_()
    out = layer(x)
    (out * upstream).sum().backward()
    return layer, x, out


def _rank_main(rank: int, ranks: int, init_file: str, backend: str, fp8: bool = False):
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=ranks)
    reference, x_ref, out_ref = _reference(ranks, device, fp8)
    layer = _layer(fp8).to(device)
    assert shard_experts(layer) == 1
    assert layer.experts.local.fp8 == fp8
    mine = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
    x, upstream = _inputs(ranks, device)
    x = x[mine].clone().requires_grad_()
    out = layer(x)
    (out * upstream[mine]).sum().backward()

    torch.testing.assert_close(out, out_ref[mine].detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad[mine], atol=1e-5, rtol=1e-5)
    held = slice(rank * 8 // ranks, (rank + 1) * 8 // ranks)
    experts = layer.experts.local
    torch.testing.assert_close(experts.gate_up_proj.grad, reference.experts.gate_up_proj.grad[held])
    torch.testing.assert_close(experts.down_proj.grad, reference.experts.down_proj.grad[held])
    # replicated parameters: their gradients summed over ranks (what data parallelism does) are the reference's
    for name in ("gate.weight", "shared_experts.weight", "shared_experts.bias"):
        grad = layer.get_parameter(name).grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, reference.get_parameter(name).grad, atol=1e-5, rtol=1e-5)
    gate_up, down = layer.experts.gathered()
    assert torch.equal(gate_up, reference.experts.gate_up_proj.detach())
    assert torch.equal(down, reference.experts.down_proj.detach())
    dist.barrier()
    # Leave without running gloo's C++ teardown: under CPU contention it aborted a rank at exit
    # ("terminate called without an active exception") after every assertion had passed.
    os._exit(0)


# FP8 experts too: each row's activation and output-gradient scales depend on that row alone, and an
# expert's rows reach its rank in the single process's order, so the weight gradient's 128-row
# tiles hold the same rows
@pytest.mark.parametrize("ranks, fp8", [(2, False), (4, False), (2, True)])
def test_sharded_experts_equal_the_single_process_layer(ranks, fp8, tmp_path):
    mp.spawn(_rank_main, args=(ranks, str(tmp_path / "init"), "gloo", fp8), nprocs=ranks)


@pytest.mark.gpu
@pytest.mark.parametrize("ranks", [2, 4])
def test_sharded_experts_equal_the_single_process_layer_under_nccl(ranks, tmp_path):
    """FP32 on the GPUs (TF32 off, torch's default for matmuls): the same tolerances as on the CPU."""
    if torch.cuda.device_count() < ranks:
        pytest.skip(f"needs {ranks} CUDA GPUs, found {torch.cuda.device_count()}")
    mp.spawn(_rank_main, args=(ranks, str(tmp_path / "init"), "nccl"), nprocs=ranks)


def test_experts_must_split_evenly_over_the_ranks():
    assert experts_per_rank(8, 4) == 2
    with pytest.raises(ValueError, match="8 experts do not split evenly over 3 expert-parallel ranks"):
        experts_per_rank(8, 3)
