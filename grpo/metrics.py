"""Run outputs: one JSON line per step (and the same scalars as TensorBoard events where asked), a
compact console line, and PNG plots of the curves."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from grpo.config import RecipeError
from grpo.jsonl import read_objects, utf8_text

CONSOLE_KEYS = (
    ("reward/mean", "reward", "{:.3f}"),
    ("accuracy", "acc", "{:.2f}"),
    ("kl", "kl", "{:.4f}"),
    ("entropy", "ent", "{:.3f}"),
    ("response_tokens/mean", "len", "{:.1f}"),
    ("sync/parity_max_abs_diff", "parity", "{:.1e}"),
    ("time/step_s", "s", "{:.1f}"),
)
PLOT_KEYS = (
    "reward/mean",
    "accuracy",
    "eval/accuracy",
    "kl",
    "entropy",
    "response_tokens/mean",
    "clip_fraction",
)


def check_tensorboard(wanted: bool) -> None:
    """A RecipeError where `run.tensorboard` asks for events and their writer is not installed (the
    GPU image of the lent machines lacks it), found before the run folder is touched."""
    if wanted and importlib.util.find_spec("tensorboardX") is None:
        raise RecipeError("run.tensorboard: needs the tensorboardX package (pip install tensorboardX)")


class MetricsLog:
    """`metrics.jsonl`, one record a step; with `tensorboard`, each record's numbers also as scalars
    under `tensorboard/`, flushed every step so that a run that stops keeps its curves."""

    def __init__(self, run_dir: Path, tensorboard: bool = False, resumed_after: int = 0):
        """`resumed_after`: the step a resumed run continues from, whose records are kept; TensorBoard
        is told to drop the earlier run's scalars of the steps after it."""
        self.path = run_dir / "metrics.jsonl"
        if not resumed_after:
            self.path.write_text("")
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = resumed_after + 1 if resumed_after else None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def write(self, record: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def console_line(record: dict) -> str:
    parts = [f"step {record['step']:>3}"]
    for key, label, fmt in CONSOLE_KEYS:
        if key in record:
            parts.append(f"{label} {fmt.format(record[key])}")
    return " | ".join(parts)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"no metrics.jsonl in {run_dir}")
    text = utf8_text(path)
    complete, _, last = text.rpartition("\n")
    if last.strip() and not _is_json(last):
        # a step's record is written whole with its newline: without one, a line cut short by a run
        # stopped mid-write, or one being written while a live run is read
        text = complete
    return read_objects(
        path, lambda record: "step" in record, "not a step's record (a JSON object with a 'step')", text
    )


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def plot_run(run_dir: Path) -> Path:
    """Write `curves.png` (one panel per curve) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    keys = [k for k in PLOT_KEYS if any(k in r for r in records)]
    if not keys:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no curves to plot (none of {', '.join(PLOT_KEYS)})")
    figure, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for axis, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        axis.plot([p[0] for p in points], [p[1] for p in points])
        axis.set_title(key, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
    figure.tight_layout()
    out = run_dir / "curves.png"
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
