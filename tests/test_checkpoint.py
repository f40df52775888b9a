"""Resuming a run (`grpo train --resume`): which checkpoint is taken, what of the run folder stays,
and that a trainer resumed from a checkpoint takes the same next step as the one that kept going."""

import json
import subprocess
import sys

import pytest
import torch

from grpo.config import RecipeError, dump_recipe, recipe_from_dict
from grpo.models.build import materialize
from grpo.trainer.checkpoint import (
    ResumePoint,
    begin_checkpoint,
    continue_run_folder,
    end_checkpoint,
    resume_point,
    trainer_state_files,
)
from grpo.trainer.policy_trainer import PolicyTrainer, RolloutBatch


def _recipe(tmp_path, **train):
    return recipe_from_dict(
        {
            "run": {"name": "r", "output_dir": str(tmp_path)},
            "model": {"path": "tiny:deepseek_v3"},
            "train": {"steps": 4, **train},
        }
    )


def _run_folder(recipe, checkpoints: dict[str, int | None]):
    """A run folder as a run leaves it: its config, and checkpoints marked resumable at a step (None:
    one whose writing was cut short)."""
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True)
    dump_recipe(recipe, run_dir / "config.yaml")
    for name, step in checkpoints.items():
        path = run_dir / "checkpoints" / name
        path.mkdir(parents=True)
        if step is not None:
            for file in trainer_state_files(recipe, path):
                file.parent.mkdir(exist_ok=True)
                file.write_bytes(b"")
            end_checkpoint(ResumePoint(path, step, {"accuracy": 0.25}, rows_drawn=8 * step + 1))
    return run_dir


def test_the_latest_complete_checkpoint_is_taken(tmp_path):
    recipe = _recipe(tmp_path)
    run_dir = _run_folder(recipe, {"step-1": 1, "step-2": 2, "step-3": None})
    point = resume_point(recipe)
    assert point == ResumePoint(run_dir / "checkpoints" / "step-2", 2, {"accuracy": 0.25}, 17)


def test_a_checkpoint_being_rewritten_is_not_resumable(tmp_path):
    recipe = _recipe(tmp_path)
    run_dir = _run_folder(recipe, {"step-1": 1, "step-2": 2})
    begin_checkpoint(run_dir / "checkpoints" / "step-2")
    assert resume_point(recipe).step == 1


def test_a_finished_run_resumes_from_final_only_with_more_steps(tmp_path):
    recipe = _recipe(tmp_path)
    _run_folder(recipe, {"step-2": 2, "final": 4})
    with pytest.raises(RecipeError) as error:
        resume_point(recipe)
    assert str(error.value) == (
        f"--resume: {tmp_path}/r/checkpoints/final is step 4, and train.steps is 4; "
        "raise train.steps to train further"
    )
    recipe.train.steps = 6
    assert resume_point(recipe).checkpoint.name == "final"


@pytest.mark.parametrize(
    ("train", "removed"),
    [
        ({}, "optimizer-rank0.pt"),
        ({"expert_parallel_size": 2}, "optimizer-rank1.pt"),
        ({"lora": {}}, "adapter.safetensors"),
    ],
)
def test_a_checkpoint_whose_trainer_state_was_removed_is_named(tmp_path, train, removed):
    recipe = _recipe(tmp_path, **train)
    run_dir = _run_folder(recipe, {"step-1": 1, "step-2": 2})
    (run_dir / "checkpoints" / "step-2" / "trainer_state" / removed).unlink()
    with pytest.raises(RecipeError) as error:
        resume_point(recipe)
    assert str(error.value) == (
        f"--resume: {run_dir}/checkpoints/step-2 lacks trainer_state/{removed} (remove that checkpoint "
        "folder to resume from an earlier one)"
    )


def test_resuming_with_other_settings_is_refused(tmp_path):
    _run_folder(_recipe(tmp_path), {"step-2": 2})
    with pytest.raises(RecipeError) as error:
        resume_point(_recipe(tmp_path, learning_rate=1e-3, steps=8))
    assert str(error.value) == (
        f"--resume: {tmp_path}/r was trained with other settings (train.learning_rate 1e-05, not "
        "0.001); only train.steps may change (give run.name another name to start a new run)"
    )


