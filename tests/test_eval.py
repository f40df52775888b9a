import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_data
from grpo.eval.benchmarks import BENCHMARKS, default_data_dir
from grpo.eval.passk import pass_at_k
from grpo.eval.prompts import lean_prompt, math_prompt


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [(4, 1, 2, 0.5), (5, 2, 1, 0.4), (10, 0, 5, 0.0), (3, 3, 1, 1.0), (3, 1, 3, 1.0), (6, 2, 3, 0.8)],
)
def test_pass_at_k_matches_the_binomial_formula(n, c, k, expected):
    # e.g. n=6, c=2, k=3: 1 - C(4,3)/C(6,3) = 1 - 4/20 = 0.8
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_needs_k_samples():
    with pytest.raises(ValueError, match="pass@8 needs at least 8 samples"):
        pass_at_k(4, 1, 8)


def _first(path):
    return json.loads((default_data_dir() / path).read_text().splitlines()[0])


@needs_data
def test_a_minif2f_prompt_is_instruction_header_informal_statement_and_formal_statement():
    row = _first("minif2f/minif2f.jsonl")
    prompt = lean_prompt(row)
    assert (
        prompt
        == "Complete the following Lean 4 code:\n\n```lean4\n"
        + row["header"]
        + row["informal_prefix"]
        + row["formal_statement"]
    )
    assert prompt.endswith(":= by\n")
    assert lean_prompt(row, "cot").startswith("Complete the following Lean 4 code with explanatory comments")


@needs_data
def test_a_proofnet_prompt_uses_its_own_header_and_opens_a_tactic_block():
    row = _first("proofnet/proofnet.jsonl")
    assert row["formal_statement"].endswith(":=")
    prompt = lean_prompt(row)
    assert prompt.startswith(
        "Complete the following Lean 4 code:\n\n```lean4\nimport Mathlib\n\nopen Complex Filter"
    )
    assert prompt.endswith(row["formal_statement"] + " by\n")
    assert BENCHMARKS["proofnet"].sample(row)["formal_statement"] == row["formal_statement"] + " by\n"


def test_a_math_prompt_asks_for_a_boxed_answer():
    assert (
        math_prompt("What is 1+1? ")
        == "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}."
    )


def _grpo(*args):
    return subprocess.run(
        [sys.executable, "-m", "grpo.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_a_lean_benchmark_without_lean_exits_2_before_sampling(tmp_path, monkeypatch):
    for name in ("GRPO_LEAN_PROJECT", "GRPO_LEAN_REPL", "GRPO_KIMINA_URL"):
        monkeypatch.delenv(name, raising=False)
    result = _grpo("eval", "minif2f", "--model", "tiny:deepseek_v3", "--out", str(tmp_path))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("grpo eval: error: Lean is not set up") and line.endswith(
        "or pass --dry-run to write the Lean files without checking them"
    )


def test_a_top_p_outside_0_1_exits_2_before_anything_starts(tmp_path):
    result = _grpo(
        "eval", "gsm8k", "--model", "tiny:deepseek_v3", "--top-p", "2", "--out", str(tmp_path / "e")
    )
    assert (result.returncode, result.stderr.strip()) == (
        2,
        "grpo eval: error: argument --top-p: 2: must be more than 0 and at most 1 (see grpo eval -h)",
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--dry-run"], "--dry-run: gsm8k has no Lean files to write (minif2f and proofnet have)"),
        (["--split", "tset"], "--split: {data} has no 'tset' rows (its splits: test)"),
        (
            ["--stop", "```", "--stop", ""],
            "--stop: an empty string would end every completion before its first token",
        ),
        (
            ["--engine-kwarg", "max_modl_len=64"],
            "--engine-kwarg max_modl_len: not an argument of vllm.LLM (did you mean max_model_len?)",
        ),
        (
            ["--engine-kwarg", "max_model_len"],
            "--engine-kwarg 'max_model_len': expected KEY=VALUE, e.g. max_model_len=4096",
        ),
        (
            ["--engine-kwarg", "max_model_len=512"],
            "--engine-kwarg max_model_len: 512 is more than the model's 256 positions "
            "(max_position_embeddings), which vLLM refuses; give at most that",
        ),
        (
            ["--temperature", "0"],
            "--n 32 at --temperature 0 samples one greedy completion 32 times, so pass@k would equal "
            "pass@1; give --temperature above 0, or --n 1 --k 1",
        ),
    ],
)
def test_a_math_eval_with_bad_options_exits_2_and_leaves_no_output_folder(tmp_path, options, message):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2", "split": "test"}\n')
    out = tmp_path / "eval"
    result = _grpo(
        "eval", "gsm8k", "--model", "tiny:deepseek_v3", "--data", str(data), "--out", str(out), *options
    )
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (
        2,
        "grpo eval: error: " + message.format(data=data),
    )
    assert not out.exists()


@pytest.fixture
def model(tmp_path):
    """A random tiny DeepSeek-V3 whose context fits benchmark prompts (long in characters)."""
    from grpo.models.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path / "model", max_position_embeddings=2048)


