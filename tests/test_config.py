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


def test_several_held_out_samples_at_temperature_0_are_rejected():
    # mean@4 of one greedy completion repeated is its accuracy, at four times the sampling
    with pytest.raises(RecipeError) as error:
        recipe_from_dict({"model": {"path": "m"}, "eval": {"samples": 4, "temperature": 0}})
    assert str(error.value) == (
        "recipe: eval: samples: 4 at temperature 0 decodes one greedy completion 4 times; "
        "give temperature above 0, or samples: 1"
    )
    recipe_from_dict({"model": {"path": "m"}, "eval": {"samples": 4, "temperature": 0.7}})


def test_a_wrong_type_is_rejected():
    with pytest.raises(RecipeError, match=r"train\.steps: Input should be a valid integer"):
        recipe_from_dict({"model": {"path": "m"}, "train": {"steps": "many"}})


def test_a_sampler_correction_with_the_sampler_as_old_policy_is_refused():
    algorithm = {"old_policy": "sampler", "sampler_ratio_cap": 2.0}
    with pytest.raises(RecipeError) as error:
        recipe_from_dict({"model": {"path": "m"}, "algorithm": algorithm})
    assert str(error.value) == (
        "recipe: algorithm: sampler_ratio_cap: weights by pi_old / pi_vllm, which is 1 when "
        "old_policy is sampler; set one of the two"
    )


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"rewards": [{"name": "math", "weight": float("nan")}]},
            "rewards.0.weight: Input should be a finite number",
        ),
        ({"train": {"learning_rate": float("inf")}}, "train.learning_rate: Input should be a finite number"),
        ({"rewards": []}, "rewards: List should have at least 1 item after validation, not 0"),
        ({"run": {"name": "../x"}}, "run.name: '../x' is not one folder's name (no '/', '.' or '..')"),
        ({"run": {"name": ""}}, "run.name: '' is not one folder's name (no '/', '.' or '..')"),
        (
            {"rewards": [{"name": "a.py:score"}, {"name": "math"}, {"name": "b.py:score"}]},
            "rewards: a.py:score and b.py:score would both log as 'score'; give one function another name",
        ),
        (
            {"rewards": [{"name": "math"}, {"name": "math", "weight": 0.5}]},
            "rewards: math is listed twice (their metrics would merge)",
        ),
        (
            {"rewards": [{"name": "math", "weight": 0}]},
            "rewards: every weight is 0, so every advantage would be 0 and no step would learn",
        ),
    ],
)
def test_values_that_would_ruin_a_run_silently_are_rejected(section, message):
    with pytest.raises(RecipeError) as error:
        recipe_from_dict({"model": {"path": "m"}, **section})
    assert str(error.value) == f"recipe: {message}"


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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps=[", "--set 'train.steps=[': not a YAML value (while parsing a flow node)"),
        ("train.steps=many", "--set 'train.steps=many': train.steps: Input should be a valid integer, "),
        ("train.stepz=3", "--set 'train.stepz=3': train.stepz: unknown key"),
        (
            "data.prompt_template={q}",
            "--set 'data.prompt_template={q}': data.prompt_template: Input should be a valid string "
            "(YAML read the value as a mapping or list; quote it)",
        ),
        (
            "train.lora.targets=['']",
            "--set \"train.lora.targets=['']\": train.lora.targets.0: String should have at least 1 character",
        ),
        (
            "train.lora.targets=[]",
            "--set 'train.lora.targets=[]': train.lora.targets: List should have at least 1 item after "
            "validation, not 0\n",
        ),
    ],
)
def test_a_bad_override_is_named_rather_than_the_recipe(tmp_path, override, message):
    path = tmp_path / "r.yaml"
    path.write_text("model: {path: m}\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(path, [override])
    assert f"{error.value}\n".startswith(message)


def test_an_override_names_a_list_item_by_its_index(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {path: m}\nrewards: [{name: math}, {name: think_format, weight: 0.5}]\n")
    recipe = load_recipe(path, ["rewards.1.weight=0.1", "rewards.0.kwargs.timeout=3"])
    assert [(r.name, r.weight, r.kwargs) for r in recipe.rewards] == [
        ("math", 1.0, {"timeout": 3}),
        ("think_format", 0.1, {}),
    ]
    for index in ("2", "x", "-1"):
        with pytest.raises(RecipeError) as error:
            load_recipe(path, [f"rewards.{index}.weight=1"])
        assert str(error.value) == f"--set rewards.{index}.weight: no item '{index}' (the list has 2, from 0)"


def test_an_override_of_an_unknown_key_is_rejected(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {path: m}\n")
    with pytest.raises(RecipeError, match=r"train\.stpes: unknown key"):
        load_recipe(path, ["train.stpes=3"])


def test_a_missing_recipe_file_is_named():
    with pytest.raises(RecipeError, match=r"recipe not found: nope\.yaml"):
        load_recipe("nope.yaml")


def test_a_section_written_twice_is_refused_rather_than_the_first_dropped(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  path: tiny:deepseek_v3\ntrain: {steps: 2}\nmodel:\n  fp8: true\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert str(error.value) == f"{path}: not valid YAML (key 'model' twice in one mapping, lines 1 and 4)"


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "grpo.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_an_option_a_command_does_not_take_is_named_with_that_commands_help(capsys):
    from grpo.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["sft", "recipe.yaml", "--resume"])
    assert (exit_.value.code, capsys.readouterr().err) == (
        2,
        "grpo sft: error: unrecognized arguments: --resume (see grpo sft -h)\n",
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
    assert result.stderr.strip() == f"grpo train: error: model.path: no folder {tmp_path}/no-such-model"


def test_a_missing_relative_model_folder_is_named_with_where_it_was_looked_for(tmp_path, monkeypatch):
    from grpo.models.build import model_config

    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as error:
        model_config("runs/arithmetic-sft/final")
    assert str(error.value) == f"model.path: no folder runs/arithmetic-sft/final (relative to {tmp_path})"


def test_a_folder_whose_config_is_not_a_transformers_config_is_named(tmp_path):
    from grpo.models.build import model_config

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RecipeError) as error:
        model_config(str(tmp_path), key="--model")
    assert str(error.value) == (
        f"--model: {tmp_path}/config.json: Unrecognized model in {tmp_path}. "
        "Should have a `model_type` key in its config.json."
    )


def test_a_misspelt_built_in_model_names_the_one_built_in():
    from grpo.models.build import model_config

    with pytest.raises(RecipeError) as error:
        model_config("tiny:deepseek_v2")
    assert (
        str(error.value)
        == "model.path: no built-in model tiny:deepseek_v2; the one built in is tiny:deepseek_v3"
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


def test_the_parity_tolerance_follows_the_dtype_unless_given():
    def tolerance(model, train=None):
        return recipe_from_dict(
            {"model": {"path": "m", **model}, "train": train or {}}
        ).train.parity_tolerance

    assert tolerance({}) == 1e-3
    assert tolerance({"dtype": "bfloat16"}) == 2.0
    assert tolerance({"dtype": "bfloat16"}, {"parity_tolerance": 0.5}) == 0.5
    assert tolerance({}, {"parity_tolerance": 0.5}) == 0.5


def test_fp8_exclusions_need_fp8():
    with pytest.raises(RecipeError, match=r"^recipe: model: fp8_exclude: only applies with fp8: true$"):
        recipe_from_dict({"model": {"path": "m", "fp8_exclude": ["self_attn"]}})


def _cli_run(tmp_path, command: str, recipe: str):
    """`grpo COMMAND` on a recipe of the lines `recipe` whose runs go under `tmp_path`."""
    path = tmp_path / "r.yaml"
    path.write_text(f"{recipe}run: {{output_dir: {tmp_path}}}\n")
    return _cli(command, str(path))


def test_the_cli_exits_2_on_an_fp8_exclusion_that_names_no_layer(tmp_path):
    recipe = "model: {path: 'tiny:deepseek_v3', fp8: true, fp8_exclude: [self_attn, slf_attn]}\n"
    result = _cli_run(tmp_path, "train", recipe)
    assert (result.returncode, result.stderr.strip()) == (
        2,
        "grpo train: error: model.fp8_exclude: 'slf_attn' names no layer that FP8 would convert",
    )
    assert not (tmp_path / "run").exists()


def test_the_cli_exits_2_when_the_experts_do_not_split_over_the_expert_parallel_ranks(tmp_path):
    recipe = "model: {path: 'tiny:deepseek_v3'}\ntrain: {expert_parallel_size: 3}\n"
    result = _cli_run(tmp_path, "train", recipe)
    assert (result.returncode, result.stderr.strip()) == (
        2,
        "grpo train: error: train.expert_parallel_size: 8 experts do not split evenly over 3 expert-parallel ranks",
    )
    assert not (tmp_path / "run").exists()


def test_moe_options_that_transformers_blocks_would_ignore_are_refused():
    for key, value in (
        ("expert_parallel_size", 2),
        ("routing_bias_gamma", 0.001),
        ("balance_loss_alpha", 0.01),
    ):
        tree = {"model": {"path": "tiny:deepseek_v3", "moe": "transformers"}, "train": {key: value}}
        with pytest.raises(RecipeError) as error:
            recipe_from_dict(tree, "r.yaml")
        assert str(error.value) == f"r.yaml: train.{key}: needs model.moe: grouped"
    tree["train"] = {"routing_bias_gamma": 0.0}  # off is fine
    assert recipe_from_dict(tree).model.moe == "transformers"


def test_an_expert_parallel_size_that_divides_the_experts_passes_the_model_check():
    from grpo.models.build import check_model

    model = recipe_from_dict({"model": {"path": "tiny:deepseek_v3"}}).model
    for ranks in (1, 2, 4, 8):
        check_model(model, ranks)
    with pytest.raises(
        RecipeError, match=r"^train\.expert_parallel_size: 8 experts do not split evenly over 16"
    ):
        check_model(model, 16)


EARLIER_RUN = {name: f"earlier {name}\n" for name in ("config.yaml", "metrics.jsonl", "summary.json")}


def _earlier_run(tmp_path) -> Path:
    """A run folder as an earlier run left it."""
    run = tmp_path / "run"
    run.mkdir()
    for name, text in EARLIER_RUN.items():
        (run / name).write_text(text)
    return run


def _files(folder: Path) -> dict[str, str]:
    return {path.name: path.read_text() for path in folder.iterdir()}


def test_a_train_run_with_an_unknown_reward_leaves_an_earlier_run_of_its_name_as_it_was(tmp_path):
    run = _earlier_run(tmp_path)
    result = _cli_run(tmp_path, "train", "model: {path: 'tiny:deepseek_v3'}\nrewards: [{name: math_boxd}]\n")
    assert result.returncode == 2
    assert result.stderr.startswith("grpo train: error: unknown reward 'math_boxd'")
    assert _files(run) == EARLIER_RUN


def test_an_sft_run_with_a_missing_data_file_leaves_an_earlier_run_of_its_name_as_it_was(tmp_path):
    run = _earlier_run(tmp_path)
    recipe = f"model: {{path: 'tiny:deepseek_v3'}}\ndata: {{source: {tmp_path}/missing.jsonl}}\n"
    result = _cli_run(tmp_path, "sft", recipe)
    assert (result.returncode, result.stderr.strip()) == (
        2,
        f"grpo sft: error: data file not found: {tmp_path}/missing.jsonl",
    )
    assert _files(run) == EARLIER_RUN


@pytest.mark.parametrize("command", ["sft", "train"])
def test_continuing_from_a_runs_own_checkpoint_under_its_name_is_refused_before_its_folder_is_touched(
    tmp_path, command
):
    run = _earlier_run(tmp_path)
    result = _cli_run(tmp_path, command, f"model: {{path: {run}/final}}\n")
    assert (result.returncode, result.stderr.strip()) == (
        2,
        f"grpo {command}: error: model.path: {run}/final is inside {run}, the folder of run 'run', "
        "which a run clears when it starts: give run.name another name",
    )
    assert _files(run) == EARLIER_RUN


@pytest.mark.parametrize("command", ["sft", "train"])
def test_chat_prompts_for_a_model_without_a_chat_template_stop_before_the_run_folder(tmp_path, command):
    run = _earlier_run(tmp_path)
    result = _cli_run(tmp_path, command, "model: {path: 'tiny:deepseek_v3'}\ndata: {chat: true}\n")
    assert (result.returncode, result.stderr.strip()) == (
        2,
        f"grpo {command}: error: data.chat: the model's tokenizer has no chat template (a base model "
        "takes prompts as they are)",
    )
    assert _files(run) == EARLIER_RUN


def test_a_max_model_len_past_the_positions_is_left_to_vllm_where_its_limit_is_not_plain(monkeypatch):
    from grpo.models.build import check_max_model_len, model_config

    config = model_config("tiny:deepseek_v3")
    check_max_model_len(config, {"max_model_len": 256}, "k")
    with pytest.raises(RecipeError, match=r"^k: 257 is more than the model's 256 positions"):
        check_max_model_len(config, {"max_model_len": 257}, "k")
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    check_max_model_len(config, {"max_model_len": 257}, "k")
    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN")
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    check_max_model_len(config, {"max_model_len": 257}, "k")


def test_a_train_run_whose_prompts_are_all_too_long_for_the_engines_leaves_an_earlier_run_as_it_was(
    tmp_path,
):
    run = _earlier_run(tmp_path)
    (tmp_path / "rows.jsonl").write_text('{"prompt": "12+34=", "answer": "46"}\n')
    recipe = (
        "model: {path: 'tiny:deepseek_v3'}\nrollout: {engine_kwargs: {max_model_len: 6}}\n"
        f"data: {{source: {tmp_path}/rows.jsonl, eval_source: {tmp_path}/rows.jsonl}}\n"
    )
    result = _cli_run(tmp_path, "train", recipe)
    # one token a character in the tiny model's tokenizer: 6 tokens leave no room to answer
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (
        2,
        "grpo train: error: data.eval_source: all 1 rows are too long for the model's context (its "
        "max_position_embeddings, or rollout.engine_kwargs.max_model_len for grpo train's engines)",
    )
    assert _files(run) == EARLIER_RUN


def test_a_ray_cluster_to_join_that_is_not_there_is_named_and_an_earlier_run_kept(tmp_path):
    run = _earlier_run(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{path: 'tiny:deepseek_v3'}}\nrun: {{output_dir: {tmp_path}}}\n")
    result = _cli("train", str(path), "--ray-address", "127.0.0.1:1")  # Ray would retry it for minutes
    assert (result.returncode, result.stderr.strip()) == (
        2,
        "grpo train: error: --ray-address 127.0.0.1:1: nothing answers there (Connection refused)",
    )
    assert _files(run) == EARLIER_RUN


@pytest.mark.parametrize(
    ("engine_kwargs", "message"),
    [
        (
            "{gpu_memory_utilisation: 0.5}",
            "rollout.engine_kwargs.gpu_memory_utilisation: not an argument of vllm.LLM "
            "(did you mean gpu_memory_utilization?)",
        ),
        (
            "{max_model_len: 257}",
            "rollout.engine_kwargs.max_model_len: 257 is more than the model's 256 positions "
            "(max_position_embeddings), which vLLM refuses; give at most that",
        ),
    ],
)
def test_an_engine_argument_vllm_would_refuse_is_named_before_the_run_folder_is_touched(
    tmp_path, engine_kwargs, message
):
    run = _earlier_run(tmp_path)
    recipe = f"model: {{path: 'tiny:deepseek_v3'}}\nrollout: {{engine_kwargs: {engine_kwargs}}}\n"
    result = _cli_run(tmp_path, "train", recipe)
    assert (result.returncode, result.stderr.strip()) == (2, f"grpo train: error: {message}")
    assert _files(run) == EARLIER_RUN


def test_an_sft_run_refuses_grpo_train_s_keys_instead_of_ignoring_them(tmp_path):
    run = _earlier_run(tmp_path)
    recipe = "model: {path: 'tiny:deepseek_v3'}\ntrain: {expert_parallel_size: 2}\n"
    result = _cli_run(tmp_path, "sft", recipe)
    assert (result.returncode, result.stderr.strip()) == (
        2,
        "grpo sft: error: train.expert_parallel_size: grpo train's, not grpo sft's (grpo sft reads sft.* "
        "and train.threads, train.bf16_moments, train.routing_bias_gamma, train.balance_loss_alpha, "
        "train.gradient_checkpointing, train.fp8_warm_up)",
    )
    assert _files(run) == EARLIER_RUN


def test_grpo_sft_takes_its_own_train_keys_and_a_recipe_it_wrote_itself(tmp_path):
    from grpo.config import dump_recipe
    from grpo.sft import check_train_keys

    tree = {"model": {"path": "tiny:deepseek_v3", "dtype": "bfloat16"}, "train": {"learning_rate": 1e-4}}
    with pytest.raises(RecipeError, match=r"^train\.learning_rate: grpo train's, not grpo sft's"):
        check_train_keys(recipe_from_dict(tree))
    with pytest.raises(RecipeError, match=r"^run\.tensorboard: grpo train's, not grpo sft's"):
        check_train_keys(recipe_from_dict({"model": {"path": "m"}, "run": {"tensorboard": True}}))
    tree["train"] = {
        "threads": 2,
        "bf16_moments": True,
        "routing_bias_gamma": 0.001,
        "fp8_warm_up": True,
        "steps": 20,
    }
    recipe = recipe_from_dict(tree)
    check_train_keys(recipe)  # steps: 20 is the default
    dump_recipe(recipe, tmp_path / "config.yaml")  # every key written, parity_tolerance filled in by dtype
    check_train_keys(load_recipe(tmp_path / "config.yaml"))


def test_an_sft_run_on_rows_without_completions_stops_before_writing(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n')
    recipe = (
        f"model: {{path: 'tiny:deepseek_v3'}}\ndata: {{source: {data}, prompt_template: '{{question}}'}}\n"
    )
    result = _cli_run(tmp_path, "sft", recipe)
    assert (result.returncode, result.stderr.strip()) == (
        2,
        "grpo sft: error: sft: data rows need a 'completion' field (the row of prompt '1+1' has none)",
    )
    assert not (tmp_path / "run").exists()


def test_a_run_starts_from_a_folder_without_the_earlier_runs_outputs(tmp_path):
    from grpo.config import start_run_folder

    run = tmp_path / "run"
    for name in (
        "checkpoints/step-40/model.safetensors",
        "final/config.json",
        "init/config.json",
        "tensorboard/e",
    ):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("earlier")
    for name in ("summary.json", "metrics.jsonl", "curves.png", "eval_before.jsonl", "eval_step40.jsonl"):
        (run / name).write_text("earlier")
    (run / "notes.txt").write_text("the user's")
    recipe = recipe_from_dict({"model": {"path": "tiny:deepseek_v3"}, "run": {"output_dir": str(tmp_path)}})
    assert start_run_folder(recipe) == run
    assert sorted(path.name for path in run.iterdir()) == ["config.yaml", "notes.txt"]
    assert load_recipe(run / "config.yaml") == recipe


def test_a_model_inside_the_run_folder_it_would_clear_is_refused(tmp_path):
    from grpo.config import check_model_outside_run

    def recipe(model: str):
        return recipe_from_dict({"model": {"path": model}, "run": {"name": "x", "output_dir": str(tmp_path)}})

    with pytest.raises(RecipeError) as error:
        check_model_outside_run(recipe(f"{tmp_path}/x/checkpoints/final"))
    assert str(error.value) == (
        f"model.path: {tmp_path}/x/checkpoints/final is inside {tmp_path}/x, the folder of run 'x', "
        "which a run clears when it starts: give run.name another name"
    )
    with pytest.raises(RecipeError):
        check_model_outside_run(recipe(f"{tmp_path}/other/../x/final"))
    check_model_outside_run(recipe(f"{tmp_path}/x2/final"))
    check_model_outside_run(recipe("tiny:deepseek_v3"))


def test_an_output_folder_that_cannot_be_made_is_named(tmp_path):
    from grpo.config import output_folder

    (tmp_path / "a-file").write_text("")
    with pytest.raises(RecipeError) as error:
        output_folder(tmp_path / "a-file" / "runs", "run.output_dir")
    assert str(error.value) == f"run.output_dir: cannot create {tmp_path}/a-file/runs (Not a directory)"


def test_the_cli_exits_2_on_a_run_folder_it_cannot_make(tmp_path):
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{path: 'tiny:deepseek_v3'}}\nrun: {{output_dir: {tmp_path}/a-file}}\n")
    result = _cli("sft", str(path))
    assert (result.returncode, result.stderr.strip()) == (
        2,
        f"grpo sft: error: run.output_dir: cannot create {tmp_path}/a-file/run (Not a directory)",
    )


def test_a_missing_model_is_named_by_the_option_that_gave_it(tmp_path):
    from grpo.models.build import materialize

    with pytest.raises(RecipeError, match=rf"^--model: {tmp_path}/none has no config\.json"):
        (tmp_path / "none").mkdir()
        materialize(str(tmp_path / "none"), tmp_path / "scratch", key="--model")


def test_a_run_folder_given_as_a_model_points_to_its_checkpoint(tmp_path):
    from grpo.models.build import model_config

    (tmp_path / "run" / "checkpoints" / "final").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "final" / "config.json").write_text("{}")
    with pytest.raises(RecipeError) as error:
        model_config(str(tmp_path / "run"), key="--model")
    assert str(error.value) == (
        f"--model: {tmp_path}/run has no config.json (not a Hugging Face folder; "
        f"the run's model is {tmp_path}/run/checkpoints/final)"
    )


def test_resampling_without_dropping_tied_groups_is_refused():
    with pytest.raises(RecipeError) as error:
        recipe_from_dict({"model": {"path": "m"}, "algorithm": {"resample_rounds": 2}})
    assert str(error.value) == (
        "recipe: algorithm: resample_rounds: replaces the tied groups drop_tied_groups "
        "leaves out; set drop_tied_groups: true"
    )


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"model": {"path": "m", "fp8": True}, "train": {"lora": {"rank": 8}}},
            "train.lora: the FP8 layers take no LoRA adapters; set model.fp8: false",
        ),
        (
            {"model": {"path": "m"}, "train": {"lora": {}, "expert_parallel_size": 2}},
            "train.lora: not with expert_parallel_size above 1 (the adapters are not sharded)",
        ),
        (
            {"model": {"path": "m"}, "train": {"lora": {"rank": 0}}},
            "train.lora.rank: Input should be greater than",
        ),
    ],
)
def test_lora_where_it_cannot_apply_is_refused(section, message):
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(section)
    assert str(error.value).startswith(f"recipe: {message}")


