import json

import pytest
from conftest import bos_adding_tokenizer, needs_data

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


def test_held_out_prompts_are_never_the_rows_of_a_training_file_without_a_split_column(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"q": "1+1", "answer": "2"}\n')
    config = DataConfig(source=str(tmp_path / "rows.jsonl"), prompt_template="{q}")
    with pytest.raises(RecipeError) as error:
        eval_prompts(config, count=4, seed=0)
    assert str(error.value) == (
        f"data.eval_source: {tmp_path}/rows.jsonl has no split column, so its held-out prompts would be "
        "its training rows; name a held-out file here (or set eval.prompts: 0)"
    )
    assert eval_prompts(config, count=0, seed=0) == []


def test_rows_that_do_not_fit_are_left_out_of_training_and_held_out_prompts(tmp_path):
    (tmp_path / "rows.jsonl").write_text(
        '{"q": "1+1", "answer": "2"}\n{"q": "1+1+1+1", "answer": "4"}\n{"q": "2+2", "answer": "4"}\n'
    )
    rows = str(tmp_path / "rows.jsonl")
    config = DataConfig(source=rows, eval_source=rows, prompt_template="{q}")
    short = lambda row: len(row["prompt"]) < 5  # noqa: E731
    assert [row["q"] for row in eval_prompts(config, count=2, seed=0, fits=short)] == ["1+1", "2+2"]
    prompts = train_prompts(config, seed=0, fits=short)
    assert {next(prompts)["q"] for _ in range(10)} == {"1+1", "2+2"}
    with pytest.raises(RecipeError, match=r"^data\.source: all 3 rows are too long for the model's context"):
        train_prompts(config, seed=0, fits=lambda row: False)


def test_a_row_with_an_empty_prompt_is_named_before_the_run(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"q": "1+1", "answer": "2"}\n{"q": "", "answer": "0"}\n')
    rows = str(tmp_path / "rows.jsonl")
    config = DataConfig(source=rows, eval_source=rows, prompt_template="{q}")
    message = "a row's prompt is empty, so there is nothing to answer (a row of fields q, answer, prompt)"
    with pytest.raises(RecipeError) as error:
        train_prompts(config, seed=0)
    assert str(error.value) == f"data.source: {message}"
    with pytest.raises(RecipeError) as error:
        eval_prompts(config, count=2, seed=0)
    assert str(error.value) == f"data.eval_source: {message}"


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
        ("rows.jsonl", '{"q": "1"}\n{"q": ', "{path}:2: not JSON (Expecting value)"),
        ("rows.jsonl", '{"q": "1"}\n[2]\n', "{path}:2: not a JSON object (a row's object a line)"),
        ("rows.jsonl", "\x89PNG", "{path}: not UTF-8 text (invalid start byte at byte 0)"),
        ("rows.json", '[{"q": "1"},\n 2]', "{path}: item 2 of its array is not a JSON object"),
        ("rows.json", '[{"q": "1"},\n', "{path}:2: not JSON (Expecting value)"),
        ("rows.json", "[\xff", "{path}: not UTF-8 text (invalid start byte at byte 1)"),
        (
            "rows.parquet",
            "not parquet",
            "{path}: not a readable parquet file (Parquet magic bytes not found in footer.",
        ),
    ],
)
def test_a_data_file_that_cannot_be_read_is_named(tmp_path, name, text, reason):
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(RecipeError) as error:
        load_rows(str(path), "train", "data.split")
    assert str(error.value).startswith(reason.format(path=path))


def test_a_line_separator_inside_a_json_string_does_not_end_the_line(tmp_path):
    # GSM8K's train.jsonl line 2382 holds two U+2028 inside a string; str.splitlines split there
    (tmp_path / "rows.jsonl").write_text(
        '{"q": "a\u2028b", "answer": "1"}\r\n{"q": "c", "answer": "2"}\n', "utf-8"
    )
    assert load_rows(str(tmp_path / "rows.jsonl"), "train", "data.split") == [
        {"q": "a\u2028b", "answer": "1"},
        {"q": "c", "answer": "2"},
    ]


def test_a_local_file_of_another_kind_is_named_rather_than_looked_up_on_the_hub(tmp_path):
    (tmp_path / "rows.csv").write_text("q,answer\n1+1,2\n")
    with pytest.raises(RecipeError) as error:
        load_rows(str(tmp_path / "rows.csv"), "train", "data.split")
    assert (
        str(error.value) == f"{tmp_path}/rows.csv: a local file, but data files are .jsonl, .json or .parquet"
    )


