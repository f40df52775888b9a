"""mypy over the algorithm and reward code (`[tool.mypy]` in pyproject.toml), the code users read to
write their own estimators and rewards."""

from pathlib import Path


def test_the_algorithm_and_reward_code_type_checks(tmp_path, monkeypatch):
    from mypy import api

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the config's `files` are relative to it
    stdout, stderr, status = api.run(["--config-file", "pyproject.toml", "--cache-dir", str(tmp_path)])
    assert (status, stderr) == (0, ""), stdout
    assert stdout.startswith("Success: no issues found")
