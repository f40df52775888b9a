import pytest
from grpo.rewards.format import has_boxed, overlong_penalty, think_format


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>a</think> \\boxed{1}", 1.0),
        ("<think>a</think>", 0.0),
        ("<think>a</think><think>b</think> 1", 0.0),
        ("1 <think>a</think> 1", 0.0),
        ("<think>a</think>b</think> 1", 0.0),
        ("<think>a</think> 1 </think>", 0.0),
        ("  <think>\na\n</think>\n\n1", 1.0),
    ],
)
def test_think_format_wants_one_think_block_then_an_answer(completion, expected):
    assert think_format(completion, {}) == expected


def test_has_boxed_ignores_correctness():
    assert (has_boxed(r"\boxed{wrong}", {}), has_boxed("none", {})) == (1.0, 0.0)


@pytest.mark.parametrize(
    ("tokens", "expected"), [(700, 0.0), (768, 0.0), (832, -0.25), (1024, -1.0), (2000, -1.0)]
)
def test_overlong_penalty_ramps_linearly_in_the_buffer(tokens, expected):
    assert overlong_penalty("", {"completion_tokens": tokens}, max_tokens=1024, buffer=256) == expected


def test_overlong_penalty_without_a_buffer_is_a_hard_cut():
    lengths = (1024, 1025)
    assert [overlong_penalty("", {"completion_tokens": n}, max_tokens=1024, buffer=0) for n in lengths] == [
        0.0,
        -1.0,
    ]


def test_overlong_penalty_without_a_token_count_says_where_it_comes_from():
    with pytest.raises(ValueError) as error:
        overlong_penalty("a completion scored offline", {"answer": "4"})
    assert (
        str(error.value)
        == "the sample has no 'completion_tokens' (runs add it; offline, give it in each line)"
    )
