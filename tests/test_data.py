import pytest

from grpo.config import DataConfig, RecipeError
from grpo.data import eval_prompts, load_rows, train_prompts

ROWS = '{"q": "1+1", "answer": "2", "split": "train"}\n{"q": "2+2", "answer": "4", "split": "test"}\n'


def test_a_file_with_a_split_column_gives_the_rows_of_the_split_asked_for(tmp_path):
    (tmp_path / "rows.jsonl").write_text(ROWS)
    assert [row["q"] for row in load_rows(str(tmp_path / "rows.jsonl"), "test", "data.split")] == ["2+2"]


def test_a_file_without_a_split_column_is_one_split(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"q": "1+1"}\n{"q": "2+2"}\n')
    assert [row["q"] for row in load_rows(str(tmp_path / "rows.jsonl"), "test", "data.split")] == [
        "1+1",
        "2+2",
    ]


def test_a_split_the_file_does_not_have_is_named_with_the_splits_it_has(tmp_path):
    (tmp_path / "rows.jsonl").write_text(ROWS)
    with pytest.raises(RecipeError) as error:
        load_rows(str(tmp_path / "rows.jsonl"), "tset", "--split")
    assert str(error.value) == f"--split: {tmp_path}/rows.jsonl has no 'tset' rows (its splits: test, train)"


def test_held_out_prompts_are_never_the_training_rows_of_a_file_without_a_held_out_split(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"q": "1+1", "answer": "2", "split": "train"}\n')
    config = DataConfig(source=str(tmp_path / "train.jsonl"), prompt_template="{q}")
    with pytest.raises(
        RecipeError, match=r"^data\.eval_split: .*train\.jsonl has no 'test' rows \(its splits: train\)$"
    ):
        eval_prompts(config, count=4, seed=0)


def test_rows_that_do_not_fit_are_left_out_of_training_and_held_out_prompts(tmp_path):
    (tmp_path / "rows.jsonl").write_text(
        '{"q": "1+1", "answer": "2"}\n{"q": "1+1+1+1", "answer": "4"}\n{"q": "2+2", "answer": "4"}\n'
    )
    config = DataConfig(source=str(tmp_path / "rows.jsonl"), prompt_template="{q}")
    short = lambda row: len(row["prompt"]) < 5  # noqa: E731
    assert [row["q"] for row in eval_prompts(config, count=2, seed=0, fits=short)] == ["1+1", "2+2"]
    prompts = train_prompts(config, seed=0, fits=short)
    assert {next(prompts)["q"] for _ in range(10)} == {"1+1", "2+2"}
    with pytest.raises(RecipeError, match=r"^data\.source: all 3 rows are too long for the model's context"):
        train_prompts(config, seed=0, fits=lambda row: False)


def test_a_row_fits_while_its_fields_leave_a_token_of_room_in_the_context():
    from grpo.data import ContextFit
    from grpo.models.tiny import build_tokenizer

    fit = ContextFit(build_tokenizer(), context=5)  # one token a character
    rows = [{"prompt": p} for p in ("abcd", "abcde", "a", "abcdefgh")]
    assert [fit(row) for row in rows] == [True, False, True, False]
    assert fit.too_long == 2
    pairs = ContextFit(build_tokenizer(), context=5, fields=("prompt", "completion"))
    assert [pairs({"prompt": "ab", "completion": c}) for c in ("cd", "cde")] == [True, False]


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("rows.jsonl", "", "data file is empty: {path}"),
        (
            "rows.jsonl",
            '{"q": "1"}\n{"q": ',
            "{path}: not a readable jsonl file (JSON parse error: Invalid value. in row 1)",
        ),
        (
            "rows.parquet",
            "not parquet",
            "{path}: not a readable parquet file (Parquet magic bytes not found in footer.",
        ),
    ],
)
def test_a_data_file_that_cannot_be_read_is_named(tmp_path, name, text, reason):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(RecipeError) as error:
        load_rows(str(path), "train", "data.split")
    assert str(error.value).startswith(reason.format(path=path))


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{q", "data.prompt_template '{q': expected '}' before end of string"),
        ("{0}", "data.prompt_template '{0}': Replacement index 0 out of range for positional args tuple"),
        ("{q.x}", "data.prompt_template '{q.x}': 'str' object has no attribute 'x'"),
        ("{nope}", "data.prompt_template: rows have no field 'nope'"),
    ],
)
def test_a_prompt_template_that_cannot_format_the_rows_is_named(tmp_path, template, message):
    (tmp_path / "rows.jsonl").write_text('{"q": "1+1", "answer": "2"}\n')
    config = DataConfig(source=str(tmp_path / "rows.jsonl"), prompt_template=template)
    with pytest.raises(RecipeError) as error:
        train_prompts(config, seed=0)
    assert str(error.value) == message
