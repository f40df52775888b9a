"""Can an engine open a CUDA IPC handle to weights on a GPU that Ray gave another actor?

Ray hides every other card from an actor (CUDA_VISIBLE_DEVICES). This probe publishes a tensor
through `SharedWeightsWriter` in GPU memory in a process that sees only card 1, then opens the
handle in a process that sees only card 0, as a non-colocated engine would (and, as the control,
in one that sees card 1). The weight sync does not rely on it: it keeps its buffer in host memory
unless trainer and engines share the card (`rollout.colocate`), since the open needs peer access
between the cards. Needs 2 GPUs. Last line: one JSON object.

    python benchmarks/probe_cross_gpu_ipc.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

READER = """
import json, sys, torch
from grpo.rollout.weight_sync import Manifest, read_manifest
fields = json.loads(sys.stdin.read())
fields["cuda_ipc"] = bytes.fromhex(fields["cuda_ipc"])
fields["entries"] = tuple((n, tuple(s), d, o) for n, s, d, o in fields["entries"])
try:
    w = dict(read_manifest(Manifest(**fields)))["w"]
    print(json.dumps({"opened": True, "equal": bool(torch.equal(w.cpu(), torch.arange(8.0)))}))
except Exception as error:
    print(json.dumps({"opened": False, "error": f"{type(error).__name__}: {error}"[:300]}))
"""


def _last_line(args: list[str], env: dict, stdin: str = "") -> str:
    """The child's last line of output (one JSON object), or its stderr's tail as one."""
    done = subprocess.run(args, input=stdin, env=env, capture_output=True, text=True, check=False)
    out = done.stdout.strip()
    return out.splitlines()[-1] if out else json.dumps({"stderr": done.stderr[-300:]})


def _write_and_read() -> None:
    """Writer role: publish in GPU memory, then have a reader on READER_CARD open the handle."""
    import torch

    from grpo.rollout.weight_sync import SharedWeightsWriter

    writer = SharedWeightsWriter(tag="probe-ipc", same_card=True)
    manifest = dataclasses.asdict(writer.publish([("w", torch.arange(8.0, device="cuda"))]))
    manifest["cuda_ipc"] = manifest["cuda_ipc"].hex()
    reader_env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ["READER_CARD"]}
    print(_last_line([sys.executable, "-c", READER], reader_env, json.dumps(manifest)))


def main() -> None:
    if os.environ.get("PROBE_ROLE") == "writer":
        _write_and_read()
        return
    results = {}
    for reader_card in ("1", "0"):  # the writer's own card first (the colocated case), then another
        env = {**os.environ, "PROBE_ROLE": "writer", "CUDA_VISIBLE_DEVICES": "1", "READER_CARD": reader_card}
        name = "same_card" if reader_card == "1" else "other_card"
        results[name] = json.loads(_last_line([sys.executable, __file__], env))
    print(json.dumps({"probe": "cross_gpu_ipc", **results}))


if __name__ == "__main__":
    main()
