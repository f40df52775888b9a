import subprocess
import sys
from pathlib import Path

import pytest

from grpo.config import RecipeError, load_recipe, recipe_from_dict

RECIPES = sorted(Path("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    load_recipe(path)


def test_an_unknown_key_is_rejected_by_name():
    with pytest.raises(RecipeError, match=r"^recipe: algorithm\.bogus: unknown key$"):
        recipe_from_dict({"model": {"path": "m"}, "algorithm": {"bogus": 1}})


def test_a_group_size_below_two_is_rejected():
    with pytest.raises(RecipeError, match=r"rollout\.group_size: Input should be greater than or equal to 2"):
        recipe_from_dict({"model": {"path": "m"}, "rollout": {"group_size": 1}})


def test_a_wrong_type_is_rejected():
    with pytest.raises(RecipeError, match=r"train\.steps: Input should be a valid integer"):
        recipe_from_dict({"model": {"path": "m"}, "train": {"steps": "many"}})


def test_an_unknown_advantage_names_the_choices():
    with pytest.raises(
        RecipeError, match=r"advantage: unknown 'ppo', use one of \['dr_grpo', 'grpo', 'rloo'\]"
    ):
        recipe_from_dict({"model": {"path": "m"}, "algorithm": {"advantage": "ppo"}})


def test_overrides_are_parsed_as_yaml_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {path: m}\n")
    recipe = load_recipe(
        path, ["train.steps=3", "rollout.temperature=0.5", "algorithm.drop_tied_groups=true"]
    )
    assert (recipe.train.steps, recipe.rollout.temperature, recipe.algorithm.drop_tied_groups) == (
        3,
        0.5,
        True,
    )


def test_an_override_of_an_unknown_key_is_rejected(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {path: m}\n")
    with pytest.raises(RecipeError, match=r"train\.stpes: unknown key"):
        load_recipe(path, ["train.stpes=3"])


def test_a_missing_recipe_file_is_named():
    with pytest.raises(RecipeError, match=r"recipe not found: nope\.yaml"):
        load_recipe("nope.yaml")


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "grpo.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_the_cli_exits_2_with_one_line_on_a_bad_recipe_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {path: m}\nrollout: {group_size: 1}\n")
    result = _cli("train", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"grpo train: error: {path}: rollout.group_size: Input should be greater than or equal to 2"
    ]


def test_the_cli_exits_2_on_a_missing_recipe():
    result = _cli("train", "missing.yaml")
    assert (result.returncode, result.stderr.strip()) == (
        2,
        "grpo train: error: recipe not found: missing.yaml",
    )


def test_the_cli_exits_2_on_a_missing_model(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{path: {tmp_path}/no-such-model}}\nrun: {{output_dir: {tmp_path}}}\n")
    result = _cli("train", str(path))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(
        f"grpo train: error: model.path: {tmp_path}/no-such-model is neither a folder nor a loadable model id"
    )


def test_tiny_overrides_only_apply_to_the_tiny_model():
    with pytest.raises(
        RecipeError, match=r"^recipe: model: tiny_overrides: only applies to path tiny:deepseek_v3$"
    ):
        recipe_from_dict({"model": {"path": "some/folder", "tiny_overrides": {"hidden_size": 256}}})


def test_a_misspelt_tiny_override_is_named_at_load():
    with pytest.raises(
        RecipeError, match=r"^recipe: model: tiny_overrides\.hiden_size: not a DeepseekV3Config field$"
    ):
        recipe_from_dict({"model": {"path": "tiny:deepseek_v3", "tiny_overrides": {"hiden_size": 256}}})


def test_a_tiny_override_of_the_wrong_kind_is_named_at_load():
    with pytest.raises(
        RecipeError, match=r"^recipe: model: tiny_overrides\.hidden_size: expected int, got '512'$"
    ):
        recipe_from_dict({"model": {"path": "tiny:deepseek_v3", "tiny_overrides": {"hidden_size": "512"}}})


def test_tiny_overrides_of_the_right_kinds_load():
    overrides = {"hidden_size": 256, "routed_scaling_factor": 2, "scoring_func": "softmax"}
    recipe = recipe_from_dict({"model": {"path": "tiny:deepseek_v3", "tiny_overrides": overrides}})
    assert recipe.model.tiny_overrides == overrides


def test_fp8_exclusions_need_fp8():
    with pytest.raises(RecipeError, match=r"^recipe: model: fp8_exclude: only applies with fp8: true$"):
        recipe_from_dict({"model": {"path": "m", "fp8_exclude": ["self_attn"]}})


def test_the_cli_exits_2_on_an_fp8_exclusion_that_names_no_layer(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "model: {path: 'tiny:deepseek_v3', fp8: true, fp8_exclude: [self_attn, slf_attn]}\n"
        f"run: {{output_dir: {tmp_path}}}\n"
    )
    result = _cli("train", str(path))
    # what precedes the error is transformers' progress bar writing the tiny model
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (
        2,
        "grpo train: error: model.fp8_exclude: 'slf_attn' names no layer that FP8 would convert",
    )
