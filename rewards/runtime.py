"""Runs reward functions in isolated worker processes with a hard wall-clock timeout per call.

Why processes: a reward is user code or sympy, and either can hang for hours (`9^{9^{9^{9}}}`) or
crash the interpreter. A call that outlives `timeout_s` has its worker killed (SIGKILL) and replaced;
a call that raises is recorded as `error` with its message. Training never sees an exception from a
reward, only a value (0.0 for error/timeout) and a status per component:

A reward returns a float, None, or `(float, note)`; the note is kept as the component's message
(the Lean reward says why a proof was rejected).

- `ok`: returned a value > 0;   `wrong`: returned a value <= 0;
- `n/a`: returned None (not applicable: left out of the weighted total);
- `error`: raised, or its worker died;   `timeout`: killed after `timeout_s`.

A call's time counts from when its worker is ready: a fresh worker (a new interpreter importing sympy
or the user's module, seconds on a loaded machine) first reports that it has loaded its rewards, so
its start-up is never charged to the first call it gets.

Identical (reward, completion, sample) calls within one `score` are run once.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import multiprocessing as mp
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

STATUS_ORDER = ("ok", "n/a", "wrong", "error", "timeout")  # worst last; a total takes its worst part
READY = "ready"
STARTUP_S = 120.0  # a worker that has not loaded its rewards by then gets its call anyway (and its timeout)


@dataclass(frozen=True)
class RewardEntry:
    name: str
    """Shown in metrics (`reward/<name>/mean`)."""
    spec: str
    """For `registry.resolve`: a registry name, `pkg.module:fn` or `file.py:fn`."""
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)


@dataclass
class Outcome:
    value: float | None
    status: str
    message: str = ""
    seconds: float = 0.0


@dataclass
class Scored:
    """One completion's weighted total and its components, keyed by reward name."""

    reward: float
    status: str
    components: dict[str, Outcome] = field(default_factory=dict)

    def components_record(self) -> dict[str, dict]:
        """The components as written in a JSON record: value, status and message per reward."""
        return {
            name: {"value": o.value, "status": o.status, "message": o.message}
            for name, o in self.components.items()
        }


def _serve(specs: list[tuple[str, dict]], conn: Connection) -> None:
    """Worker loop: resolve the rewards once, then answer `(index, completion, sample)` requests."""
    from functools import partial

    # Ctrl-C reaches the whole process group; the parent ends the workers (closing their pipes), so
    # each need not print a traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from grpo.rewards.registry import resolve

    functions = [partial(resolve(spec), **kwargs) for spec, kwargs in specs]
    conn.send(READY)
    while True:
        try:
            index, completion, sample = conn.recv()
        except EOFError:
            return
        try:
            value, note = functions[index](completion, sample), ""
            if isinstance(value, tuple):
                value, note = value
            value = None if value is None else _finite(value)
            status = "n/a" if value is None else "ok" if value > 0 else "wrong"
            reply = (value, status, str(note)[:500])
        except Exception as error:  # noqa: BLE001 - user code: every failure becomes a status
            reply = (None, "error", f"{type(error).__name__}: {error}"[:500])
        conn.send(reply)


