import sys
import time
from pathlib import Path

import pytest
from grpo.rewards.lean_repl import ReplPool, VerifierCrash, VerifierTimeout

FAKE = [sys.executable, str(Path(__file__).parent / "fixtures" / "fake_repl.py")]


@pytest.fixture
def pool():
    pool = ReplPool(FAKE, size=1, memory_mb=0)
    yield pool
    pool.close()


def _pid(reply):
    return reply["messages"][0]["data"].split()[1]


def test_the_header_is_elaborated_once_and_reused_by_env_id(pool):
    first = pool.check("import Mathlib", "theorem a : True := trivial", timeout_s=5)
    second = pool.check("import Mathlib", "theorem b : True := trivial", timeout_s=5)
    # env 0 is the header; both proofs run in it
    assert first["messages"][0]["data"].endswith("saw env 0")
    assert second["messages"][0]["data"].endswith("saw env 0")
    assert (first["env"], second["env"]) == (1, 2)


def test_a_hanging_check_times_out_and_the_process_is_replaced(pool):
    before = _pid(pool.check("h", "ok", timeout_s=5))
    started = time.monotonic()
    with pytest.raises(VerifierTimeout):
        pool.check("h", "HANG", timeout_s=0.5)
    assert time.monotonic() - started < 1.5
    after = _pid(pool.check("h", "ok", timeout_s=5))
    assert after != before


def test_a_crashed_process_is_reported_and_replaced(pool):
    with pytest.raises(VerifierCrash):
        pool.check("h", "CRASH", timeout_s=5)
    assert pool.check("h", "ok", timeout_s=5)["env"] == 1
