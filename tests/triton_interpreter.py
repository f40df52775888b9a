"""Runs a test file's own `__main__` checks in Triton's CPU interpreter: in a subprocess with
TRITON_INTERPRET=1, since Triton reads the variable when it is imported, and the pytest process may
have imported it already."""

import os
import subprocess
import sys

import pytest


def run_in_triton_interpreter(test_file: str) -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, test_file], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
