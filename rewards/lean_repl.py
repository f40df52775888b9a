"""Lean verifier backends: a local pool of Lean REPL processes, and a Kimina Lean Server client.

Both take `(header, code)` and return the REPL's JSON reply (`messages`, `sorries`, `env`), so the
judging in `lean_checks.verdict_from_repl` is shared.

Local pool: each process runs the community REPL (github.com/leanprover-community/repl) inside the
user's Mathlib project (`lake env <repl>`), so `import Mathlib` resolves. A header (imports, options,
opens) is elaborated once per process and reused through the REPL's environment id. Each check has a
wall-clock timeout and each process an address-space limit; a process that times out, crashes or
answers garbage is killed and restarted.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import select
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


class VerifierTimeout(Exception):
    pass


class VerifierCrash(Exception):
    pass


class ReplProcess:
    def __init__(self, command: list[str], cwd: str | None, memory_mb: int):
        limit = memory_mb * 1024 * 1024

        def limit_memory():  # runs in the child before exec
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            preexec_fn=limit_memory if memory_mb else None,
        )
        self.header_envs: dict[str, int] = {}

    def send(self, command: dict, timeout_s: float) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write((json.dumps(command) + "\n\n").encode())
            self.process.stdin.flush()
        except BrokenPipeError:
            raise VerifierCrash("the REPL process exited") from None
        deadline, buffer, fd = time.monotonic() + timeout_s, b"", self.process.stdout.fileno()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VerifierTimeout(f"no answer within {timeout_s:g} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise VerifierCrash(f"the REPL process exited (code {self.process.poll()})")
            buffer += chunk
            if buffer.rstrip(b" \r\n") and buffer.endswith(b"\n\n"):
                try:
                    return json.loads(buffer)
                except json.JSONDecodeError:
                    continue  # a blank line inside a message: keep reading

    def check(self, header: str, code: str, timeout_s: float) -> dict:
        if header not in self.header_envs:
            reply = self.send(
                {"cmd": header}, timeout_s=max(timeout_s, 600.0)
            )  # first import of Mathlib is slow
            if "env" not in reply:
                raise VerifierCrash(f"header did not elaborate: {json.dumps(reply)[:300]}")
            self.header_envs[header] = reply["env"]
        return self.send({"cmd": code, "env": self.header_envs[header]}, timeout_s)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


class ReplPool:
    """Thread-safe pool of REPL processes; `check` blocks until one is free."""

    def __init__(self, command: list[str], cwd: str | None = None, size: int = 1, memory_mb: int = 8192):
        self.command, self.cwd, self.memory_mb = command, cwd, memory_mb
        self._idle: queue.Queue[ReplProcess] = queue.Queue()
        for _ in range(size):
            self._idle.put(ReplProcess(command, cwd, memory_mb))

    @classmethod
    def for_project(cls, project: str, repl: str, size: int = 1, memory_mb: int = 8192) -> ReplPool:
        return cls(["lake", "env", str(Path(repl).resolve())], cwd=project, size=size, memory_mb=memory_mb)

    def check(self, header: str, code: str, timeout_s: float) -> dict:
        process = self._idle.get()
        try:
            reply = process.check(header, code, timeout_s)
        except (VerifierTimeout, VerifierCrash):
            process.kill()
            process = ReplProcess(self.command, self.cwd, self.memory_mb)
            raise
        finally:
            self._idle.put(process)
        if "messages" not in reply and "message" in reply:
            raise VerifierCrash(f"REPL error: {reply['message'][:300]}")
        return reply

    def close(self) -> None:
        while not self._idle.empty():
            self._idle.get().kill()


class KiminaClient:
    """Client of a Kimina Lean Server (`POST /verify`), which runs REPLs behind an HTTP API."""

    def __init__(self, url: str, api_key: str | None = None):
        self.url = url.rstrip("/") + "/verify"
        self.api_key = api_key

    def check(self, header: str, code: str, timeout_s: float) -> dict:
        body = {
            "codes": [{"custom_id": "0", "proof": header + code}],
            "infotree_type": None,
            "timeout": int(timeout_s),
        }
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s + 30) as response:
                answer = json.loads(response.read())
        except TimeoutError:
            raise VerifierTimeout(f"Kimina server gave no answer within {timeout_s + 30:g} s") from None
        except (urllib.error.URLError, json.JSONDecodeError) as error:
            raise VerifierCrash(f"Kimina server: {error}") from None
        result = answer["results"][0]
        if result.get("error"):
            if "timed out" in str(result["error"]).lower() or "timeout" in str(result["error"]).lower():
                raise VerifierTimeout(str(result["error"])[:300])
            raise VerifierCrash(str(result["error"])[:300])
        return result["response"]
