import pytest

from grpo.metrics import plot_run, read_metrics


def test_a_metrics_line_that_is_not_json_is_named_by_its_number(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n{"step": 2, "rew\n')
    with pytest.raises(ValueError) as error:
        plot_run(tmp_path)
    assert str(error.value) == f"{tmp_path}/metrics.jsonl:2: not JSON (Unterminated string starting at)"


def test_a_last_line_cut_short_without_its_newline_is_left_out(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kl": 0.1}\n{"step": 2, "kl": 0.2}\n{"step": 3, "k')
    assert read_metrics(tmp_path) == [{"step": 1, "kl": 0.1}, {"step": 2, "kl": 0.2}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kl": 0.1}\n{"step": 2, "kl": 0.2}')
    assert read_metrics(tmp_path) == [{"step": 1, "kl": 0.1}, {"step": 2, "kl": 0.2}]


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


def _events(folder):
    """The `Event`s of `folder`'s event files: TFRecord frames (length, its CRC, an `Event`, its CRC),
    read without TensorBoard itself."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            yield Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4


def _scalars(folder) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in `folder`'s event files."""
    return [(v.tag, e.step, round(v.simple_value, 6)) for e in _events(folder) for v in e.summary.value]


def test_metrics_are_written_as_tensorboard_scalars_where_asked(tmp_path):
    from grpo.metrics import MetricsLog

    log = MetricsLog(tmp_path, tensorboard=True)
    log.write({"step": 1, "reward/mean": 0.25, "kl": 0.5, "run": "text", "stopped": False})
    log.write({"step": 2, "reward/mean": 0.75, "kl": 0.125})
    log.close()
    assert [line for line in (tmp_path / "metrics.jsonl").read_text().split("\n") if line][1] == (
        '{"step": 2, "reward/mean": 0.75, "kl": 0.125}'
    )
    assert _scalars(tmp_path / "tensorboard") == [
        ("reward/mean", 1, 0.25),
        ("kl", 1, 0.5),
        ("reward/mean", 2, 0.75),
        ("kl", 2, 0.125),
    ]
    (tmp_path / "off").mkdir()
    MetricsLog(tmp_path / "off").close()
    assert [path.name for path in (tmp_path / "off").iterdir()] == ["metrics.jsonl"]  # no events by default


def test_tensorboard_events_without_their_writer_installed_stop_before_the_run(monkeypatch):
    import grpo.metrics

    grpo.metrics.check_tensorboard(True)  # installed here
    monkeypatch.setattr(grpo.metrics.importlib.util, "find_spec", lambda name: None)
    grpo.metrics.check_tensorboard(False)
    with pytest.raises(ValueError) as error:
        grpo.metrics.check_tensorboard(True)
    assert str(error.value) == "run.tensorboard: needs the tensorboardX package (pip install tensorboardX)"


def test_a_resumed_log_keeps_the_earlier_records_and_tells_tensorboard_to_drop_later_ones(tmp_path):
    """TensorBoard drops an earlier file's scalars from the step of a session-start event on."""
    from tensorboardX.proto.event_pb2 import SessionLog

    from grpo.metrics import MetricsLog

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    log = MetricsLog(tmp_path, tensorboard=True, resumed_after=2)
    log.write({"step": 3, "kl": 0.5})
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3, "kl": 0.5}\n'
    events = list(_events(tmp_path / "tensorboard"))
    assert [e.step for e in events if e.session_log.status == SessionLog.START] == [3]
