"""Benchmark data lives outside the project (`../shared/data`, or `GRPO_DATA_DIR`); tests that read it
skip with the reason where it is missing."""

import pytest
from grpo.eval.benchmarks import default_data_dir

DATA_DIR = default_data_dir()
needs_data = pytest.mark.skipif(
    not DATA_DIR.is_dir(), reason=f"benchmark data not found at {DATA_DIR} (set GRPO_DATA_DIR)"
)
