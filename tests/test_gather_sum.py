"""`moe.gather_sum`, the sum of each token's K expert rows: the Triton kernel against the PyTorch
ops, on small integers (every sum exact, so the two agree bit for bit whatever their order).

The kernel runs in Triton's CPU interpreter (a subprocess with TRITON_INTERPRET=1): 5 tokens of K = 3
rows each out of 17, 1100 columns (a second, partial column block), the rows read from a wider
tensor's view.
"""

import pytest
import torch
from triton_interpreter import run_in_triton_interpreter


def _inputs(device: str, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    wider = torch.randint(-8, 9, (17, 1104), generator=generator).to(dtype)
    index = torch.randperm(17, generator=generator)[:15].view(5, 3).to(torch.int64)
    return wider[:, :1100].to(device), index.to(device)


def _by_pytorch(src, index):
    return src.index_select(0, index.flatten()).view(*index.shape, src.shape[1]).sum(1)


def check_the_kernel() -> None:
    from grpo.models.gather_sum_triton import gather_sum_rows

    src, index = _inputs("cpu", torch.float32)
    got = gather_sum_rows(src, index)
    assert got.shape == (5, 1100)
    assert torch.equal(got, _by_pytorch(src, index))
    assert gather_sum_rows(src, index[:0]).shape == (0, 1100)


def test_the_gather_sum_kernel_in_the_triton_interpreter():
    run_in_triton_interpreter(__file__)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gather_sum_on_the_gpu():
    from grpo.models.moe import gather_sum

    src, index = _inputs("cuda", torch.bfloat16)
    assert torch.equal(gather_sum(src, index).cpu(), _by_pytorch(src.cpu(), index.cpu()))


if __name__ == "__main__":
    check_the_kernel()
