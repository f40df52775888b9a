"""The one place a policy is assembled: load (or create) a checkpoint, then apply converters.

A converter is `fn(model) -> None` that swaps modules in place (e.g. `nn.Linear` -> an FP8 linear);
performance features plug in here without the trainer knowing about them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from grpo.config import RecipeError

TINY = "tiny:deepseek_v3"
Converter = Callable[[torch.nn.Module], None]


def materialize(
    path: str, scratch: Path, seed: int = 0, tiny_overrides: dict | None = None, key: str = "model.path"
) -> str:
    """Return a Hugging Face folder for `path`, writing into `scratch` the tiny default if asked, or
    the BF16 copy of an FP8 checkpoint (`fp8_dequantize`). Errors name `path` by `key`, the recipe
    key or option that gave it."""
    if path == TINY:
        from grpo.models.tiny import save_tiny_checkpoint

        return str(save_tiny_checkpoint(scratch, seed=seed, **(tiny_overrides or {})))
    if _fp8_folder(path, model_config(path, key=key), key):
        from grpo.models.fp8_dequantize import write_bf16_copy

        return str(write_bf16_copy(Path(path), scratch))
    return path


def _fp8_folder(path: str, config, key: str = "model.path") -> bool:
    """Whether `path` is a folder holding an FP8 checkpoint in DeepSeek-V3's format; a RecipeError
    for a quantized checkpoint a run cannot start from."""
    from grpo.models.fp8_dequantize import fp8_block_quantized

    if not fp8_block_quantized(getattr(config, "quantization_config", None), f"{key}: {path}"):
        return False
    if not Path(path).is_dir():
        raise RecipeError(
            f"{key}: {path} is an FP8 checkpoint on the Hub; download it "
            f"(hf download {path} --local-dir DIR) and give DIR, which a run copies in BF16"
        )
    return True


def model_config(path: str, tiny_overrides: dict | None = None, key: str = "model.path"):
    """`path`'s transformers config, read without writing anything (the tiny model's is built in
    memory); a RecipeError where `path` is neither a Hugging Face folder nor a loadable model id."""
    from transformers import AutoConfig

    if path == TINY:
        from grpo.models.tiny import build_tokenizer, tiny_deepseek_v3_config

        return tiny_deepseek_v3_config(len(build_tokenizer()), **(tiny_overrides or {}))
    if path.startswith("tiny:"):
        raise RecipeError(f"{key}: no built-in model {path}; the one built in is {TINY}")
    if Path(path).exists():
        if not (Path(path) / "config.json").is_file():
            # a run folder given for its model: grpo train's checkpoint, or grpo sft's
            inside = [Path(path) / sub for sub in ("checkpoints/final", "final")]
            hint = next((f"; the run's model is {c}" for c in inside if (c / "config.json").is_file()), "")
            raise RecipeError(f"{key}: {path} has no config.json (not a Hugging Face folder{hint})")
        try:
            return AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise RecipeError(f"{key}: {path}/config.json: {_first_line(error)}") from None
    if path.startswith(("/", "./", "../", "~")) or path.count("/") > 1:  # a hub id is NAME or ORG/NAME
        where = "" if Path(path).is_absolute() else f" (relative to {Path.cwd()})"
        raise RecipeError(f"{key}: no folder {path}{where}")
    try:
        return AutoConfig.from_pretrained(path)  # a hub id: resolves from the local cache or the hub
    except (OSError, ValueError) as error:
        raise RecipeError(
            f"{key}: {path} is neither a folder nor a loadable model id ({_first_line(error)[:120]})"
        ) from None


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


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


def check_model(model_section, expert_parallel_size: int = 1, lora=None):
    """Check what a recipe can get wrong about its model, so that a run stops before it writes
    anything or starts a worker: the path, the converters (applied to the model built on the meta
    device, no weights read), LoRA's targets (`train.lora`) and the routed experts' split over
    `expert_parallel_size` ranks. Returns the model's transformers config."""
    config = model_config(model_section.path, model_section.tiny_overrides)
    _fp8_folder(model_section.path, config)
    if not model_section.fp8_exclude and expert_parallel_size == 1 and lora is None:  # nothing else can fail
        return config
    from transformers import AutoModelForCausalLM

    from grpo.models.moe import moe_layers
    from grpo.parallel.expert_parallel import experts_per_rank

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for convert in converters_for(model_section):
        convert(model)
    if lora is not None:
        from grpo.models.lora import add_lora

        add_lora(model, lora)
    for layer in moe_layers(model):
        try:
            experts_per_rank(layer.experts.num_experts, expert_parallel_size)
        except ValueError as error:
            raise RecipeError(f"train.expert_parallel_size: {error}") from None
    return config


def load_tokenizer(path: str):
    """`path`'s tokenizer, read without writing anything: the tiny model's is built in memory, and a
    run's BF16 copy of an FP8 checkpoint carries its source's tokenizer files."""
    if path == TINY:
        from grpo.models.tiny import build_tokenizer

        return build_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def context_length(config, engine_kwargs: dict) -> int:
    """The most tokens one sequence may hold: the vLLM engines' `max_model_len` where they are given
    one, else the model's positions (no limit where the config names none)."""
    return int(engine_kwargs.get("max_model_len") or getattr(config, "max_position_embeddings", 1 << 30))


def check_max_model_len(config, engine_kwargs: dict, key: str) -> None:
    """A RecipeError, named by `key`, for a `max_model_len` past the model's positions: vLLM refuses
    it as its engine starts, with a traceback from inside the engine after the run folder is written.
    Checked only where vLLM's limit is plain: `max_position_embeddings` with no RoPE scaling factor
    (which vLLM multiplies in for some RoPE types) and no `model_max_length` in the config (which it
    lets override); `VLLM_ALLOW_LONG_MAX_MODEL_LEN` lifts the limit, as in vLLM."""
    asked, positions = engine_kwargs.get("max_model_len"), getattr(config, "max_position_embeddings", None)
    if not isinstance(asked, int) or not isinstance(positions, int) or asked <= positions:
        return
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    scalings = [rope, *(value for value in rope.values() if isinstance(value, dict))]
    if any("factor" in scaling for scaling in scalings) or getattr(config, "model_max_length", None):
        return
    if os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0").lower() not in ("0", "false", ""):
        return
    raise RecipeError(
        f"{key}: {asked} is more than the model's {positions} positions (max_position_embeddings), "
        "which vLLM refuses; give at most that"
    )
