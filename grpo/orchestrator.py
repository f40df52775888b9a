"""The Ray driver loop: sample groups with vLLM, score them, compute advantages, update, sync.

Read it top to bottom: `train()` is one GRPO run. Rollout engines and the trainer are Ray actors;
rewards run in their own worker processes (`grpo.rewards.runtime`), off the trainer's path.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from grpo.algorithms.advantages import ADVANTAGES, first_untied, tied_groups
from grpo.config import Recipe, check_model_outside_run, start_run_folder
from grpo.data import ContextFit, eval_prompts, prompt_renderer, train_prompts
from grpo.errors import ParityError
from grpo.metrics import MetricsLog, check_tensorboard, console_line, plot_run
from grpo.models.build import check_max_model_len, check_model, context_length, load_tokenizer, materialize
from grpo.rewards.runtime import RewardEntry, RewardRuntime, Scored, check_rewards
from grpo.rollout.engines import rollout, start_engines, start_ray
from grpo.rollout.vllm_engine import SamplingSpec, check_engine_kwargs
from grpo.trainer.checkpoint import (
    ResumePoint,
    begin_checkpoint,
    continue_run_folder,
    end_checkpoint,
    resume_point,
)
from grpo.trainer.policy_trainer import RolloutBatch
from grpo.trainer.ranks import TrainerRanks


@dataclass
class Actors:
    trainer: TrainerRanks
    engines: list


def start_actors(recipe: Recipe, model_path: str, pad_id: int, resume_from: str | None = None) -> Actors:
    """The trainer and the engines, from `model_path`, or from `resume_from` (a checkpoint of this run
    the trainer takes its optimizer state from too; its KL reference stays `model_path`)."""
    rollout_config = recipe.rollout
    gpus = 0.0
    if torch.cuda.is_available():
        gpus = 1 / (rollout_config.engines + 1) if rollout_config.colocate else 1.0
    # vLLM sizes its cache from the memory free when it starts: the trainer settles first
    trainer = TrainerRanks(recipe, model_path, pad_id, gpus_per_rank=gpus, resume_from=resume_from)
    engines = start_engines(
        resume_from or model_path,
        recipe.model.dtype,
        recipe.run.seed,
        rollout_config.engines,
        rollout_config.cpus_per_engine,
        rollout_config.engine_kwargs,
        gpus_per_engine=gpus,
    )
    return Actors(trainer, engines)


def reward_samples(rows: list[dict], groups) -> list[dict]:
    """What the rewards see of each completion: its dataset row plus its length in tokens (for
    `overlong`), in training and held-out scoring alike."""
    return [{**row, "completion_tokens": len(c.token_ids)} for row, group in zip(rows, groups) for c in group]


def evaluate(actors: Actors, tokenizer, rows: list[dict], recipe: Recipe, rewards: RewardRuntime, out: Path):
    """Held-out accuracy: share of completions whose first reward says `ok`, over `eval.samples`
    completions per prompt at `eval.temperature`; plus greedy accuracy when sampling. Writes them all."""
    prompt_ids = [tokenizer(r["prompt"])["input_ids"] for r in rows]
    config, primary = recipe.eval, rewards.names[0]
    modes = {"": (config.temperature, config.samples)}
    if config.temperature > 0:
        modes["_greedy"] = (0.0, 1)
    results, records = {}, []
    for suffix, (temperature, n) in modes.items():
        spec = SamplingSpec(
            n=n,
            max_tokens=config.max_tokens,
            temperature=temperature,
            seed=recipe.run.seed,
            stop=tuple(recipe.rollout.stop),
        )
        groups = rollout(actors.engines, prompt_ids, spec)
        texts = [c.text for group in groups for c in group]
        samples = reward_samples(rows, groups)
        scored = rewards.score(texts, samples)
        correct = [s.components[primary].status == "ok" for s in scored]
        results[f"accuracy{suffix}"] = sum(correct) / max(1, len(correct))
        results[f"reward{suffix}"] = statistics.fmean(s.reward for s in scored) if scored else 0.0
        records += [
            {
                "prompt": row["prompt"],
                "answer": row.get("answer"),  # None where the row has no gold answer
                "temperature": temperature,
                "completion": text,
                "reward": s.reward,
                "correct": ok,
                "components": s.components_record(),
            }
            for row, text, s, ok in zip(samples, texts, scored, correct)
        ]
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return results


def reward_metrics(scored: list[Scored], names: list[str]) -> dict[str, float]:
    metrics = {}
    for name in names:
        parts = [s.components[name] for s in scored]
        values = [p.value for p in parts if p.value is not None]
        metrics[f"reward/{name}/mean"] = statistics.fmean(values) if values else 0.0
        for status in ("ok", "wrong", "n/a", "error", "timeout"):
            metrics[f"reward/{name}/{status}"] = sum(p.status == status for p in parts) / len(parts)
    return metrics


def parity(
    actors: Actors, parity_ids: list[int], tolerance: float, when: str, fp8: bool = False
) -> tuple[list[float], dict[str, float]]:
    """Each engine's logprobs of a fixed sequence against the trainer's (its FP8 GEMMs run in high
    precision, as vLLM's do); stops the run on a mismatch. Returns the first engine's logprobs and
    the max and mean absolute differences per token (plus the FP8 gap when training in FP8)."""
    import ray

    trainer_lp = torch.tensor(actors.trainer.call("sequence_logprobs", [parity_ids])[0])
    engine_lps = [
        torch.tensor(lp[0])
        for lp in ray.get([e.sequence_logprobs.remote([parity_ids]) for e in actors.engines])
    ]
    diff = max(float((lp - trainer_lp).abs().max()) for lp in engine_lps)
    mean = max(float((lp - trainer_lp).abs().mean()) for lp in engine_lps)
    if diff > tolerance:
        raise ParityError(
            f"weight sync parity failed {when}: vLLM and trainer logprobs differ by up to "
            f"{diff:.2e} per token (train.parity_tolerance is {tolerance:.0e})"
        )
    diffs = {"sync/parity_max_abs_diff": diff, "sync/parity_mean_abs_diff": mean}
    if fp8:  # what FP8 training adds on top: the trainer's own FP8 forward against vLLM, not checked
        fp8_lp = torch.tensor(actors.trainer.call("sequence_logprobs", [parity_ids], fp8=True)[0])
        diffs["sync/fp8_gap_max_abs_diff"] = float((engine_lps[0] - fp8_lp).abs().max())
        diffs["sync/fp8_gap_mean_abs_diff"] = float((engine_lps[0] - fp8_lp).abs().mean())
    return engine_lps[0].tolist(), diffs


def sync_weights(
    actors: Actors, parity_ids: list[int], previous: list[float], tolerance: float, step: int, fp8: bool
):
    """Push weights to every engine, check parity, and measure how far vLLM's logprobs moved."""
    import ray

    started = time.perf_counter()
    manifest = actors.trainer.call("publish_weights")
    ray.get([engine.load_weights.remote(manifest) for engine in actors.engines])
    seconds = time.perf_counter() - started
    current, diffs = parity(actors, parity_ids, tolerance, f"at step {step}", fp8)
    shift = float((torch.tensor(current) - torch.tensor(previous)).abs().mean())
    return current, {
        "sync/seconds": seconds,
        "sync/gigabytes": manifest.nbytes / 1e9,
        **diffs,
        "sync/logprob_shift": shift,
        "sync/weights_version": manifest.version,
    }


def build_batch(groups, prompt_ids, advantages_BG, keep_B) -> RolloutBatch:
    batch = RolloutBatch([], [], [], [])
    for b, group in enumerate(groups):
        if not keep_B[b]:
            continue
        for g, completion in enumerate(group):
            batch.prompt_ids.append(prompt_ids[b])
            batch.completion_ids.append(completion.token_ids)
            batch.advantages.append(float(advantages_BG[b, g]))
            batch.sampler_logprobs.append(completion.logprobs)
    return batch


class PromptStream:
    """The training rows in order, counting those drawn: a step draws more than
    `train.prompts_per_step` when it resamples, so a resumed run skips the count its checkpoint holds."""

    def __init__(self, rows: Iterator[dict]):
        self.rows, self.drawn = rows, 0

    def take(self, count: int) -> list[dict]:
        self.drawn += count
        return [next(self.rows) for _ in range(count)]

    def skip_to(self, drawn: int) -> None:
        assert drawn >= self.drawn, "rows already drawn cannot be skipped"
        self.take(drawn - self.drawn)


@dataclass
class Session:
    """What one run holds between steps."""

    recipe: Recipe
    actors: Actors
    tokenizer: object
    rewards: RewardRuntime
    prompts: PromptStream
    parity_ids: list[int]
    vllm_logprobs: list[float]
    ahead: StepSample | None = None
    """With `rollout.overlap`: the next step's groups, sampled while this step trained."""

    def rows_trained(self) -> int:
        """The rows drawn by the steps trained so far (a run resumed here draws those sampled ahead again)."""
        return self.prompts.drawn - (len(self.ahead.sampled.rows) if self.ahead else 0)


@dataclass
class Sampled:
    """A step's groups of completions, scored; several rounds of sampling add up."""

    rows: list[dict]
    prompt_ids: list[list[int]]
    groups: list
    scored: list[Scored]
    rollout_s: float
    reward_s: float

    def __add__(self, other: Sampled) -> Sampled:
        return Sampled(*(mine + theirs for mine, theirs in zip(vars(self).values(), vars(other).values())))

    def rewards_BG(self) -> torch.Tensor:
        return torch.tensor([s.reward for s in self.scored], dtype=torch.float32).view(len(self.rows), -1)


def sample(session: Session, rows: list[dict], spec: SamplingSpec) -> Sampled:
    """A group of completions for each row, scored."""
    started = time.perf_counter()
    prompt_ids = [session.tokenizer(r["prompt"])["input_ids"] for r in rows]
    groups = rollout(session.actors.engines, prompt_ids, spec)
    rolled_out = time.perf_counter()
    texts = [c.text for group in groups for c in group]
    scored = session.rewards.score(texts, reward_samples(rows, groups))
    return Sampled(rows, prompt_ids, groups, scored, rolled_out - started, time.perf_counter() - rolled_out)


@dataclass
class StepSample:
    """The groups one step trains on, and the rounds of resampling that found them."""

    sampled: Sampled
    rounds: int


def sample_step(session: Session) -> StepSample:
    """`train.prompts_per_step` groups, then DAPO's resampling rounds while groups with signal lack."""
    recipe, algo = session.recipe, session.recipe.algorithm
    wanted = recipe.train.prompts_per_step
    spec = SamplingSpec(
        n=recipe.rollout.group_size,
        max_tokens=recipe.rollout.max_tokens,
        temperature=recipe.rollout.temperature,
        top_p=recipe.rollout.top_p,
        stop=tuple(recipe.rollout.stop),
    )
    sampled = sample(session, session.prompts.take(wanted), spec)
    rounds = 0
    while rounds < algo.resample_rounds:
        missing = wanted - int((~tied_groups(sampled.rewards_BG())).sum())
        if missing <= 0:
            break
        sampled, rounds = sampled + sample(session, session.prompts.take(missing), spec), rounds + 1
    return StepSample(sampled, rounds)


def grpo_step(session: Session, step: int) -> dict:
    """Sample (unless sampled ahead), score, update, sync: one GRPO step. Returns its metrics record."""
    started = time.perf_counter()
    recipe, actors, algo = session.recipe, session.actors, session.recipe.algorithm
    ahead = session.ahead or sample_step(session)
    session.ahead = None
    sampled, rounds = ahead.sampled, ahead.rounds
    rewards_BG = sampled.rewards_BG()
    tied_B = tied_groups(rewards_BG)
    wanted = recipe.train.prompts_per_step
    keep_B = first_untied(tied_B, wanted) if algo.drop_tied_groups else torch.ones_like(tied_B)
    advantages_BG = ADVANTAGES[algo.advantage](rewards_BG)
    batch = build_batch(sampled.groups, sampled.prompt_ids, advantages_BG, keep_B)
    finish_training = actors.trainer.start_train_step(batch, step) if batch.prompt_ids else lambda: {}
    if recipe.rollout.overlap and step < recipe.train.steps:
        # the engines hold the weights this step started from until the sync below
        session.ahead = sample_step(session)
    train_metrics = finish_training()
    train_s = train_metrics.pop("time/train_s", 0.0)
    updated = time.perf_counter()
    sync_metrics = {}
    if step % recipe.train.sync_interval == 0 or step == recipe.train.steps:
        session.vllm_logprobs, sync_metrics = sync_weights(
            actors,
            session.parity_ids,
            session.vllm_logprobs,
            recipe.train.parity_tolerance,
            step,
            recipe.model.fp8,
        )
    synced = time.perf_counter()
    lengths = [len(c.token_ids) for group in sampled.groups for c in group]
    primary = session.rewards.names[0]
    return {
        "step": step,
        "reward/mean": float(rewards_BG.mean()),
        "reward/std": float(rewards_BG.std()),
        "accuracy": statistics.fmean(s.components[primary].status == "ok" for s in sampled.scored),
        **reward_metrics(sampled.scored, session.rewards.names),
        **train_metrics,
        "response_tokens/mean": statistics.fmean(lengths),
        "response_tokens/max": max(lengths),
        # cut by rollout.max_tokens or the context rather than ended by the model (end-of-sequence,
        # rollout.stop)
        "response_tokens/truncated": statistics.fmean(
            c.finish_reason == "length" for group in sampled.groups for c in group
        ),
        "tied_groups": int(tied_B.sum()),
        "dropped_groups": int((~keep_B).sum()),
        "trained_groups": int(keep_B.sum()),
        "resample_rounds": rounds,
        "rollout_tokens_per_s": sum(lengths) / sampled.rollout_s,
        "time/rollout_s": sampled.rollout_s,
        "time/reward_s": sampled.reward_s,
        "time/train_s": train_s,
        "time/sync_s": synced - updated,
        # wall time: with rollout.overlap, this batch's sampling is in the step before
        "time/step_s": synced - started,
        **sync_metrics,
    }


def start_session(
    recipe: Recipe,
    model_path: str,
    tokenizer,
    rewards: RewardRuntime,
    prompts: PromptStream,
    parity_row: dict | None,
    context: int,
    resume_from: str | None = None,
) -> Session:
    """Start the actors, then fix the parity sequence (a prompt, the first training row's where
    `parity_row` is None, and the initial policy's greedy answer, within the engines' `context`) and
    check that engines and trainer start from the same weights."""

    actors = start_actors(recipe, model_path, tokenizer.pad_token_id or 0, resume_from)
    prompt = tokenizer((parity_row or prompts.take(1)[0])["prompt"])["input_ids"]
    greedy = SamplingSpec(n=1, max_tokens=recipe.rollout.max_tokens, temperature=0.0)
    # vLLM ends an answer at the context, and scores a sequence only with a token of room after it
    parity_ids = (prompt + rollout(actors.engines, [prompt], greedy)[0][0].token_ids)[: context - 1]
    logprobs, _ = parity(
        actors,
        parity_ids,
        recipe.train.parity_tolerance,
        "before training (engine and trainer loaded different weights)",
    )
    return Session(recipe, actors, tokenizer, rewards, prompts, parity_ids, logprobs)


def save_checkpoint(
    actors: Actors, path: Path, tokenizer_path: str, step: int, eval_before: dict, rows_drawn: int
) -> str:
    """The policy as a Hugging Face folder at `path`, with what resuming from it needs."""
    begin_checkpoint(path)
    actors.trainer.call("save", str(path), tokenizer_path)
    actors.trainer.call("save_training_state", str(path))
    end_checkpoint(ResumePoint(path, step, eval_before, rows_drawn))
    return str(path)


def train(
    recipe: Recipe, ray_address: str | None = None, show_progress: bool = True, resume: bool = False
) -> dict:
    """One GRPO run; with `resume`, the recipe's run continued from its latest checkpoint."""
    import ray
    from tqdm import tqdm

    started = time.perf_counter()
    # Everything a recipe can get wrong is checked before the run folder is touched, so that a
    # typo does not overwrite an earlier run's config.yaml and metrics.
    check_model_outside_run(recipe)
    config = check_model(recipe.model, recipe.train.expert_parallel_size, recipe.train.lora)
    tokenizer = load_tokenizer(recipe.model.path)
    check_max_model_len(config, recipe.rollout.engine_kwargs, "rollout.engine_kwargs.max_model_len")
    context = context_length(config, recipe.rollout.engine_kwargs)
    train_fit, eval_fit = ContextFit(tokenizer, context), ContextFit(tokenizer, context)
    reward_entries = [RewardEntry(r.label, r.name, r.weight, r.kwargs) for r in recipe.rewards]
    functions = check_rewards(reward_entries)
    reads = {
        e.spec: f.sample_fields for e, f in zip(reward_entries, functions) if hasattr(f, "sample_fields")
    }
    render = prompt_renderer(recipe.data.chat, recipe.data.system_prompt, tokenizer)
    eval_rows = eval_prompts(recipe.data, recipe.eval.prompts, recipe.run.seed, eval_fit, reads, render)
    prompts = PromptStream(train_prompts(recipe.data, recipe.run.seed, train_fit, reads, render))
    check_engine_kwargs(recipe.rollout.engine_kwargs)
    check_tensorboard(recipe.run.tensorboard)
    point = resume_point(recipe) if resume else None
    # a cluster to join that does not answer is one more thing to find before the run folder
    start_ray(
        ray_address,
        recipe.train.expert_parallel_size + recipe.rollout.engines * recipe.rollout.cpus_per_engine,
    )
    try:
        run_dir = continue_run_folder(recipe, point) if point else start_run_folder(recipe)
        model_path = materialize(
            recipe.model.path, run_dir / "init", recipe.run.seed, recipe.model.tiny_overrides
        )
        done = point.step if point else 0
        log = MetricsLog(run_dir, recipe.run.tensorboard, resumed_after=done)
        with RewardRuntime(
            reward_entries, recipe.reward_runtime.workers, recipe.reward_runtime.timeout_s
        ) as rewards:
            session = start_session(
                recipe,
                model_path,
                tokenizer,
                rewards,
                prompts,
                eval_rows[0] if eval_rows else None,
                context,
                str(point.checkpoint) if point else None,
            )

            def run_eval(name: str) -> dict:
                if not eval_rows:
                    return {}
                return evaluate(session.actors, tokenizer, eval_rows, recipe, rewards, run_dir / name)

            before = point.eval_before if point else run_eval("eval_before.jsonl")
            if point:  # the rows the earlier steps drew
                prompts.skip_to(point.rows_drawn)
            bar = tqdm(
                range(done + 1, recipe.train.steps + 1),
                initial=done,
                total=recipe.train.steps,
                desc="grpo",
                disable=not show_progress,
                dynamic_ncols=True,
            )
            for step in bar:
                record = grpo_step(session, step)
                if recipe.eval.interval and step % recipe.eval.interval == 0 and step < recipe.train.steps:
                    scores = run_eval(f"eval_step{step}.jsonl")
                    record.update({f"eval/{key}": value for key, value in scores.items()})
                log.write(record)
                if show_progress:
                    bar.write(console_line(record))
                if recipe.train.checkpoint_interval and step % recipe.train.checkpoint_interval == 0:
                    save_checkpoint(
                        session.actors,
                        run_dir / "checkpoints" / f"step-{step}",
                        model_path,
                        step,
                        before,
                        session.rows_trained(),
                    )
            log.close()
            after = run_eval("eval_after.jsonl")
            final = save_checkpoint(
                session.actors,
                run_dir / "checkpoints" / "final",
                model_path,
                recipe.train.steps,
                before,
                session.rows_trained(),
            )
            session.actors.trainer.call("close")
    finally:
        ray.shutdown()
    summary = {
        "run": recipe.run.name,
        "steps": recipe.train.steps,
        "resumed_after_step": point.step if point else None,
        "eval_prompts": len(eval_rows),
        "prompts_left_out_too_long": {"train": train_fit.too_long, "eval": eval_fit.too_long},
        "eval_accuracy_before": before.get("accuracy"),
        "eval_accuracy_after": after.get("accuracy"),
        "eval_reward_before": before.get("reward"),
        "eval_reward_after": after.get("reward"),
        "eval_greedy_accuracy_before": before.get("accuracy_greedy"),
        "eval_greedy_accuracy_after": after.get("accuracy_greedy"),
        "eval_temperature": recipe.eval.temperature,
        "eval_samples_per_prompt": recipe.eval.samples,
        "final_checkpoint": final,
        "wall_time_s": time.perf_counter() - started,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_run(run_dir)
    return summary


def before_after_table(summary: dict) -> str:
    sampled = (
        f"T={summary['eval_temperature']:g}, {summary['eval_samples_per_prompt']}/prompt"
        if summary["eval_temperature"]
        else "greedy"
    )
    rows = [
        (f"held-out accuracy ({sampled})", "eval_accuracy_before", "eval_accuracy_after"),
        ("held-out accuracy (greedy)", "eval_greedy_accuracy_before", "eval_greedy_accuracy_after"),
        ("held-out mean reward", "eval_reward_before", "eval_reward_after"),
    ]
    lines = [f"{'':36}{'before':>8}{'after':>8}"]
    for label, before, after in rows:
        if summary.get(before) is not None:
            lines.append(f"{label:36}{summary[before]:>8.3f}{summary[after]:>8.3f}")
    done = summary.get("resumed_after_step") or 0
    ran = f"{summary['steps'] - done} GRPO steps" + (
        f" ({done + 1}-{summary['steps']}, resumed)" if done else ""
    )
    lines.append(f"{ran} in {summary['wall_time_s']:.0f} s; checkpoint: {summary['final_checkpoint']}")
    if left_out := {part: n for part, n in summary["prompts_left_out_too_long"].items() if n}:
        counts = ", ".join(f"{n} {part}" for part, n in left_out.items())
        lines.append(f"prompts left out as too long for the engines' context: {counts}")
    return "\n".join(lines)