@needs_data
@pytest.mark.slow
def test_math500_eval_through_vllm_writes_a_report_and_resumes(tmp_path, model):
    out = tmp_path / "eval"
    common = [
        "eval",
        "math500",
        "--model",
        str(model),
        "--n",
        "2",
        "--k",
        "1,2",
        "--max-tokens",
        "16",
        "--out",
        str(out),
    ]
    first = _grpo(*common, "--limit", "20")
    assert first.returncode == 0, first.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert (report["problems"], report["problems_sampled_this_run"]) == (20, 20)
    assert 0.0 <= report["pass@1"] <= report["pass@2"] <= 1.0
    assert "| math500 | test | 20 | 2 |" in (out / "report.md").read_text()
    records = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert len(records[0]["completions"]) == 2 and records[0]["id"] == "test/precalculus/807.json"
    second = _grpo(*common, "--limit", "22")
    assert second.returncode == 0, second.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert (report["problems"], report["problems_sampled_this_run"]) == (22, 2)
    # a smaller --limit and other --k report on the finished problems afresh, sampling none
    third = _grpo(*[("1" if arg == "1,2" else arg) for arg in common], "--limit", "5")
    assert third.returncode == 0, third.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert (report["problems"], report["problems_sampled_this_run"]) == (5, 0)
    assert "pass@2" not in report and 0.0 <= report["pass@1"] <= 1.0
    # other sampling settings would report earlier samples as theirs
    fourth = _grpo(*common, "--limit", "22", "--temperature", "0.5")
    assert (fourth.returncode, fourth.stderr.strip()) == (
        2,
        f"grpo eval: error: --out {out}: holds problems sampled with other settings (temperature 1.0, "
        "not 0.5); give another --out, or move it away to start over",
    )