def test_a_run_written_before_a_recipe_key_existed_resumes_with_that_keys_default(tmp_path):
    import yaml

    run_dir = _run_folder(_recipe(tmp_path), {"step-2": 2})
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    del written["train"]["lr_schedule"], written["algorithm"]["kl_estimator"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(written))
    assert resume_point(_recipe(tmp_path, steps=8)).step == 2
    with pytest.raises(RecipeError, match=r"\(train\.lr_schedule 'constant', not 'cosine'\)"):
        resume_point(_recipe(tmp_path, steps=8, lr_schedule="cosine"))


def test_a_folder_without_a_resumable_checkpoint_is_refused(tmp_path):
    recipe = _recipe(tmp_path)
    with pytest.raises(
        RecipeError, match=r"--resume: .*/r holds no run to resume \(no readable config.yaml\)"
    ):
        resume_point(recipe)
    _run_folder(recipe, {"step-2": None})
    with pytest.raises(RecipeError) as error:
        resume_point(recipe)
    assert str(error.value) == (
        f"--resume: {tmp_path}/r has no checkpoint to resume from (train.checkpoint_interval: N "
        "writes one every N steps)"
    )


def test_the_run_folder_is_put_back_to_the_checkpoints_step(tmp_path):
    recipe = _recipe(tmp_path)
    run_dir = _run_folder(recipe, {"step-2": 2, "step-4": None, "step-12": None})
    lines = [json.dumps({"step": step}) for step in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "los')
    for name in ("eval_before.jsonl", "eval_step2.jsonl", "eval_step3.jsonl", "eval_after.jsonl"):
        (run_dir / name).write_text("{}\n")
    (run_dir / "summary.json").write_text("{}")
    continue_run_folder(recipe, resume_point(recipe))
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoints",
        "config.yaml",
        "eval_before.jsonl",
        "eval_step2.jsonl",
        "metrics.jsonl",
    ]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-2"]


def test_the_cli_refuses_to_resume_a_run_that_was_never_started(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{path: 'tiny:deepseek_v3'}}\nrun: {{name: r, output_dir: {tmp_path}}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "grpo.cli", "train", str(path), "--resume"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stderr.strip()) == (
        2,
        f"grpo train: error: --resume: {tmp_path}/r holds no run to resume (no readable config.yaml)",
    )
    assert not (tmp_path / "r").exists()


def _batch(seed: int) -> RolloutBatch:
    generator = torch.Generator().manual_seed(seed)

    def ids(length):
        return torch.randint(1, 20, (length,), generator=generator).tolist()

    prompts, completions = [ids(4), ids(3), ids(5)], [ids(6), ids(2), ids(8)]
    return RolloutBatch(prompts, completions, [1.0, -0.5, -0.5], [[] for _ in prompts])


@pytest.mark.parametrize(
    "precision",
    [
        {"model": {"dtype": "float32"}, "train": {"bf16_moments": False}},
        # BF16 parameters with FP32 masters: torch's own loader would round the masters to BF16
        {"model": {"dtype": "bfloat16"}, "train": {"bf16_moments": True}},
        {"model": {"dtype": "bfloat16", "fp8": True}, "train": {"bf16_moments": True}},
    ],
    ids=["fp32-adamw", "bf16-masters", "fp8"],
)
def test_a_trainer_resumed_from_a_checkpoint_takes_the_step_the_first_one_would_have(tmp_path, precision):
    model_path = materialize("tiny:deepseek_v3", tmp_path / "init")
    recipe = {
        "model": {"path": model_path, **precision["model"]},
        # the KL term reads the reference, which must stay the run's start, not the checkpoint
        "algorithm": {"beta": 0.1},
        "train": {"learning_rate": 1e-2, "routing_bias_gamma": 0.01, **precision["train"]},
    }
    first = PolicyTrainer(model_path, recipe, pad_id=0)
    first.train_step(_batch(1), 1)
    checkpoint = str(tmp_path / "step-1")
    first.save(checkpoint, model_path)
    first.save_training_state(checkpoint)
    expected = first.train_step(_batch(2), 2)

    resumed = PolicyTrainer(model_path, recipe, pad_id=0, resume_from=checkpoint)
    got = resumed.train_step(_batch(2), 2)
    assert got["kl"] > 0 and got["kl"] == expected["kl"]
    assert got["loss"] == expected["loss"]
    state, expected_state = resumed._state(), first._state()
    assert [name for name in expected_state if not torch.equal(state[name], expected_state[name])] == []


