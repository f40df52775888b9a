import pytest

from grpo.metrics import plot_run


def test_a_metrics_line_that_is_not_json_is_named_by_its_number(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n{"step": 2, "rew\n')
    with pytest.raises(ValueError) as error:
        plot_run(tmp_path)
    assert str(error.value) == f"{tmp_path}/metrics.jsonl:2: not JSON (Unterminated string starting at)"


def test_a_metrics_line_without_a_step_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kl": 0.1}\n\n[1, 2]\n')
    with pytest.raises(ValueError) as error:
        plot_run(tmp_path)
    assert (
        str(error.value) == f"{tmp_path}/metrics.jsonl:3: not a step's record (a JSON object with a 'step')"
    )


def test_a_run_with_nothing_to_plot_is_refused_with_the_curves_it_looks_for(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.3}\n')
    with pytest.raises(
        ValueError, match=r"metrics\.jsonl: no curves to plot \(none of reward/mean, accuracy,"
    ):
        plot_run(tmp_path)
    assert not (tmp_path / "curves.png").exists()


def test_the_curves_of_a_run_are_drawn(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kl": 0.1}\n{"step": 2, "kl": 0.2}\n')
    assert plot_run(tmp_path) == tmp_path / "curves.png"
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
