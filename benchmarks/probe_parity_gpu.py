"""Which piece moves a policy's logprobs on the GPU: the project's layers one at a time against plain
transformers, and vLLM against transformers, on the H100 recipe's model shape.

The model is the recipe's randomly initialised DeepSeek-V3 with its output head scaled up, so that
next-token distributions are peaked and a wrong hidden state shows as a large logprob change.
Prints one line per comparison (max and mean absolute logprob difference per token) and, last, one
JSON line.

    python benchmarks/probe_parity_gpu.py [--no-vllm]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from grpo.config import load_recipe
from grpo.models.build import TINY, load_policy, materialize
from grpo.models.fp8 import Fp8LinearFunction, convert_to_fp8
from grpo.models.moe import convert_moe, grouped_linear
from grpo.trainer.policy_trainer import pack, token_logprobs


def logprobs(model, ids: list[int]) -> torch.Tensor:
    packed = pack([ids[:1]], [ids[1:]], 0).to("cuda")
    with torch.no_grad():
        return token_logprobs(model.to("cuda"), packed)[0][0].float().cpu()


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"max": round(float((a - b).abs().max()), 5), "mean": round(float((a - b).abs().mean()), 5)}


# (in, out) of every linear layer of the H100 recipe's model
LAYER_SHAPES = [
    (1024, 1536),
    (512, 1536),
    (1024, 576),
    (512, 2048),
    (1024, 1024),
    (1024, 2816),
    (2816, 1024),
    (512, 1024),
    (1024, 512),
]


def kernel_checks() -> dict:
    """FP8 linear (each layer shape, 48 tokens; and 37 tokens, off any alignment) and grouped GEMM on
    CUDA against FP32 matmuls: relative errors."""
    torch.manual_seed(0)
    rel = lambda a, b: round(float((a - b).norm() / b.norm()), 5)  # noqa: E731
    checks = {}
    for tokens, (fan_in, fan_out) in [(48, shape) for shape in LAYER_SHAPES] + [(37, (1024, 512))]:
        x = torch.randn(tokens, fan_in, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(fan_out, fan_in, device="cuda", dtype=torch.bfloat16) * 0.02
        fp8 = Fp8LinearFunction.apply(x, w, False).float()
        checks[f"fp8_linear_{tokens}x{fan_in}->{fan_out}"] = rel(fp8, x.float() @ w.float().t())
    x = torch.randn(37, 1024, device="cuda", dtype=torch.bfloat16)
    w3 = torch.randn(4, 512, 1024, device="cuda", dtype=torch.bfloat16) * 0.02
    counts = torch.tensor([10, 0, 20, 7], device="cuda")
    grouped = grouped_linear(x, w3, counts.cumsum(0).to(torch.int32), fp8=False).float().cpu()
    starts = [0, 10, 10, 30]
    loop = torch.cat(
        [x[s : s + c].float() @ w3[e].float().t() for e, (s, c) in enumerate(zip(starts, counts.tolist()))]
    )
    checks["grouped_mm_vs_loop"] = rel(grouped, loop.cpu())
    return checks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-vllm", action="store_true")
    args = parser.parse_args()
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "arithmetic_sft_h100.yaml")
    scratch = Path(tempfile.mkdtemp())
    path = materialize(TINY, scratch / "init", 0, recipe.model.tiny_overrides)
    model = load_policy(path, "float32")
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path)
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (48,)).tolist()

    results = {"kernels": kernel_checks()}
    print(results["kernels"])
    reference = logprobs(load_policy(path, "float32"), ids)
    print("reference entropy proxy: mean -logp", float(-reference.mean()))
    variants = {
        "transformers_bf16": lambda: load_policy(path, "bfloat16"),
        "grouped_moe_bf16": lambda: load_policy(path, "bfloat16", [convert_moe]),
        "grouped_moe_fp32": lambda: load_policy(path, "float32", [convert_moe]),
        "fp8_dense_only_bf16": lambda: load_policy(path, "bfloat16", [convert_to_fp8]),
        "fp8_moe_and_dense_bf16": lambda: load_policy(path, "bfloat16", [convert_moe, convert_to_fp8]),
    }
    for name, build in variants.items():
        results[name] = diff(logprobs(build(), ids), reference)
        print(name, results[name])
        torch.cuda.empty_cache()
    if not args.no_vllm:
        from grpo.rollout.vllm_engine import VllmEngine

        for dtype in ("bfloat16", "float32"):
            try:
                engine = VllmEngine(path, dtype, 0, {"max_model_len": 256, "gpu_memory_utilization": 0.3})
                results[f"vllm_{dtype}"] = diff(torch.tensor(engine.sequence_logprobs([ids])[0]), reference)
                del engine
            except Exception as error:  # a dtype the GPU kernels refuse is a finding, not a crash
                results[f"vllm_{dtype}"] = f"{type(error).__name__}: {str(error)[:200]}"
            print(f"vllm_{dtype}", results[f"vllm_{dtype}"])
            break  # one engine per process: vLLM does not free the card for a second one reliably
    print(json.dumps(results))


if __name__ == "__main__":
    main()
