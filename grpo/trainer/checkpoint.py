"""Resumable checkpoints: `grpo train RECIPE --resume` continues a run from its latest one.

A checkpoint (`runs/<name>/checkpoints/step-N`, and `final`) is a Hugging Face model folder. Beside
the weights it holds what continuing needs and they lack, under `trainer_state/`: each trainer rank's
optimizer state (AdamW's moments, and the FP32 masters of BF16 parameters) and `run.json`: the step,
the held-out scores from before training (the summary compares against them) and how many training
rows the run had drawn. `run.json` is
removed before a checkpoint is written and written last, so a checkpoint cut short is never taken.

What a resumed run does not reproduce: vLLM's sampling is not seeded, so the completions of the
steps after the checkpoint differ from the ones the first run would have drawn.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from grpo.config import Recipe, RecipeError, changed_settings, dump_recipe

STATE = "trainer_state"
RUN_STATE = "run.json"
MAY_CHANGE = ("train.steps",)
"""Recipe keys a resumed run may set anew: more steps continue a finished run."""


@dataclass(frozen=True)
class ResumePoint:
    checkpoint: Path
    step: int
    eval_before: dict
    rows_drawn: int
    """Training rows the run had drawn (more than the steps' prompts where it resampled)."""


def optimizer_file(checkpoint: str | Path, rank: int) -> Path:
    return Path(checkpoint) / STATE / f"optimizer-rank{rank}.pt"


def adapter_file(checkpoint: str | Path) -> Path:
    """A LoRA run's adapters and buffers (`grpo.models.lora.adapter_state`)."""
    return Path(checkpoint) / STATE / "adapter.safetensors"


def trainer_state_files(recipe: Recipe, checkpoint: Path) -> list[Path]:
    """What the trainer loads from `checkpoint` besides the weights: each rank's optimizer state,
    and a LoRA run's adapters."""
    files = [optimizer_file(checkpoint, rank) for rank in range(recipe.train.expert_parallel_size)]
    return [*files, adapter_file(checkpoint)] if recipe.train.lora else files


def begin_checkpoint(checkpoint: Path) -> None:
    """Unmark `checkpoint` as resumable until `end_checkpoint`: a crash between them leaves weights
    and optimizer states of different steps."""
    (checkpoint / STATE / RUN_STATE).unlink(missing_ok=True)


def end_checkpoint(point: ResumePoint) -> None:
    """Mark `point.checkpoint`, written, as resumable."""
    (point.checkpoint / STATE).mkdir(parents=True, exist_ok=True)
    state = {"step": point.step, "eval_before": point.eval_before, "rows_drawn": point.rows_drawn}
    (point.checkpoint / STATE / RUN_STATE).write_text(json.dumps(state))


def _resumable(checkpoint: Path) -> ResumePoint | None:
    try:
        state = json.loads((checkpoint / STATE / RUN_STATE).read_text())
        return ResumePoint(
            checkpoint, int(state["step"]), dict(state["eval_before"]), int(state["rows_drawn"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_same_recipe(recipe: Recipe, run_dir: Path) -> None:
    """A RecipeError where the recipe differs from the one `run_dir`'s run was trained with, in any
    key but `MAY_CHANGE`: its checkpoint and metrics would read as this recipe's."""
    try:
        earlier = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        raise RecipeError(f"--resume: {run_dir} holds no run to resume (no readable config.yaml)") from None
    # a key added since the run was written takes its default, which keeps what the run did; a file
    # that no longer validates is compared as written, each difference named
    with contextlib.suppress(ValidationError):
        earlier = Recipe.model_validate(earlier).model_dump(mode="json")
    differ = changed_settings(earlier, recipe.model_dump(mode="json"), MAY_CHANGE)
    if differ:
        raise RecipeError(
            f"--resume: {run_dir} was trained with other settings ({'; '.join(differ)}); only "
            f"{', '.join(MAY_CHANGE)} may change (give run.name another name to start a new run)"
        )


def resume_point(recipe: Recipe) -> ResumePoint:
    """The latest resumable checkpoint of the recipe's run; a RecipeError where there is none, the
    recipe differs from the run's, or that checkpoint already ends the run."""
    run_dir = recipe.run_dir
    check_same_recipe(recipe, run_dir)
    points = [p for p in map(_resumable, sorted((run_dir / "checkpoints").glob("*"))) if p]
    if not points:
        raise RecipeError(
            f"--resume: {run_dir} has no checkpoint to resume from (train.checkpoint_interval: N "
            "writes one every N steps)"
        )
    latest = max(points, key=lambda point: point.step)
    missing = [path for path in trainer_state_files(recipe, latest.checkpoint) if not path.is_file()]
    if missing:  # marked complete, so removed since: say so rather than fail in the trainer
        named = ", ".join(str(path.relative_to(latest.checkpoint)) for path in missing)
        raise RecipeError(
            f"--resume: {latest.checkpoint} lacks {named} (remove that checkpoint folder to resume from "
            "an earlier one)"
        )
    if latest.step >= recipe.train.steps:
        raise RecipeError(
            f"--resume: {latest.checkpoint} is step {latest.step}, and train.steps is "
            f"{recipe.train.steps}; raise train.steps to train further"
        )
    return latest


_STEP_FILE = re.compile(r"(?:eval_step|step-)(\d+)(?:\.jsonl)?")


def continue_run_folder(recipe: Recipe, point: ResumePoint) -> Path:
    """The run's folder as it stood at `point`: later steps' metrics, held-out records and
    checkpoints go (the resumed run writes its own), as do the summary and final outputs."""
    run_dir = recipe.run_dir
    later = [
        path
        for path in [*run_dir.glob("eval_step*.jsonl"), *(run_dir / "checkpoints").glob("step-*")]
        if (found := _STEP_FILE.fullmatch(path.name)) and int(found.group(1)) > point.step
    ]
    for path in [*later, run_dir / "eval_after.jsonl", run_dir / "summary.json", run_dir / "curves.png"]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        # a step's line is written before its checkpoint, so a line cut short is a later step's
        kept = [line for line in metrics.read_text().split("\n") if _step_of(line) <= point.step]
        metrics.write_text("".join(line + "\n" for line in kept))
    dump_recipe(recipe, run_dir / "config.yaml")
    return run_dir


def _step_of(line: str) -> float:
    """The step of a `metrics.jsonl` line; infinity for a line that is not a step's record."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
    return step if isinstance(step, int) else float("inf")
