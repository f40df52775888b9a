"""A Hugging Face checkpoint folder written out again with its tensors converted (FP8 export and
its reverse), shard by shard, so that no more than one shard is in memory at a time."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from grpo.config import RecipeError

State = dict[str, torch.Tensor]
INDEX = "model.safetensors.index.json"


def shards(folder: Path) -> list[Path]:
    """The checkpoint's weight files: those its index names where it has one (as transformers and
    vLLM read it; a stale file beside them is not part of it), else every `*.safetensors`."""
    index = folder / INDEX
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(folder.glob("*.safetensors"))


def header(shard: Path) -> dict:
    """A safetensors file's header, read without its tensors: its length in 8 bytes, then JSON
    naming each tensor's dtype, shape and byte range (and `__metadata__`); a RecipeError for a file
    that is not one."""
    try:
        with shard.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length > shard.stat().st_size:
                raise ValueError(f"a header of {length} bytes")
            entries = json.loads(f.read(length))
            if not isinstance(entries, dict):
                raise ValueError("its header is not a JSON object")
            return entries
    except OSError as error:
        raise RecipeError(f"cannot read {shard} ({error.strerror or error})") from None
    except ValueError as error:  # JSON's and UTF-8's errors are ValueErrors too
        raise RecipeError(f"{shard} is not a safetensors file ({error})") from None


def check_room(dst: Path, needed: int, what: str) -> None:
    """A RecipeError where the disk that `dst` goes on has less room than the `needed` bytes of
    `what` (what `dst` holds now counts as room: it is replaced), so that a large checkpoint's
    rewrite does not fail part way through."""
    held = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file()) if dst.is_dir() else 0
    existing = next(folder for folder in (dst, *dst.parents) if folder.exists())
    room = shutil.disk_usage(existing).free + held
    if needed > room:
        raise RecipeError(
            f"{dst}: {what} needs {needed / 1e9:.1f} GB, and its disk has {room / 1e9:.1f} GB free; "
            "free space there or choose a folder on a larger disk"
        )


def rewrite_checkpoint(src: Path, dst: Path, convert: Callable[[State], State], config: dict) -> Counter:
    """Write the checkpoint folder `src` into `dst` (absent or an empty folder) with every shard's
    tensors passed through `convert` and `config` as its config.json; the other files (tokenizer,
    generation config) travel unchanged. Returns how many tensors of each dtype were written.

    It is written beside `dst` and renamed into place at the end, so a failure leaves no half
    checkpoint behind."""
    from safetensors.torch import load_file, save_file

    draft = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(draft, ignore_errors=True)  # left by a killed run of an earlier process of this id
    draft.mkdir(parents=True)
    try:
        files = shards(src)
        counts, index = Counter(), {}
        for shard in files:
            state = convert(load_file(str(shard)))
            counts.update(tensor.dtype for tensor in state.values())
            save_file(state, str(draft / shard.name), metadata={"format": "pt"})
            index.update({name: shard.name for name in state})
        if len(files) > 1:
            (draft / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=2))
        (draft / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for extra in src.iterdir():
            if (
                extra.is_file()
                and extra.suffix != ".safetensors"
                and extra.name not in ("config.json", INDEX)
            ):
                shutil.copy2(extra, draft / extra.name)
        if dst.exists():
            dst.rmdir()  # empty, as the callers check
        draft.rename(dst)
    except BaseException:
        shutil.rmtree(draft, ignore_errors=True)
        raise
    return counts