def test_a_json_file_gives_each_value_as_written_even_where_a_field_mixes_types(tmp_path):
    # datasets' JSON reader turned these answers into 7 and 3.1 and gave the missing field None
    (tmp_path / "rows.jsonl").write_text('{"q": "a", "answer": "007"}\n{"q": "b", "answer": 5}\n')
    (tmp_path / "rows.json").write_text('[{"q": "a", "answer": "3.10", "x": 1},\n {"q": "b", "answer": 2}]')
    assert load_rows(str(tmp_path / "rows.jsonl"), "train", "data.split") == [
        {"q": "a", "answer": "007"},
        {"q": "b", "answer": 5},
    ]
    assert load_rows(str(tmp_path / "rows.json"), "train", "data.split") == [
        {"q": "a", "answer": "3.10", "x": 1},
        {"q": "b", "answer": 2},
    ]


def test_a_row_without_a_gold_answer_has_none_rather_than_the_string_none(tmp_path):
    # `str(None)` made "None" the gold answer that every completion was scored against
    (tmp_path / "rows.jsonl").write_text(
        '{"q": "2+2", "answer": "4"}\n{"q": "1+1", "answer": null}\n{"q": "3"}\n'
    )
    config = DataConfig(
        source=str(tmp_path / "rows.jsonl"), eval_source=str(tmp_path / "rows.jsonl"), prompt_template="{q}"
    )
    assert [row.get("answer") for row in eval_prompts(config, count=3, seed=0)] == ["4", None, None]


def test_a_source_where_no_row_has_what_a_reward_scores_against_is_refused(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"q": "1+1", "gold": "2"}\n')
    config = DataConfig(source=str(tmp_path / "rows.jsonl"), prompt_template="{q}")
    with pytest.raises(RecipeError) as error:
        train_prompts(config, seed=0, reads={"math": ("answer",)})
    assert str(error.value) == (
        f"rewards: math scores against 'answer', which no row of {tmp_path}/rows.jsonl has "
        "(data.answer_field is 'answer')"
    )
    config = DataConfig(source=str(tmp_path / "rows.jsonl"), prompt_template="{q}", answer_field="gold")
    assert next(train_prompts(config, seed=0, reads={"math": ("answer",)}))["answer"] == "2"
    assert "answer" not in next(
        train_prompts(DataConfig(source=config.source, prompt_template="{q}"), seed=0)
    )


def test_held_out_rows_without_what_a_reward_scores_against_are_refused(tmp_path):
    # every held-out row would score n/a, so held-out accuracy would read 0 before and after training
    (tmp_path / "train.jsonl").write_text('{"q": "1+1", "answer": "2"}\n')
    (tmp_path / "held.jsonl").write_text('{"q": "2+2"}\n{"q": "3+3"}\n')
    config = DataConfig(
        source=str(tmp_path / "train.jsonl"), eval_source=str(tmp_path / "held.jsonl"), prompt_template="{q}"
    )
    with pytest.raises(RecipeError) as error:
        eval_prompts(config, count=2, seed=0, reads={"math": ("answer",)})
    assert str(error.value) == (
        f"rewards: math scores against 'answer', which no held-out row of {tmp_path}/held.jsonl has "
        "(data.answer_field is 'answer')"
    )
    assert eval_prompts(config, count=0, seed=0, reads={"math": ("answer",)}) == []
    assert [row["prompt"] for row in eval_prompts(config, count=2, seed=0, reads={"think_format": ()})] == [
        "2+2",
        "3+3",
    ]


def test_prompts_are_a_field_as_is_or_a_template_over_the_fields(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"q": "1+1", "answer": 2}\n')
    source = str(tmp_path / "rows.jsonl")
    rows = [
        next(train_prompts(DataConfig(source=source, prompt_field="q"), seed=0)),
        next(train_prompts(DataConfig(source=source, prompt_template="Q: {q}"), seed=0)),
    ]
    assert [(row["prompt"], row["answer"]) for row in rows] == [("1+1", "2"), ("Q: 1+1", "2")]
    with pytest.raises(RecipeError) as error:
        train_prompts(DataConfig(source=source), seed=0)
    assert (
        str(error.value)
        == "data.prompt_field: rows need a 'prompt' value (a row of fields q, answer has none)"
    )


