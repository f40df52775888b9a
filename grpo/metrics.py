"""Run outputs: one JSON line per step, a compact console line, and PNG plots of the curves."""

from __future__ import annotations

import json
from pathlib import Path

from grpo.jsonl import read_objects

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


class MetricsLog:
    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"
        self.path.write_text("")

    def write(self, record: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


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
    return read_objects(
        path, lambda record: "step" in record, "not a step's record (a JSON object with a 'step')"
    )


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
