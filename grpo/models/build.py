"""The one place a policy is assembled: load (or create) a checkpoint, then apply converters.

A converter is `fn(model) -> None` that swaps modules in place (e.g. `nn.Linear` -> an FP8 linear);
performance features plug in here without the trainer knowing about them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from grpo.config import RecipeError

TINY = "tiny:deepseek_v3"
Converter = Callable[[torch.nn.Module], None]


def materialize(path: str, scratch: Path, seed: int = 0, tiny_overrides: dict | None = None) -> str:
    """Return a Hugging Face folder for `path`, writing the tiny default into `scratch` if asked."""
    if path == TINY:
        from grpo.models.tiny import save_tiny_checkpoint

        return str(save_tiny_checkpoint(scratch, seed=seed, **(tiny_overrides or {})))
    if Path(path).exists():
        if not (Path(path) / "config.json").is_file():
            raise RecipeError(f"model.path: {path} has no config.json (not a Hugging Face folder)")
        return path
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)  # a hub id: resolves from the local cache or the hub
    except (OSError, ValueError) as error:
        raise RecipeError(
            f"model.path: {path} is neither a folder nor a loadable model id ({str(error).splitlines()[0][:120]})"
        ) from None
    return path


def load_policy(path: str, dtype: str, converters: Sequence[Converter] = ()) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    for convert in converters:
        convert(model)
    return model


def converters_for(model_config) -> list[Converter]:
    """The converters a recipe's `model` section asks for, in the order they apply."""
    converters: list[Converter] = []
    if model_config.moe == "grouped":
        from grpo.models.moe import convert_moe

        converters.append(convert_moe)
    if model_config.fp8:
        converters.append(functools.partial(_convert_to_fp8, exclude=tuple(model_config.fp8_exclude)))
    return converters


def _convert_to_fp8(model: torch.nn.Module, exclude: tuple[str, ...]) -> None:
    from grpo.models.fp8 import convert_to_fp8

    try:
        convert_to_fp8(model, exclude=exclude)
    except ValueError as error:
        raise RecipeError(f"model.fp8_exclude: {error}") from None


def check_converters(path: str, model_config) -> None:
    """Apply the recipe's converters to `path`'s model built on the meta device (no weights read),
    so that a converter's RecipeError stops a run before any worker starts."""
    if not model_config.fp8_exclude:  # the one converter input a recipe can get wrong
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    for convert in converters_for(model_config):
        convert(model)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