def test_a_prompt_field_beside_a_template_is_refused_rather_than_ignored():
    with pytest.raises(ValueError, match="prompt_field: not read where prompt_template is set"):
        DataConfig(prompt_field="q", prompt_template="{q}")


def test_sft_rows_need_a_completion_and_no_gold_answer(tmp_path):
    from grpo.config import recipe_from_dict
    from grpo.data import ContextFit
    from grpo.models.tiny import build_tokenizer
    from grpo.sft import sft_rows

    (tmp_path / "rows.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    recipe = recipe_from_dict(
        {"model": {"path": "tiny:deepseek_v3"}, "data": {"source": str(tmp_path / "rows.jsonl")}}
    )
    fit = ContextFit(build_tokenizer(), context=64, fields=("prompt", "completion"))
    assert next(sft_rows(recipe, recipe.sft, fit)) == ("1+1=", "2")


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{q", "data.prompt_template '{q': expected '}' before end of string"),
        ("{0}", "data.prompt_template '{0}': Replacement index 0 out of range for positional args tuple"),
        ("{q.x}", "data.prompt_template '{q.x}': 'str' object has no attribute 'x'"),
        ("{nope}", "data.prompt_template: rows need a field 'nope' (a row of fields q, answer has none)"),
    ],
)
def test_a_prompt_template_that_cannot_format_the_rows_is_named(tmp_path, template, message):
    (tmp_path / "rows.jsonl").write_text('{"q": "1+1", "answer": "2"}\n')
    config = DataConfig(source=str(tmp_path / "rows.jsonl"), prompt_template=template)
    with pytest.raises(RecipeError) as error:
        train_prompts(config, seed=0)
    assert str(error.value) == message


# a Llama-3-like template: the BOS written by the template itself, roles in brackets
BRACKETS = (
    "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def test_a_chat_prompt_encodes_to_the_templates_own_token_ids():
    from grpo.data import prompt_renderer

    tokenizer = bos_adding_tokenizer(BRACKETS)
    text = prompt_renderer(True, "Be brief.", tokenizer)("1+1=")
    # the template's <s> is left to the tokenizer, which adds it when the prompt is encoded
    assert text == "[system] Be brief.\n[user] 1+1=\n[assistant] "
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1="}]
    expected = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert tokenizer(text)["input_ids"] == list(getattr(expected, "input_ids", expected))
    assert tokenizer(text)["input_ids"][:2] == [1, 87]  # one <s>, then "["


def test_chat_prompts_render_file_and_task_rows_and_need_a_template(tmp_path):
    from grpo.data import prompt_renderer

    (tmp_path / "rows.jsonl").write_text('{"q": "1+1", "answer": "2"}\n')
    render = prompt_renderer(True, None, bos_adding_tokenizer(BRACKETS))
    config = DataConfig(source=str(tmp_path / "rows.jsonl"), prompt_template="{q}=", chat=True)
    assert next(train_prompts(config, seed=0, render=render))["prompt"] == "[user] 1+1=\n[assistant] "
    task_row = next(train_prompts(DataConfig(chat=True), seed=0, render=render))
    assert task_row["prompt"].startswith("[user] Q: ") and task_row["prompt"].endswith("\n[assistant] ")
    assert prompt_renderer(False, None, bos_adding_tokenizer())("1+1=") == "1+1="
    with pytest.raises(RecipeError) as error:
        prompt_renderer(True, None, bos_adding_tokenizer())
    assert str(error.value) == (
        "data.chat: the model's tokenizer has no chat template (a base model takes prompts as they are)"
    )
    with pytest.raises(ValueError, match="system_prompt: only applies with chat: true"):
        DataConfig(system_prompt="Be brief.")


def _benchmark_data(tmp_path, monkeypatch):
    """A data folder with one miniF2F row per split and one ProofNet row, as `grpo eval` reads them."""
    header = "import Mathlib\n"
    minif2f = [
        {
            "name": "v1",
            "split": "valid",
            "header": header,
            "informal_prefix": "/-- one -/\n",
            "formal_statement": "theorem v1 : 1 = 1 := by\n",
        },
        {
            "name": "t1",
            "split": "test",
            "header": header,
            "informal_prefix": "",
            "formal_statement": "theorem t1 : 2 = 2 := by\n",
        },
    ]
    proofnet = [
        {"name": "p1", "split": "valid", "header": header, "formal_statement": "theorem p1 : True :="}
    ]
    for path, rows in (("minif2f/minif2f.jsonl", minif2f), ("proofnet/proofnet.jsonl", proofnet)):
        (tmp_path / path).parent.mkdir()
        (tmp_path / path).write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setenv("GRPO_DATA_DIR", str(tmp_path))


def test_a_benchmark_source_prompts_its_rows_as_grpo_eval_does(tmp_path, monkeypatch):
    _benchmark_data(tmp_path, monkeypatch)
    config = DataConfig(source="benchmark:minif2f", split="valid", eval_split="test")
    row = next(train_prompts(config, seed=0))
    assert row["prompt"] == (
        "Complete the following Lean 4 code:\n\n```lean4\nimport Mathlib\n/-- one -/\ntheorem v1 : 1 = 1 := by\n"
    )
    assert (row["formal_statement"], row["header"]) == ("theorem v1 : 1 = 1 := by\n", "import Mathlib\n")
    assert [row["name"] for row in eval_prompts(config, count=4, seed=0)] == ["t1"]
    cot = next(train_prompts(DataConfig(source="benchmark:minif2f:cot", split="valid"), seed=0))
    assert cot["prompt"].startswith("Complete the following Lean 4 code with explanatory comments")
    # ProofNet's statements end in `:=`: the prompt and the statement the reward checks get `by`
    proofnet = next(train_prompts(DataConfig(source="benchmark:proofnet", split="valid"), seed=0))
    assert proofnet["prompt"].endswith("theorem p1 : True := by\n")
    assert proofnet["formal_statement"] == "theorem p1 : True := by\n"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"source": "benchmark:minif2g"},
            "data.source: unknown benchmark 'minif2g' (known: minif2f, proofnet, math500, gsm8k)",
        ),
        (
            {"source": "benchmark:minif2f:long", "split": "valid"},
            "data.source: benchmark:minif2f:long: no prompt style 'long' (its styles: noncot, cot)",
        ),
        (
            {"source": "benchmark:gsm8k:cot"},
            "data.source: benchmark:gsm8k:cot: no prompt style 'cot' (a math benchmark has one prompt)",
        ),
        (
            {"source": "benchmark:minif2f"},
            "data.split: {data}/minif2f/minif2f.jsonl has no 'train' rows (its splits: test, valid)",
        ),
        (
            {"source": "benchmark:math500", "split": "test"},
            "data.source: benchmark:math500 reads {data}/math500/test.jsonl, which is missing (set GRPO_DATA_DIR)",
        ),
    ],
)
def test_a_benchmark_source_that_cannot_be_read_is_named(tmp_path, monkeypatch, data, message):
    _benchmark_data(tmp_path, monkeypatch)
    with pytest.raises(RecipeError) as error:
        next(train_prompts(DataConfig(**data), seed=0))
    assert str(error.value) == message.format(data=tmp_path)


