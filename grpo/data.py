"""Prompt datasets: the built-in arithmetic task, local files, Hugging Face dataset ids, or the
benchmarks `grpo eval` knows, prompted as it prompts them.

Every row becomes a dict with at least `prompt` (the formatted text) and the row's own fields
(e.g. `answer`), which rewards receive as `sample`.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from grpo.config import DataConfig, RecipeError
from grpo.jsonl import read_objects, utf8_text
from grpo.tasks import arithmetic

TASK_PREFIX = "task:"
BENCHMARK_PREFIX = "benchmark:"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def load_rows(source: str, split: str, key: str) -> list[dict]:
    """`source`'s rows of `split`. A local file is one split unless it has a `split` column; then its
    rows of `split`, and a RecipeError naming `key` (the recipe key or option that gave `split`) where
    it has none, rather than every row: a misspelt split would otherwise evaluate on all of them, and
    a held-out split missing from a training file would evaluate on the training rows."""
    path = Path(source)
    if path.suffix in FILE_SUFFIXES:
        if not path.is_file():
            raise RecipeError(f"data file not found: {source}")
        rows = _read_file(path)
        if any("split" in row for row in rows):
            if split not in (splits := {row.get("split") for row in rows}):
                named = ", ".join(sorted(map(str, splits)))
                raise RecipeError(f"{key}: {source} has no {split!r} rows (its splits: {named})")
            rows = [row for row in rows if row.get("split") == split]
        return rows
    # a file is no Hub id (the Hub client would say it "couldn't reach" it); a folder may be a dataset
    if path.is_file():
        raise RecipeError(f"{source}: a local file, but data files are .jsonl, .json or .parquet")
    import datasets

    try:
        table = datasets.load_dataset(source, split=split)
    except Exception as error:  # noqa: BLE001 - datasets raises many types for a bad id
        raise RecipeError(f"cannot load dataset {source!r} split {split!r}: {error}") from None
    return [dict(row) for row in table]


def _read_file(path: Path) -> list[dict]:
    """A local file's rows, each value as the file wrote it. JSON is read here rather than by
    `datasets`, whose JSON reader falls back to pandas on a column of mixed types (turning `"007"`
    into 7 and `"3.10"` into 3.1) and gives a field that a row lacks the value None."""
    if path.stat().st_size == 0:
        raise RecipeError(f"data file is empty: {path}")
    if path.suffix == ".parquet":
        return _read_parquet(path)
    try:
        text = utf8_text(path)
        if path.suffix == ".json" and text.lstrip().startswith("["):
            return _read_json_array(path, text)
        return read_objects(path, lambda row: True, "not a JSON object (a row's object a line)", text)
    except ValueError as error:
        raise RecipeError(str(error)) from None


def _read_json_array(path: Path, text: str) -> list[dict]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not JSON ({error.msg})") from None
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: item {number} of its array is not a JSON object")
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        reason = reason.split(f"'{path}': ", 1)[-1][:200]  # pyarrow's message repeats the path
        raise RecipeError(f"{path}: not a readable parquet file ({reason})") from None


Render = Callable[[str], str]
"""A prompt's text -> the model's input text (`prompt_renderer`)."""


def prompt_renderer(chat: bool, system_prompt: str | None, tokenizer, key: str = "data.chat") -> Render:
    """How a prompt's text becomes the model's input: as it is, or with `chat` the user's turn of the
    tokenizer's chat template, the assistant's turn opened. A RecipeError naming `key` where the
    tokenizer has no chat template."""
    if not chat:
        return str
    if not getattr(tokenizer, "chat_template", None):
        raise RecipeError(
            f"{key}: the model's tokenizer has no chat template (a base model takes prompts as they are)"
        )
    # every prompt is encoded by `tokenizer(prompt)`: where that adds a BOS itself, the BOS text a
    # template writes is dropped, so that the text encodes to the template's own token ids
    adds_bos = tokenizer.bos_token and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
    return functools.partial(
        _chat_prompt, tokenizer, system_prompt=system_prompt, drop=tokenizer.bos_token if adds_bos else ""
    )


def _chat_prompt(tokenizer, text: str, system_prompt: str | None, drop: str) -> str:
    """`text` as the user's turn of `tokenizer`'s chat template, the assistant's turn opened, without
    a leading `drop`."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    rendered = tokenizer.apply_chat_template(
        [*messages, {"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return rendered.removeprefix(drop)


def _rows(source: str, split: str, keys: tuple[str, str], config: DataConfig, render: Render) -> list[dict]:
    """`source`'s rows of `split`, each with its `prompt` rendered; `keys` name the source's and the
    split's recipe keys."""
    if source.startswith(BENCHMARK_PREFIX):
        return _benchmark_rows(source, split, keys, render)
    return _format(load_rows(source, split, keys[1]), config, render)


def _benchmark_rows(source: str, split: str, keys: tuple[str, str], render: Render) -> list[dict]:
    """`benchmark:NAME[:STYLE]`: the file `grpo eval NAME` reads, each row prompted as `grpo eval NAME
    --prompt STYLE` prompts it (`noncot` unless named), with the fields its reward scores against as
    the evaluation gives them (a ProofNet statement closed with `by`, as its prompt shows it)."""
    from grpo.eval.benchmarks import BENCHMARKS, default_data_dir
    from grpo.eval.prompts import LEAN_INSTRUCTIONS

    name, _, style = source.removeprefix(BENCHMARK_PREFIX).partition(":")
    if name not in BENCHMARKS:
        raise RecipeError(f"{keys[0]}: unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    benchmark = BENCHMARKS[name]
    styles = LEAN_INSTRUCTIONS if benchmark.kind == "lean" else {}
    if style and style not in styles:
        known = f"its styles: {', '.join(styles)}" if styles else "a math benchmark has one prompt"
        raise RecipeError(f"{keys[0]}: {source}: no prompt style {style!r} ({known})")
    path = default_data_dir() / benchmark.default_file
    if not path.is_file():
        raise RecipeError(f"{keys[0]}: {source} reads {path}, which is missing (set GRPO_DATA_DIR)")
    rows = load_rows(str(path), split, keys[1])
    for row in rows:
        if missing := benchmark.missing_field(row):
            raise RecipeError(f"{keys[0]}: {path} has a row without {missing}")
    return [
        {**row, **benchmark.sample(row), "prompt": render(benchmark.prompt(row, style or "noncot"))}
        for row in rows
    ]


def _format(rows: list[dict], config: DataConfig, render: Render = str) -> list[dict]:
    """Rows with `prompt` formatted (and rendered) and the gold answer, where a row has one, as the
    string `answer` (a row without one is not applicable to the rewards that score against it)."""
    out = []
    for row in rows:
        formatted = {**row, "prompt": render(_prompt(row, config))}
        if row.get(config.answer_field) is not None:
            formatted["answer"] = str(row[config.answer_field])
        out.append(formatted)
    return out


def _prompt(row: dict, config: DataConfig) -> str:
    if config.prompt_template is None:
        if row.get(config.prompt_field) is None:
            raise RecipeError(
                f"data.prompt_field: rows need a {config.prompt_field!r} value "
                f"(a row of fields {_fields(row)} has none)"
            )
        return str(row[config.prompt_field])
    try:
        return config.prompt_template.format(**row)
    except KeyError as error:
        raise RecipeError(
            f"data.prompt_template: rows need a field {error} (a row of fields {_fields(row)} has none)"
        ) from None
    except (ValueError, IndexError, AttributeError, TypeError) as error:  # a malformed template
        raise RecipeError(f"data.prompt_template {config.prompt_template!r}: {error}") from None


def _fields(row: dict) -> str:
    """A row named by its fields, in an error message."""
    return ", ".join(map(str, row))[:80]


def train_prompts(
    config: DataConfig,
    seed: int,
    fits: Callable[[dict], bool] = lambda row: True,
    reads: Mapping[str, Sequence[str]] | None = None,
    render: Render = str,
):
    """Endless iterator of training rows, shuffled once per pass. A file's or dataset's rows that
    `fits` refuses are left out (the task's prompts and solutions are a few dozen characters).
    `reads` maps each reward to the sample fields it scores against: a source where no row has any
    of them would leave that reward not applicable to every row, so it is refused. `render` makes
    each prompt the model's input (`prompt_renderer`)."""
    if config.source.startswith(TASK_PREFIX):
        return (
            {**row, "prompt": render(row["prompt"])} for row in _task(config.source).problems("train", seed)
        )
    rows = _rows(config.source, config.split, ("data.source", "data.split"), config, render)
    if not rows:
        raise RecipeError(f"data.source: no rows in {config.source!r} split {config.split!r}")
    _check_reads(rows, reads, f"row of {config.source}", config)
    rows = _fitting(rows, fits, "data.source")
    rng = random.Random(seed)

    def cycle():
        while True:
            rng.shuffle(rows)
            yield from rows

    return cycle()


def _check_reads(
    rows: list[dict], reads: Mapping[str, Sequence[str]] | None, rows_of: str, config: DataConfig
) -> None:
    for reward, fields in (reads or {}).items():
        if fields and not any(row.get(field) is not None for row in rows for field in fields):
            named = " or ".join(map(repr, fields))
            hint = f" (data.answer_field is {config.answer_field!r})" if "answer" in fields else ""
            raise RecipeError(f"rewards: {reward} scores against {named}, which no {rows_of} has{hint}")


def eval_prompts(
    config: DataConfig,
    count: int,
    seed: int,
    fits: Callable[[dict], bool] = lambda row: True,
    reads: Mapping[str, Sequence[str]] | None = None,
    render: Render = str,
) -> list[dict]:
    """The first `count` held-out rows (deterministic) that `fits` accepts. A training file without a
    `split` column has no held-out rows of its own: it needs `data.eval_source`. `reads` and `render`
    as for `train_prompts`, `reads` checked on these rows: held-out accuracy would be 0 before and after."""
    source = config.eval_source or config.source
    if source.startswith(TASK_PREFIX):
        unique = {
            row["prompt"]: row
            for row in itertools.islice(_task(source).problems("eval", seed + 1), 50 * count)
        }
        return [{**row, "prompt": render(row["prompt"])} for row in list(unique.values())[:count]]
    source_key = "data.eval_source" if config.eval_source else "data.source"
    if count and not config.eval_source and config.eval_split == config.split:
        raise RecipeError(
            f"data.eval_split: {config.split!r} is data.split too, so the held-out prompts would be "
            "training rows; name another split (or set eval.prompts: 0)"
        )
    rows = _rows(source, config.eval_split, (source_key, "data.eval_split"), config, render)
    own_file = not config.eval_source and Path(source).suffix in FILE_SUFFIXES
    if count and own_file and not any("split" in row for row in rows):
        raise RecipeError(
            f"data.eval_source: {source} has no split column, so its held-out prompts would be its "
            "training rows; name a held-out file here (or set eval.prompts: 0)"
        )
    rows = _fitting(rows, fits, source_key)[:count]
    if rows:  # eval.prompts: 0 asks for none
        _check_reads(rows, reads, f"held-out row of {source}", config)
    return rows


def _fitting(rows: list[dict], fits: Callable[[dict], bool], key: str) -> list[dict]:
    """The rows to sample from: those that `fits` takes; a RecipeError for an empty prompt (vLLM
    refuses one where the tokenizer adds no BOS, which would stop the run at the step that drew it)."""
    if empty := next((row for row in rows if row["prompt"] == ""), None):
        raise RecipeError(
            f"{key}: a row's prompt is empty, so there is nothing to answer (a row of fields {_fields(empty)})"
        )
    kept = [row for row in rows if fits(row)]
    if rows and not kept:
        raise RecipeError(
            f"{key}: all {len(rows)} rows are too long for the model's context (its "
            "max_position_embeddings, or rollout.engine_kwargs.max_model_len for grpo train's engines)"
        )
    return kept


def sequence_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The token ids of texts that follow one another in one sequence (a prompt, then its
    completion): the tokenizer's own special tokens, such as the BOS that Llama's and DeepSeek's
    tokenizers add, only before the first."""
    return [tokenizer(text, add_special_tokens=i == 0)["input_ids"] for i, text in enumerate(texts)]


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
        if sum(map(len, sequence_ids(self.tokenizer, [row[field] for field in self.fields]))) < self.context:
            return True
        self.too_long += 1
        return False


def _task(source: str):
    name = source.removeprefix(TASK_PREFIX)
    if name != "arithmetic":
        raise RecipeError(f"data.source: unknown task {name!r} (known: task:arithmetic)")
    return arithmetic
