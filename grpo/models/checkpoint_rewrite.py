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

State = dict[str, torch.Tensor]
INDEX = "model.safetensors.index.json"


def shards(folder: Path) -> list[Path]:
    """The checkpoint's weight files: those its index names where it has one (as transformers and
    vLLM read it; a stale file beside them is not part of it), else every `*.safetensors`."""
    index = folder / INDEX
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(folder.glob("*.safetensors"))


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
