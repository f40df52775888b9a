"""vLLM loads `grpo export-fp8`'s DeepSeek-V3-format checkpoint on a GPU and computes what its weights say.

A ~0.4 B DeepSeek-V3 (the H100 recipe's architecture: MLA, 8 layers, 32 routed experts top-4 + 1
shared) is initialised at random, its output head scaled up so that next-token distributions are
far from uniform (a misread weight scale then shows), saved, and exported to FP8 (e4m3 weights,
128 x 128 block scales; the 576-row MLA projection stays BF16 and is listed in `ignored_layers`).
Both folders are loaded in vLLM (the BF16 one as is, the FP8 one through vLLM's block-wise FP8
path), and the log-probability of every token of fixed random sequences is read from each
(`prompt_logprobs`), and from transformers on the BF16 folder. `--keep PART` exports with
`grpo export-fp8 --keep PART` (more weights in BF16, listed in `ignored_layers`).

Printed: per-token logprob differences (mean absolute, max) and correlations between vLLM FP8,
vLLM BF16 and transformers BF16; FP8's effect should be small next to the spread of the logprobs
themselves and correlate near 1. Last line: one JSON object.

    python benchmarks/fp8_export_vllm_gpu.py [--workdir DIR] [--keep self_attn]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

H100_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "arithmetic_sft_h100.yaml"
SEQUENCES, LENGTH, HEAD_SCALE = 32, 96, 30.0


def build_checkpoint(path: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from grpo.config import load_recipe
    from grpo.models.tiny import build_tokenizer, tiny_deepseek_v3_config

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    sizes = load_recipe(H100_RECIPE).model.tiny_overrides
    model = AutoModelForCausalLM.from_config(
        tiny_deepseek_v3_config(len(tokenizer), **sizes), dtype=torch.bfloat16
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def vllm_logprobs(path: Path, sequences: list[list[int]]) -> tuple[list[float], float]:
    """Logprob of every token after the first, and the engine's load time in seconds."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(
        model=str(path),
        dtype="bfloat16",
        enforce_eager=True,
        gpu_memory_utilization=0.25,
        max_model_len=LENGTH + 8,
        seed=0,
    )
    load_s = time.perf_counter() - start
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in sequences],
        SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0),
        use_tqdm=False,
    )
    values = []
    for ids, output in zip(sequences, outputs):
        for token, entry in zip(ids[1:], output.prompt_logprobs[1:]):
            values.append(entry[token].logprob)
    del llm
    return values, load_s


def transformers_logprobs(path: Path, sequences: list[list[int]]) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    ids = torch.tensor(sequences, device="cuda")
    with torch.no_grad():
        logp = model(ids).logits.float().log_softmax(-1)[:, :-1]
    values = logp.gather(2, ids[:, 1:, None]).squeeze(-1).flatten().tolist()
    del model
    torch.cuda.empty_cache()
    return values


def compare(a: list[float], b: list[float]) -> dict:
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return {
        "mean_abs_diff": round((x - y).abs().mean().item(), 5),
        "max_abs_diff": round((x - y).abs().max().item(), 5),
        "correlation": round(torch.corrcoef(torch.stack([x, y]))[0, 1].item(), 6),
    }


def main() -> None:
    from grpo.models.fp8_export import export_fp8

    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="append", default=[], help="as `grpo export-fp8 --keep`")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fp8_export_vllm_"))
    src = build_checkpoint(work / "bf16")
    counts = export_fp8(src, work / "fp8", args.keep)
    config = json.loads((work / "fp8" / "config.json").read_text())
    generator = torch.Generator().manual_seed(1)
    vocab = config["vocab_size"]
    sequences = torch.randint(3, vocab, (SEQUENCES, LENGTH), generator=generator).tolist()

    reference = transformers_logprobs(src, sequences)
    fp8, fp8_load_s = vllm_logprobs(work / "fp8", sequences)
    print("vllm_fp8_vs_transformers_bf16", compare(fp8, reference), flush=True)
    bf16, bf16_load_s = vllm_logprobs(src, sequences)
    spread = torch.tensor(reference).std().item()
    result = {
        "benchmark": "fp8_export_vllm_gpu",
        "device": torch.cuda.get_device_name(),
        "kept": args.keep,
        "tensors": counts,
        "ignored_layers": len(config["quantization_config"]["ignored_layers"]),
        "tokens_compared": len(reference),
        "logprob_std": round(spread, 4),
        "load_s": {"vllm_bf16": round(bf16_load_s, 1), "vllm_fp8": round(fp8_load_s, 1)},
        "vllm_bf16_vs_transformers_bf16": compare(bf16, reference),
        "vllm_fp8_vs_vllm_bf16": compare(fp8, bf16),
        "vllm_fp8_vs_transformers_bf16": compare(fp8, reference),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
