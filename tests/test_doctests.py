import doctest
import importlib

import pytest

MODULES = ["grpo.algorithms.advantages", "grpo.tasks.arithmetic", "grpo.rewards.extract", "grpo.rewards.math"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