def _finite(value) -> float:
    """A reward's value as a float; NaN or infinity would turn its whole group's advantages to NaN,
    and a string that happens to parse is a bug in the reward, so each is an error instead."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"returned {value[:40]!r}, not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"returned {number}, not a finite number")
    return number


class _Worker:
    def __init__(self, context, specs: list[tuple[str, dict]]):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(specs, child), daemon=True)
        self.process.start()
        child.close()
        self.job: int | None = None
        self.started = 0.0
        self.ready = False

    def wait_ready(self) -> None:
        """Block until the worker has loaded its rewards (at most STARTUP_S)."""
        if not self.ready and self.conn.poll(STARTUP_S):
            # EOF: it died while starting, and the call it gets next records that
            with contextlib.suppress(EOFError):
                self.conn.recv()
        self.ready = True

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


def _check_signature(entry: RewardEntry, signature: inspect.Signature) -> None:
    """A ValueError unless a reward can be called as `fn(completion, sample, **entry.kwargs)`."""
    kinds = [parameter.kind for parameter in signature.parameters.values()]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if sum(kind in positional for kind in kinds) < 2 and inspect.Parameter.VAR_POSITIONAL not in kinds:
        raise ValueError(
            f"reward {entry.spec}: its signature is {signature}; "
            "a reward is called as fn(completion, sample, **kwargs)"
        )
    try:
        signature.bind("", {}, **entry.kwargs)
    except TypeError as error:
        takes = ", ".join(list(signature.parameters)[2:]) or "none"
        raise ValueError(
            f"reward {entry.spec}: kwargs {entry.kwargs}: {error} (its keyword arguments: {takes})"
        ) from None


def check_rewards(rewards: Sequence[RewardEntry]) -> list[Callable]:
    """The rewards' functions; a ValueError naming the first reward that does not resolve, does not
    take its `kwargs` (a typo there would make every call an error, so the run would train on no
    reward), or cannot run here (its `setup_problem`, say a missing Lean toolchain)."""
    from grpo.rewards.registry import resolve

    functions = []
    for entry in rewards:
        fn = resolve(entry.spec)
        try:
            signature = inspect.signature(fn)
        except ValueError:  # a callable whose signature Python cannot read; its calls will tell
            signature = None
        if signature is not None:
            _check_signature(entry, signature)
        problem = getattr(fn, "setup_problem", lambda: None)()
        if problem:
            raise ValueError(f"reward {entry.spec}: {problem}")
        functions.append(fn)
    return functions


class RewardRuntime:
    """`score(completions, samples)` -> one `Scored` per completion. Use as a context manager."""

    def __init__(
        self,
        rewards: Sequence[RewardEntry],
        workers: int = 2,
        timeout_s: float = 10.0,
    ):
        """`rewards`: what to run, each named as it appears in the metrics."""
        check_rewards(rewards)  # in the caller's process, with the spec in the message
        self.names = [entry.name for entry in rewards]
        self.specs = [(entry.spec, entry.kwargs) for entry in rewards]
        self.weights = [entry.weight for entry in rewards]
        self.timeout_s = timeout_s
        self._context = mp.get_context("spawn")
        self._workers = [_Worker(self._context, self.specs) for _ in range(workers)]

    def __enter__(self) -> RewardRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            worker.kill()
        self._workers = []

    def score(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> list[Scored]:
        assert len(completions) == len(samples)
        keys: list[list[tuple[int, str, str]]] = []
        jobs: dict[tuple[int, str, str], tuple[int, str, dict]] = {}
        for completion, sample in zip(completions, samples):
            sample_key = json.dumps(sample, sort_keys=True, default=str)
            row = []
            for index in range(len(self.specs)):
                key = (index, completion, sample_key)
                jobs.setdefault(key, (index, completion, dict(sample)))
                row.append(key)
            keys.append(row)
        outcomes = self._run(list(jobs.values()))
        by_key = dict(zip(jobs, outcomes))
        return [self._combine([by_key[key] for key in row]) for row in keys]

    def _combine(self, parts: list[Outcome]) -> Scored:
        total = sum((w * o.value for w, o in zip(self.weights, parts) if o.value is not None), 0.0)
        status = max((o.status for o in parts), key=STATUS_ORDER.index, default="n/a")
        return Scored(reward=total, status=status, components=dict(zip(self.names, parts)))

    def _run(self, jobs: list[tuple[int, str, dict]]) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))[::-1]
        while pending or any(w.job is not None for w in self._workers):
            for worker in self._workers:
                if worker.job is None and pending:
                    worker.wait_ready()
                    worker.job = pending.pop()
                    worker.started = time.monotonic()
                    # a pipe broken by a worker that died while starting reads EOF below
                    with contextlib.suppress(BrokenPipeError):
                        worker.conn.send(jobs[worker.job])
            busy = [w for w in self._workers if w.job is not None]
            wait_s = max(0.0, min(w.started for w in busy) + self.timeout_s - time.monotonic())
            ready = wait([w.conn for w in busy], timeout=wait_s)
            for worker in busy:
                job = worker.job
                assert job is not None
                if worker.conn in ready:
                    try:
                        value, status, message = worker.conn.recv()
                        results[job] = Outcome(value, status, message, time.monotonic() - worker.started)
                        worker.job = None
                        continue
                    except EOFError:
                        outcome = Outcome(None, "error", "reward worker died")
                elif time.monotonic() >= worker.started + self.timeout_s:
                    outcome = Outcome(None, "timeout", f"killed after {self.timeout_s:g} s")
                else:
                    continue
                worker.kill()  # the call's time includes the kill
                outcome.seconds = time.monotonic() - worker.started
                results[job] = outcome
                self._workers[self._workers.index(worker)] = _Worker(self._context, self.specs)
        outcomes = [r for r in results if r is not None]
        assert len(outcomes) == len(jobs), "every job ends with an outcome"
        return outcomes
