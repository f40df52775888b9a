"""Resolve reward names from recipes: a registry name, `pkg.module:fn`, or `path/to/file.py:fn`."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from grpo.rewards.format import has_boxed, overlong_penalty, think_format
from grpo.rewards.lean import lean_proof
from grpo.rewards.math import boxed_math, math_answer

RewardFn = Callable[[str, Mapping[str, Any]], "float | None"]

REGISTRY: dict[str, RewardFn] = {
    "math": math_answer,
    "math_boxed": boxed_math,
    "lean": lean_proof,
    "think_format": think_format,
    "has_boxed": has_boxed,
    "overlong": overlong_penalty,
}


def resolve(spec: str) -> RewardFn:
    """Find a reward function; raises ValueError naming the spec if it cannot be found."""
    if spec in REGISTRY:
        return REGISTRY[spec]
    if ":" not in spec:
        known = ", ".join(sorted(REGISTRY))
        raise ValueError(f"unknown reward {spec!r}: use one of {known}, pkg.module:fn or file.py:fn")
    location, _, name = spec.rpartition(":")
    if location.endswith(".py") and not Path(location).is_file():
        raise ValueError(f"reward file not found: {location}")
    try:
        module = _import(location)
    except Exception as error:  # noqa: BLE001 - the user's module may raise anything while it loads
        raise ValueError(
            f"cannot import reward module {location!r}: {type(error).__name__}: {error}"
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {location} has no function {name!r}")
    return fn


_FILE_MODULES: dict[Path, Any] = {}
"""Reward files already run in this process, by resolved path: like `import`, a file is run once
however often it is resolved (a recipe's check, then the runtime's; two rewards from one file)."""


def _import(location: str):
    if not location.endswith(".py"):
        return importlib.import_module(location)
    path = Path(location).resolve()
    if path not in _FILE_MODULES:
        module_spec = importlib.util.spec_from_file_location(f"grpo_user_reward_{path.stem}", path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        _FILE_MODULES[path] = module
    return _FILE_MODULES[path]
