"""Supervised warm-up: teach a base policy the task's format before GRPO (`grpo sft RECIPE`).

Rows are (prompt, completion) pairs: from the arithmetic task's worked solutions, or from a local
file / dataset with a `completion` field. The loss is the mean next-token NLL over completion tokens.
"""

from __future__ import annotations

import itertools
import json
import random
import statistics
import time

import torch

from grpo.config import Recipe, RecipeError, SftConfig, TrainConfig, check_model_outside_run, start_run_folder
from grpo.data import TASK_PREFIX, ContextFit, Render, prompt_renderer, sequence_ids, train_prompts
from grpo.models import activation_checkpointing, fp8_warm_up
from grpo.models.build import (
    check_model,
    context_length,
    converters_for,
    load_policy,
    load_tokenizer,
    materialize,
)
from grpo.models.moe import balance_loss, moe_layers, update_routing_bias
from grpo.tasks.arithmetic import solution_text
from grpo.trainer.optim import build_optimizer
from grpo.trainer.policy_trainer import Packed, pack, token_logprobs


def sft_rows(recipe: Recipe, config: SftConfig, fit: ContextFit, render: Render = str):
    """Endless (prompt, completion) pairs, each prompt made the model's input by `render`. The data
    is read and checked here, not at the first pair, so that a missing file or field stops `sft`
    before it writes anything. A file's or dataset's rows longer than the model's context (`fit`)
    are left out."""
    if recipe.data.source.startswith(TASK_PREFIX):
        rng = random.Random(recipe.run.seed + 7)
        return (
            (row["prompt"], solution_text(row["expression"], boxed=rng.random() < config.boxed_fraction))
            for row in train_prompts(recipe.data, recipe.run.seed, render=render)
        )

    def fits(row: dict) -> bool:
        if not isinstance(row.get("completion"), str):
            found = "none" if row.get("completion") is None else f"{row['completion']!r:.40}, not a string"
            raise RecipeError(
                f"sft: data rows need a 'completion' field (the row of prompt {row['prompt']!r:.60} has {found})"
            )
        return fit(row)

    return (
        (row["prompt"], row["completion"])
        for row in train_prompts(recipe.data, recipe.run.seed, fits, render=render)
    )


SFT_TRAIN_KEYS = (
    "threads",
    "bf16_moments",
    "routing_bias_gamma",
    "balance_loss_alpha",
    "gradient_checkpointing",
    "fp8_warm_up",
)
"""The `train` keys `grpo sft` reads; its steps, batch size and learning rate are `sft.*`."""


def check_train_keys(recipe: Recipe) -> None:
    """A RecipeError for a `train` key away from its default that `grpo sft` would ignore, because it
    is `grpo train`'s (a recipe `grpo sft` wrote itself, defaults and all, passes); so is
    `run.tensorboard`, since `grpo sft` logs no metrics file."""
    if recipe.run.tensorboard:
        raise RecipeError(
            "run.tensorboard: grpo train's, not grpo sft's (grpo sft logs its loss to the console)"
        )
    defaults = Recipe(model=recipe.model).train  # the recipe's validators fill defaults by dtype
    for key in TrainConfig.model_fields:
        if key not in SFT_TRAIN_KEYS and getattr(recipe.train, key) != getattr(defaults, key):
            raise RecipeError(
                f"train.{key}: grpo train's, not grpo sft's (grpo sft reads sft.* and "
                f"train.{', train.'.join(SFT_TRAIN_KEYS)})"
            )


def sft_batch(tokenizer, pairs: list[tuple[str, str]]) -> Packed:
    """(prompt, completion) pairs as training sequences: prompt, completion, end of sequence."""
    ids = [sequence_ids(tokenizer, pair) for pair in pairs]
    completions = [completion + [tokenizer.eos_token_id] for _, completion in ids]
    return pack([prompt for prompt, _ in ids], completions, tokenizer.pad_token_id or 0)


def sft_loss(model, packed: Packed) -> tuple[torch.Tensor, torch.Tensor]:
    """The completion tokens' mean negative log-likelihood, and the loss to minimise: that plus the
    MoE layers' sequence-wise balance loss where `train.balance_loss_alpha` turned it on (the batch
    is one micro-batch, so the balance loss's mean over rows needs no reweighting)."""
    logp_BL1, _ = token_logprobs(model, packed)
    mask = packed.completion_mask_BL1
    nll = -(logp_BL1 * mask).sum() / mask.sum()
    balance = balance_loss(model)
    return nll, nll if balance is None else nll + balance


def sft(recipe: Recipe, log=print) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config = recipe.sft or SftConfig()
    # before the run folder is touched: a typo keeps an earlier run's files
    check_model_outside_run(recipe)
    hf_config = check_model(recipe.model)
    check_train_keys(recipe)
    tokenizer = load_tokenizer(recipe.model.path)
    if tokenizer.eos_token_id is None:  # every completion ends with it, or the model never learns to stop
        raise RecipeError(f"model.path: {recipe.model.path}'s tokenizer has no end-of-sequence token")
    fit = ContextFit(tokenizer, context_length(hf_config, {}), ("prompt", "completion"))
    rows = sft_rows(
        recipe, config, fit, prompt_renderer(recipe.data.chat, recipe.data.system_prompt, tokenizer)
    )
    if fit.too_long:
        log(f"sft: {fit.too_long} data rows left out, longer than the model's {fit.context} positions")
    run_dir = start_run_folder(recipe)
    set_seed(recipe.run.seed)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    model_path = materialize(
        recipe.model.path, run_dir / "init", recipe.run.seed, recipe.model.tiny_overrides
    )
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = load_policy(model_path, recipe.model.dtype, converters_for(recipe.model))
    for layer in moe_layers(model):
        layer.balance_loss_alpha = recipe.train.balance_loss_alpha
    if recipe.train.gradient_checkpointing:
        activation_checkpointing.enable(model)
    optimizer = build_optimizer(model.parameters(), config.learning_rate, 0.01, recipe.train.bf16_moments)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / config.steps)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    if recipe.model.fp8 and recipe.train.fp8_warm_up:  # a batch is one micro-batch, of padded rows
        report = fp8_warm_up.warm_up(model, config.batch_size * fit.context, accelerator.device)
        if report is not None:
            log(f"sft: DeepGEMM's kernels compiled ahead: {report}")
    model.train()
    started, losses, loads = time.perf_counter(), [], []
    for step in range(1, config.steps + 1):
        packed = sft_batch(tokenizer, list(itertools.islice(rows, config.batch_size))).to(accelerator.device)
        nll, loss = sft_loss(model, packed)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        load = update_routing_bias(model, recipe.train.routing_bias_gamma)
        losses.append(nll.item())
        loads.append(load.get("moe/max_over_mean_load", 0.0))
        if step % 50 == 0 or step == config.steps:
            balance = f" | expert load max/mean {statistics.fmean(loads[-50:]):.2f}" if load else ""
            log(
                f"sft step {step:>4}/{config.steps} | loss {statistics.fmean(losses[-50:]):.4f}{balance} | {time.perf_counter() - started:.0f} s"
            )
    final = run_dir / "final"
    accelerator.unwrap_model(model).save_pretrained(final)
    tokenizer.save_pretrained(final)
    summary = {
        "run": recipe.run.name,
        "steps": config.steps,
        "final_loss": statistics.fmean(losses[-20:]),
        "expert_load_max_over_mean": statistics.fmean(loads[-20:]),
        "checkpoint": str(final),
        "rows_left_out_too_long": fit.too_long,
        "wall_time_s": time.perf_counter() - started,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
