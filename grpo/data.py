"""Prompt datasets: the built-in arithmetic task, local files, or Hugging Face dataset ids.

Every row becomes a dict with at least `prompt` (the formatted text) and the row's own fields
(e.g. `answer`), which rewards receive as `sample`.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from grpo.config import DataConfig, RecipeError
from grpo.tasks import arithmetic

TASK_PREFIX = "task:"
FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_rows(source: str, split: str, key: str) -> list[dict]:
    """`source`'s rows of `split`. A local file is one split unless it has a `split` column; then its
    rows of `split`, and a RecipeError naming `key` (the recipe key or option that gave `split`) where
    it has none, rather than every row: a misspelt split would otherwise evaluate on all of them, and
    a held-out split missing from a training file would evaluate on the training rows."""
    import datasets

    path = Path(source)
    if path.suffix in FILE_SUFFIXES:
        if not path.is_file():
            raise RecipeError(f"data file not found: {source}")
        table = _read_file(path)
        if "split" in table.column_names:
            if split not in (splits := set(table["split"])):
                named = ", ".join(sorted(map(str, splits)))
                raise RecipeError(f"{key}: {source} has no {split!r} rows (its splits: {named})")
            table = table.filter(lambda row: row["split"] == split)
    else:
        try:
            table = datasets.load_dataset(source, split=split)
        except Exception as error:  # noqa: BLE001 - datasets raises many types for a bad id
            raise RecipeError(f"cannot load dataset {source!r} split {split!r}: {error}") from None
    return [dict(row) for row in table]


def _read_file(path: Path):
    import datasets

    if path.stat().st_size == 0:  # datasets fails on it with a bare StopIteration
        raise RecipeError(f"data file is empty: {path}")
    try:
        return datasets.load_dataset(FILE_SUFFIXES[path.suffix], data_files=str(path), split="train")
    except Exception as error:  # noqa: BLE001 - datasets wraps the parser's error; name the innermost
        while error.__cause__ is not None:
            error = error.__cause__
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise RecipeError(f"{path}: not a readable {path.suffix[1:]} file ({reason})") from None


def _format(rows: list[dict], config: DataConfig) -> list[dict]:
    out = []
    for row in rows:
        try:
            prompt = config.prompt_template.format(**row)
        except KeyError as error:
            raise RecipeError(f"data.prompt_template: rows have no field {error}") from None
        except (ValueError, IndexError, AttributeError, TypeError) as error:  # a malformed template
            raise RecipeError(f"data.prompt_template {config.prompt_template!r}: {error}") from None
        if config.answer_field not in row:
            raise RecipeError(f"data.answer_field: rows have no field {config.answer_field!r}")
        out.append({**row, "prompt": prompt, "answer": str(row[config.answer_field])})
    return out


def train_prompts(config: DataConfig, seed: int, fits: Callable[[dict], bool] = lambda row: True):
    """Endless iterator of training rows, shuffled once per pass. A file's or dataset's rows that
    `fits` refuses are left out (the task's prompts and solutions are a few dozen characters)."""
    if config.source.startswith(TASK_PREFIX):
        return _task(config.source).problems("train", seed)
    rows = _format(load_rows(config.source, config.split, "data.split"), config)
    if not rows:
        raise RecipeError(f"data.source: no rows in {config.source!r} split {config.split!r}")
    rows = _fitting(rows, fits, "data.source")
    rng = random.Random(seed)

    def cycle():
        while True:
            rng.shuffle(rows)
            yield from rows

    return cycle()


def eval_prompts(
    config: DataConfig, count: int, seed: int, fits: Callable[[dict], bool] = lambda row: True
) -> list[dict]:
    """The first `count` held-out rows (deterministic) that `fits` accepts."""
    source = config.eval_source or config.source
    if source.startswith(TASK_PREFIX):
        unique = {
            row["prompt"]: row
            for row in itertools.islice(_task(source).problems("eval", seed + 1), 50 * count)
        }
        return list(unique.values())[:count]
    rows = _format(load_rows(source, config.eval_split, "data.eval_split"), config)
    return _fitting(rows, fits, "data.eval_source" if config.eval_source else "data.source")[:count]


def _fitting(rows: list[dict], fits: Callable[[dict], bool], key: str) -> list[dict]:
    kept = [row for row in rows if fits(row)]
    if rows and not kept:
        raise RecipeError(
            f"{key}: all {len(rows)} rows are too long for the model's context (its "
            "max_position_embeddings, or rollout.engine_kwargs.max_model_len for grpo train's engines)"
        )
    return kept


@dataclass
class ContextFit:
    """Whether a row's `fields`, tokenized, leave a token of room in `context`: one to answer for a
    prompt (vLLM refuses a prompt as long as its context, which would stop a run at the step that
    drew it), the end-of-sequence token for a prompt and completion. Counts the rows refused."""

    tokenizer: object
    context: int
    fields: tuple[str, ...] = ("prompt",)
    too_long: int = 0

    def __call__(self, row: dict) -> bool:
        if sum(len(self.tokenizer(row[field])["input_ids"]) for field in self.fields) < self.context:
            return True
        self.too_long += 1
        return False


def _task(source: str):
    name = source.removeprefix(TASK_PREFIX)
    if name != "arithmetic":
        raise RecipeError(f"data.source: unknown task {name!r} (known: task:arithmetic)")
    return arithmetic