@needs_data
@pytest.mark.slow
def test_engine_kwargs_reach_the_engines_and_the_check_of_what_fits(tmp_path, model):
    """`--engine-kwarg max_model_len=32`: no MATH-500 prompt fits 32 tokens, so each counts as
    unsolved without a sample (the model's own context, 2048, holds them); the engines start with
    the argument, and the folder records it as a setting."""
    out = tmp_path / "eval"
    common = ["eval", "math500", "--model", str(model), "--n", "1", "--k", "1", "--temperature", "0"]
    result = _grpo(
        *common, "--limit", "2", "--max-tokens", "8", "--engine-kwarg", "max_model_len=32", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert (report["problems"], report["verification"]["verdicts"]) == (2, {"prompt_too_long": 2})
    assert json.loads((out / "settings.json").read_text())["engine_kwargs"] == {"max_model_len": 32}


@needs_data
@pytest.mark.slow
def test_a_dry_run_writes_the_lean_files_it_would_check(tmp_path, model):
    out = tmp_path / "eval"
    result = _grpo(
        "eval",
        "minif2f",
        "--model",
        str(model),
        "--n",
        "2",
        "--k",
        "1",
        "--limit",
        "2",
        "--max-tokens",
        "16",
        "--dry-run",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    written = sorted(Path(out / "lean").glob("*.lean")) if (out / "lean").exists() else []
    assert sum(v == "dry_run" for r in records for v in r["verdicts"]) == len(written)
    for path in written:
        text = path.read_text()
        assert text.startswith("import Mathlib\nimport Aesop\n") and "\n#print axioms " in text


def test_a_last_problem_record_cut_short_is_dropped_so_that_resuming_samples_it_again(tmp_path):
    from grpo.eval.run import finished_problems

    path = tmp_path / "problems.jsonl"
    path.write_text('{"id": "a", "correct": 1}\n{"id": "b", "corr')
    assert finished_problems(path) == [{"id": "a", "correct": 1}]
    assert path.read_text() == '{"id": "a", "correct": 1}\n'
    assert finished_problems(tmp_path / "none.jsonl") == []
    # whole JSON without its newline is cut short too: the next record appended would continue its line
    path.write_text('{"id": "a", "correct": 1}\n{"id": "b", "correct": 0}')
    assert finished_problems(path) == [{"id": "a", "correct": 1}]
    assert path.read_text() == '{"id": "a", "correct": 1}\n'


def test_resuming_needs_the_settings_the_folder_was_sampled_with(tmp_path):
    from grpo.eval.run import EvalArgs, check_resumable, settings

    (tmp_path / "m").mkdir()
    first = settings(EvalArgs("math500", str(tmp_path / "m"), n=8))
    check_resumable(tmp_path, first)  # nothing there yet
    (tmp_path / "settings.json").write_text(json.dumps(first))
    # a run that stopped before its first problem (its engine did not start, say) sampled nothing
    check_resumable(tmp_path, settings(EvalArgs("math500", "org/other-model", n=4)))
    (tmp_path / "problems.jsonl").write_text("")
    check_resumable(tmp_path, settings(EvalArgs("math500", "org/other-model", n=4)))
    (tmp_path / "problems.jsonl").write_text('{"id": "a"}\n')
    check_resumable(tmp_path, settings(EvalArgs("math500", f"{tmp_path}/../{tmp_path.name}/m", n=8, k=(1,))))
    with pytest.raises(ValueError) as error:
        check_resumable(tmp_path, settings(EvalArgs("math500", "org/other-model", n=4)))
    assert str(error.value) == (
        f"--out {tmp_path}: holds problems sampled with other settings (model '{tmp_path}/m', not "
        "'org/other-model'; n 8, not 4); give another --out, or move it away to start over"
    )
    # a folder sampled before --stop and --engine-kwarg existed: sampled as their defaults do
    (tmp_path / "settings.json").write_text(
        json.dumps({k: v for k, v in first.items() if k not in ("stop", "engine_kwargs")})
    )
    check_resumable(tmp_path, first)
    with pytest.raises(ValueError, match=r"\(stop \[\], not \['```'\]\)"):
        check_resumable(tmp_path, settings(EvalArgs("math500", str(tmp_path / "m"), n=8, stop=["```"])))
    (tmp_path / "settings.json").unlink()
    with pytest.raises(ValueError, match="holds a problems.jsonl without the settings.json"):
        check_resumable(tmp_path, first)


def test_a_bad_problem_record_before_the_last_line_is_an_error(tmp_path):
    from grpo.eval.run import finished_problems

    path = tmp_path / "problems.jsonl"
    path.write_text('{"id": "a"}\n{"no": "id"}\n{"id": "c"}\n')
    with pytest.raises(ValueError) as error:
        finished_problems(path)
    assert str(error.value) == f"{path}:2: not a problem's record; move the file away to start over"
    assert path.read_text() == '{"id": "a"}\n{"no": "id"}\n{"id": "c"}\n'


def test_a_data_file_of_another_benchmark_is_named_before_any_engine_starts(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"formal_statement": "theorem t : 1 = 1 := by", "split": "test"}\n')
    result = _grpo(
        "eval", "gsm8k", "--model", "tiny:deepseek_v3", "--data", str(data), "--out", str(tmp_path / "e")
    )
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (
        2,
        f"grpo eval: error: {data}: row 1 has no 'problem' or 'question' field, which gsm8k rows need",
    )
    assert not (tmp_path / "e").exists()


def test_chat_prompts_for_a_model_without_a_chat_template_stop_before_the_output_folder(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2", "split": "test"}\n')
    result = _grpo(
        "eval",
        "gsm8k",
        "--model",
        "tiny:deepseek_v3",
        "--data",
        str(data),
        "--chat",
        "--out",
        str(tmp_path / "e"),
    )
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (
        2,
        "grpo eval: error: --chat: the model's tokenizer has no chat template (a base model takes prompts "
        "as they are)",
    )
    assert not (tmp_path / "e").exists()


def test_a_system_prompt_without_chat_is_refused(tmp_path):
    result = _grpo("eval", "gsm8k", "--model", "tiny:deepseek_v3", "--system-prompt", "Be brief.")
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (
        2,
        "grpo eval: error: --system-prompt: only applies with --chat",
    )