def test_the_closing_line_of_a_resumed_run_counts_the_steps_it_ran():
    from grpo.orchestrator import before_after_table

    summary = {
        "steps": 130,
        "resumed_after_step": 120,
        "wall_time_s": 112.4,
        "final_checkpoint": "runs/x/checkpoints/final",
        "eval_temperature": 0.0,
        "eval_samples_per_prompt": 1,
        "eval_accuracy_before": 0.05,
        "eval_accuracy_after": 0.164,
        "prompts_left_out_too_long": {"train": 0, "eval": 0},
    }
    assert before_after_table(summary).splitlines() == [
        f"{'':36}  before   after",
        f"{'held-out accuracy (greedy)':36}   0.050   0.164",
        "10 GRPO steps (121-130, resumed) in 112 s; checkpoint: runs/x/checkpoints/final",
    ]
    assert before_after_table({**summary, "resumed_after_step": None}).splitlines()[-1] == (
        "130 GRPO steps in 112 s; checkpoint: runs/x/checkpoints/final"
    )


def test_a_lora_trainer_trains_only_its_adapters_and_exports_the_merged_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    from grpo.models.build import converters_for, load_policy

    model_path = materialize("tiny:deepseek_v3", tmp_path / "init")
    recipe = {
        "model": {"path": model_path},
        # the KL reference is the policy with its adapters off and its starting routing biases
        "algorithm": {"beta": 0.1},
        "train": {"learning_rate": 1e-2, "routing_bias_gamma": 0.01, "lora": {"rank": 4, "alpha": 8}},
    }
    trainer = PolicyTrainer(model_path, recipe, pad_id=0)
    trainer.train_step(_batch(1), 1)
    state = {name: tensor.cpu() for name, tensor in trainer._state().items()}  # on a GPU too
    started = load_policy(model_path, "float32", converters_for(trainer.recipe.model))
    started.to(trainer.accelerator.device)
    init = {name: tensor.cpu() for name, tensor in started.state_dict().items()}
    micro_batches = trainer._micro_batches(_batch(2))
    with trainer.reference_scope():
        reference = trainer._frozen_logprobs(trainer.reference, micro_batches)
    assert all(map(torch.equal, reference, trainer._frozen_logprobs(started, micro_batches)))
    assert all(torch.equal(tensor.cpu(), state[name]) for name, tensor in trainer._state().items())
    assert sorted(state) == sorted(init)  # the base model's names, no adapter tensors
    changed = {name for name in init if not torch.equal(state[name], init[name])}
    # adapted layers move by their deltas; the routed experts and the embedding stay frozen
    assert "model.layers.0.self_attn.q_b_proj.weight" in changed
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in changed
    assert not any(".mlp.experts." in name or "embed_tokens" in name for name in changed)
    q_b = trainer.model.model.layers[0].self_attn.q_b_proj
    delta = (q_b.lora_B @ q_b.lora_A) * (8 / 4)
    assert torch.equal(state["model.layers.0.self_attn.q_b_proj.weight"], (q_b.weight + delta).cpu())
    assert torch.equal(q_b.weight.cpu(), init["model.layers.0.self_attn.q_b_proj.weight"])

    checkpoint = str(tmp_path / "step-1")
    trainer.save(checkpoint, model_path)
    trainer.save_training_state(checkpoint)
    saved = AutoModelForCausalLM.from_pretrained(checkpoint).state_dict()
    assert all(torch.equal(saved[name], state[name]) for name in state)
    expected = trainer.train_step(_batch(2), 2)
    resumed = PolicyTrainer(model_path, recipe, pad_id=0, resume_from=checkpoint)
    assert resumed.train_step(_batch(2), 2)["loss"] == expected["loss"]
    after, expected_state = resumed._state(), trainer._state()
    assert [name for name in after if not torch.equal(after[name], expected_state[name])] == []