def test_lora_targets_that_name_no_linear_layer_are_refused_before_the_run_folder(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        f"model: {{path: 'tiny:deepseek_v3'}}\nrun: {{name: r, output_dir: {tmp_path}}}\n"
        "train: {lora: {targets: [q_b_proj, kv_b_prj]}}\n"  # one of the two misspelt
    )
    result = _cli("train", str(path))
    assert (result.returncode, result.stderr.strip()) == (
        2,
        "grpo train: error: train.lora.targets: no linear layer of the model is named kv_b_prj (its linear "
        "layers: down_proj, gate_proj, kv_a_proj_with_mqa, kv_b_proj, lm_head, o_proj, q_a_proj, q_b_proj, "
        "up_proj)",
    )
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("algorithm", "message"),
    [
        ({"ratio_level": "sentence"}, "algorithm.ratio_level: Input should be 'token' or 'sequence'"),
        (
            {"sampler_ratio_cap": 0.5},
            "algorithm.sampler_ratio_cap: Input should be greater than or equal to 1",
        ),
    ],
)
def test_gspo_and_the_sampler_correction_take_only_values_that_mean_something(algorithm, message):
    with pytest.raises(RecipeError) as error:
        recipe_from_dict({"model": {"path": "m"}, "algorithm": algorithm})
    assert str(error.value) == f"recipe: {message}"


@pytest.mark.parametrize(
    ("train", "message"),
    [
        (
            {"steps": 10, "lr_warmup_steps": 10},
            "train.lr_warmup_steps: 10 is not below train.steps (10), so no step would train at "
            "train.learning_rate",
        ),
        ({"lr_min_ratio": 0.1}, "train.lr_min_ratio: needs train.lr_schedule: linear or cosine"),
        ({"lr_schedule": "step"}, "train.lr_schedule: Input should be 'constant', 'linear' or 'cosine'"),
        ({"micro_batch_tokens": 0}, "train.micro_batch_tokens: Input should be greater than or equal to 1"),
    ],
)
def test_a_learning_rate_schedule_that_would_not_do_what_it_says_is_refused(train, message):
    with pytest.raises(RecipeError) as error:
        recipe_from_dict({"model": {"path": "m"}, "train": train})
    assert str(error.value) == f"recipe: {message}"


def test_an_empty_stop_string_is_refused():
    with pytest.raises(RecipeError) as error:
        recipe_from_dict({"model": {"path": "m"}, "rollout": {"stop": ["```", ""]}})
    assert str(error.value) == "recipe: rollout.stop.1: String should have at least 1 character"