def test_a_benchmark_source_takes_no_prompt_keys_it_would_not_read():
    with pytest.raises(
        ValueError,
        match="prompt_template: not read with a benchmark: source, which prompts as grpo eval does",
    ):
        DataConfig(source="benchmark:minif2f", prompt_template="{formal_statement}")
    # a file's rows read them: here the training rows are a file's, the held-out ones a benchmark's
    DataConfig(source="rows.jsonl", eval_source="benchmark:minif2f", prompt_template="{q}")


def test_held_out_prompts_are_never_the_training_split(tmp_path):
    (tmp_path / "rows.jsonl").write_text(ROWS)
    config = DataConfig(
        source=str(tmp_path / "rows.jsonl"), prompt_field="q", split="test", eval_split="test"
    )
    with pytest.raises(RecipeError) as error:
        eval_prompts(config, count=4, seed=0)
    assert str(error.value) == (
        "data.eval_split: 'test' is data.split too, so the held-out prompts would be training rows; name "
        "another split (or set eval.prompts: 0)"
    )
    assert eval_prompts(config, count=0, seed=0) == []


@needs_data
def test_the_shipped_minif2f_trains_on_its_valid_split_and_holds_out_its_test_split():
    from grpo.eval.benchmarks import BENCHMARKS

    config = DataConfig(source="benchmark:minif2f", split="valid", eval_split="test")
    held_out = eval_prompts(config, count=1000, seed=0)
    assert len(held_out) == 244 and {row["split"] for row in held_out} == {"test"}
    assert held_out[0]["prompt"] == BENCHMARKS["minif2f"].prompt(held_out[0], "noncot")
    training = train_prompts(config, seed=0)
    assert {next(training)["split"] for _ in range(244)} == {"valid"}
