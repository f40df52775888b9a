import itertools

from grpo.tasks.arithmetic import problems, reduction_steps, solution_text, split_of


def test_multiplication_goes_first_then_left_to_right():
    assert reduction_steps("7+3*4-2") == ["7+12-2", "19-2", "17"]
    assert reduction_steps("9-2-3") == ["7-3", "4"]


def test_negative_intermediate_results_render_plainly():
    assert reduction_steps("3-8*2+1") == ["3-16+1", "-13+1", "-12"]


def test_solutions_end_in_a_boxed_answer_or_a_plain_one():
    assert solution_text("5*5") == "5*5 = 25. \\boxed{25}"
    assert solution_text("5*5", boxed=False) == "5*5 = 25."


def test_train_and_eval_problems_never_share_an_expression():
    train = {row["expression"] for row in itertools.islice(problems("train", 0), 3000)}
    held_out = {row["expression"] for row in itertools.islice(problems("eval", 1), 300)}
    assert train.isdisjoint(held_out)
    assert all(split_of(e) == "eval" for e in held_out)


def test_single_operations_are_never_held_out():
    assert {split_of(f"{a}{op}{b}") for a in range(1, 10) for b in range(1, 10) for op in "+-*"} == {"train"}


def test_problem_answers_are_the_final_reduction():
    row = next(problems("train", 0))
    assert row["answer"] == reduction_steps(row["expression"])[-1]
    assert row["prompt"] == f"Q: {row['expression']}\nA: "
