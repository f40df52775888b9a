"""The one place a policy is assembled: load (or create) a checkpoint, then apply converters.

A converter is `fn(model) -> None` that swaps modules in place (e.g. `nn.Linear` -> an FP8 linear);
performance features plug in here without the trainer knowing about them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from grpo.config import RecipeError

TINY = "tiny:deepseek_v3"
Converter = Callable[[torch.nn.Module], None]


def materialize(path: str, scratch: Path, seed: int = 0) -> str:
    """Return a Hugging Face folder for `path`, writing the tiny default into `scratch` if asked."""
    if path == TINY:
        from grpo.models.tiny import save_tiny_checkpoint

        return str(save_tiny_checkpoint(scratch, seed=seed))
    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise RecipeError(f"model.path: {path} has no config.json (not a Hugging Face folder)")
    return path


def load_policy(path: str, dtype: str, converters: Sequence[Converter] = ()) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    for convert in converters:
        convert(model)
    return model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
