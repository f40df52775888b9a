"""The policy trainer: logprobs under the current/reference policy, the GRPO update, weight export.

Plain Python; the orchestrator runs it as a Ray actor, or as `train.expert_parallel_size` actors
that form one process group: each holds a shard of the routed experts and trains on its share of the
rollout batch (`grpo.parallel.expert_parallel` says how the gradients combine). Device placement and
the backward pass go through an `accelerate.Accelerator` (one process each: the ranks' gradients are
combined here, not by a DDP wrapper, which would average expert shards that differ per rank).

Shape legend: B = completions, L = prompt + completion tokens (right-padded), V = vocabulary.
Tensors named `_BL1` are aligned with next-token targets (length L - 1).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from grpo.algorithms.losses import AGGREGATIONS, BatchTotals, grpo_loss, sampler_correction, token_mean
from grpo.config import Recipe
from grpo.models import activation_checkpointing, fp8_warm_up
from grpo.models.build import context_length, converters_for, load_policy
from grpo.models.fp8 import high_precision
from grpo.models.fp8_weight_cache import reuse_quantized_weights
from grpo.models.fused_grad_accumulation import accumulate_into_grad
from grpo.models.lora import adapter_state, add_lora, as_started, merged_state
from grpo.models.moe import balance_loss, moe_layers, real_tokens, update_routing_bias
from grpo.parallel import expert_parallel
from grpo.rollout.weight_sync import Manifest, SharedWeightsWriter
from grpo.trainer.checkpoint import adapter_file, optimizer_file
from grpo.trainer.optim import build_optimizer
from grpo.trainer.schedule import learning_rate


@dataclass
class RolloutBatch:
    """What the trainer needs of a rollout batch; one entry per completion."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    advantages: list[float]
    sampler_logprobs: list[list[float]]

    def shard(self, rank: int, ranks: int) -> RolloutBatch:
        """Rank `rank`'s contiguous share of the rows (the shares differ by at most one row)."""
        rows = slice(rank * len(self.advantages) // ranks, (rank + 1) * len(self.advantages) // ranks)
        return RolloutBatch(
            self.prompt_ids[rows],
            self.completion_ids[rows],
            self.advantages[rows],
            self.sampler_logprobs[rows],
        )


@dataclass
class Packed:
    input_ids_BL: torch.Tensor
    attention_mask_BL: torch.Tensor
    completion_mask_BL1: torch.Tensor
    sampler_logp_BL1: torch.Tensor | None = None
    """vLLM's logprob of each completion token it sampled, at the token's target position (None where
    no engine sampled: SFT, the parity check)."""
    sampler_mask_BL1: torch.Tensor | None = None
    """1.0 where `sampler_logp_BL1` holds one (a greedy sample has none)."""

    def to(self, device) -> Packed:
        return Packed(*(None if tensor is None else tensor.to(device) for tensor in vars(self).values()))


def pack(
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    sampler_logprobs: list[list[float]] | None = None,
) -> Packed:
    """Right-pad prompt+completion; mark the target positions that are completion tokens, and place
    the sampling engine's logprobs of them where given."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    width = max(lengths)
    # one tensor from nested lists, not a tensor and three slice writes per row: 0.6x the CPU time
    # at 128 rows (benchmarks/pack_cpu.py), time in which the GPU waits at a train step's start
    input_ids = torch.tensor(
        [p + c + [pad_id] * (width - len(p) - len(c)) for p, c in zip(prompts, completions)]
    )
    positions = torch.arange(width)
    ends = torch.tensor(lengths).unsqueeze(1)
    attention = (positions < ends).long()
    targets = positions[1:]  # position t + 1 is the target of logits at t
    starts = torch.tensor([len(p) for p in prompts]).unsqueeze(1)
    completion_mask = ((targets >= starts) & (targets < ends)).float()
    if sampler_logprobs is None:
        return Packed(input_ids, attention, completion_mask)
    sampler_ends = starts + torch.tensor([len(s) for s in sampler_logprobs]).unsqueeze(1)
    sampler_mask = (targets >= starts) & (targets < sampler_ends)
    # the marked positions in row-major order are the rows' logprobs one after another
    sampler_logp = torch.zeros_like(completion_mask)
    sampler_logp[sampler_mask] = torch.tensor(list(itertools.chain.from_iterable(sampler_logprobs)))
    sampler_mask = sampler_mask.float()
    return Packed(input_ids, attention, completion_mask, sampler_logp, sampler_mask)


def split_rows(
    order: list[int], lengths: list[int], rows_cap: int, tokens_cap: int | None
) -> list[list[int]]:
    """`order` cut into micro-batches, in turn: each takes rows while it holds fewer than `rows_cap`
    and, padded to its longest row, stays within `tokens_cap` tokens (a micro-batch's first row
    always goes in, however long)."""
    micro_batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for row in order:
        grown = max(width, lengths[row])
        too_many = len(current) == rows_cap or (
            tokens_cap is not None and (len(current) + 1) * grown > tokens_cap
        )
        if current and too_many:
            micro_batches.append(current)
            current, grown = [], lengths[row]
        current.append(row)
        width = grown
    if current:
        micro_batches.append(current)
    return micro_batches


def largest_micro_batch(rows_cap: int, tokens_cap: int | None, context: int) -> int:
    """The most tokens `split_rows` can put in a micro-batch, padding included, for rows of at most
    `context` tokens."""
    if tokens_cap is None:
        return rows_cap * context
    return max(tokens_cap, context)  # a row longer than the cap is a micro-batch of its own


def token_logprobs(model, packed: Packed, with_entropy: bool = False):
    """`logp_BL1` of each next token, and its entropy under the model when asked."""
    with real_tokens(model, packed.attention_mask_BL):
        logits_BLV = model(input_ids=packed.input_ids_BL, attention_mask=packed.attention_mask_BL).logits
    logits_BL1V = logits_BLV[:, :-1].float()
    logprobs_BL1V = torch.log_softmax(logits_BL1V, dim=-1)
    targets_BL1 = packed.input_ids_BL[:, 1:]
    logp_BL1 = logprobs_BL1V.gather(-1, targets_BL1.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp_BL1, None
    entropy_BL1 = -(logprobs_BL1V.exp() * logprobs_BL1V).sum(-1)
    return logp_BL1, entropy_BL1


def sampler_gap(old_BL1: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Sum over tokens of |old-policy logprob - vLLM's sampling logprob| (the rollout/train mismatch)."""
    return ((old_BL1 - packed.sampler_logp_BL1).abs() * packed.sampler_mask_BL1).sum()


# the additive metrics of a train step: sums over the batch's rows and tokens with global
# normalizers, so expert-parallel ranks add theirs up
ADDITIVE = (
    "loss",
    "policy_loss",
    "kl",
    "clip_fraction",
    "entropy",
    "sampler_logprob_diff",
    "sampler_ratio_capped",
    "moe/balance_loss",
)


class PolicyTrainer:
    order_rows_by_length = True
    """Fill micro-batches with rows of similar length (`_micro_batches`); off only to measure the
    difference (`benchmarks/micro_batch_order_cpu.py`)."""
    backward_on_this_thread = True
    """Run each backward on the calling thread instead of autograd's device thread. The FP8 layers'
    backward is Python, and there it ran 2-3x slower (`benchmarks/probe_fp8_step_cpu_gpu.py`); off
    only to measure the difference (`benchmarks/trainer_step_gpu.py`)."""

    def __init__(
        self,
        model_path: str,
        recipe: dict,
        pad_id: int,
        rank: int = 0,
        init_method: str = "",
        resume_from: str | None = None,
    ):
        """`rank` and `init_method` (a `tcp://host:port` rendezvous) join the expert-parallel group
        of `train.expert_parallel_size` ranks. `resume_from`, a checkpoint of this run, gives the
        policy and the optimizer state; the KL reference stays `model_path`, the run's start."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.recipe = Recipe.model_validate(recipe)
        train = self.recipe.train
        if train.threads:
            torch.set_num_threads(train.threads)
        set_seed(self.recipe.run.seed)
        self.group = None
        if train.expert_parallel_size > 1:
            import torch.distributed as dist

            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(
                backend, init_method=init_method, rank=rank, world_size=train.expert_parallel_size
            )
            self.group = dist.group.WORLD
        self.rank = rank
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.pad_id = pad_id
        converters = converters_for(self.recipe.model)
        self.lora = lora = train.lora
        # a LoRA run's checkpoints hold merged weights: it resumes from its start and its adapters
        model = load_policy(
            model_path if lora else (resume_from or model_path), self.recipe.model.dtype, converters
        )
        if lora is not None:
            add_lora(model, lora)
            started_buffers = {name: tensor.detach().clone() for name, tensor in model.named_buffers()}
            if resume_from is not None:  # the base weights are the start's; the file has the rest
                loaded = model.load_state_dict(load_file(str(adapter_file(resume_from))), strict=False)
                assert not loaded.unexpected_keys, loaded.unexpected_keys
        if self.group is not None:
            expert_parallel.shard_experts(model, self.group)
        self.reference = None
        self.reference_scope = contextlib.nullcontext
        if self.recipe.algorithm.beta > 0 and lora is None:
            self.reference = (
                load_policy(model_path, self.recipe.model.dtype, converters).eval().requires_grad_(False)
            )
            self.reference.to(self.accelerator.device)
        for layer in moe_layers(model):
            layer.balance_loss_alpha = train.balance_loss_alpha
        if train.gradient_checkpointing:
            activation_checkpointing.enable(model)
        optimizer = build_optimizer(
            [p for p in model.parameters() if p.requires_grad],
            train.learning_rate,
            train.weight_decay,
            train.bf16_moments,
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if self.recipe.algorithm.beta > 0 and lora is not None:  # the policy as it started
            self.reference = self.model
            self.reference_scope = functools.partial(as_started, model, started_buffers)
        if resume_from is not None:
            # the optimizer puts each state tensor where its parameter is; torch's AdamW keeps its
            # step counts on the CPU (loaded onto the GPU, each step would read them back)
            self.optimizer.load_state_dict(torch.load(optimizer_file(resume_from, rank), map_location="cpu"))
        self.warm_up_report = None
        """What `fp8_warm_up.warm_up` reports, where it ran."""
        # one rank compiles for all: the ranks share the host, and so DeepGEMM's cache, and no rank
        # steps before every rank is built (`TrainerRanks`)
        if self.recipe.model.fp8 and train.fp8_warm_up and rank == 0:
            tokens = largest_micro_batch(
                train.micro_batch_size,
                train.micro_batch_tokens,
                context_length(model.config, self.recipe.rollout.engine_kwargs),
            )
            self.warm_up_report = fp8_warm_up.warm_up(
                model, tokens, self.accelerator.device, train.expert_parallel_size
            )
            if self.warm_up_report is not None:
                print("DeepGEMM's kernels compiled ahead:", self.warm_up_report, flush=True)
        self.model.train()
        self.weights = SharedWeightsWriter(tag=self.recipe.run.name, same_card=self.recipe.rollout.colocate)

    # ---- logprobs -------------------------------------------------------------------------
    def _micro_batches(self, batch: RolloutBatch) -> list[tuple[torch.Tensor, Packed]]:
        """The batch's rows packed per micro-batch, all on the device before any is used: a copy to
        the GPU waits for the work queued before it, so copying between micro-batches would drain
        the queue each time. Each micro-batch comes with the indices of its rows in the batch.

        Rows go to micro-batches in order of length, so that each is padded to a length near its
        rows' own (a group's completions, one after another in the batch, may be 10 tokens or the
        whole budget). The loss's normalisers are the whole batch's, so the order changes only the
        order in which gradients add up."""
        lengths = [len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids)]
        order = list(range(len(lengths)))
        if self.order_rows_by_length:
            order.sort(key=lengths.__getitem__)
        train, device = self.recipe.train, self.accelerator.device
        micro_batches = []
        for rows in split_rows(order, lengths, train.micro_batch_size, train.micro_batch_tokens):
            packed = pack(
                [batch.prompt_ids[i] for i in rows],
                [batch.completion_ids[i] for i in rows],
                self.pad_id,
                [batch.sampler_logprobs[i] for i in rows],
            )
            micro_batches.append((torch.tensor(rows, device=device), packed.to(device)))
        return micro_batches

    @torch.no_grad()
    def _frozen_logprobs(self, model, micro_batches: list[tuple[torch.Tensor, Packed]]) -> list[torch.Tensor]:
        return [token_logprobs(model, packed)[0] for _, packed in micro_batches]

    @torch.no_grad()
    def sequence_logprobs(self, sequences: list[list[int]], fp8: bool = False) -> list[list[float]]:
        """Logprob of each token after the first under the current policy (for the parity check).
        FP8 GEMMs run in high precision unless `fp8`: vLLM receives the master weights, so only then
        does a difference measure the weight sync alone."""
        out = []
        with contextlib.nullcontext() if fp8 else high_precision(self.model):
            for ids in sequences:
                packed = pack([ids[:1]], [ids[1:]], self.pad_id)
                logp_BL1, _ = token_logprobs(self.model, packed.to(self.accelerator.device))
                out.append(logp_BL1[0].tolist())
        return out

    # ---- the update -----------------------------------------------------------------------
    # the weights change only at the optimizer step: each FP8 weight is quantized once per version,
    # not once per micro-batch and logprob pass. Gradients are summed across ranks here, after the
    # backward passes, not by hooks: the FP8 experts may add theirs into `.grad` in place.
    @reuse_quantized_weights()
    @accumulate_into_grad()
    def train_step(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        """`mu` optimizer steps on one rollout batch, at GRPO step `step`'s learning rate (from 1);
        returns metrics averaged over them."""
        algo = self.recipe.algorithm
        start = time.perf_counter()
        rate = learning_rate(self.recipe.train, step)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        completion_tokens = [len(c) for c in batch.completion_ids]
        sequences, tokens = self._over_ranks(len(completion_tokens), sum(completion_tokens))
        totals = BatchTotals(
            sequences=sequences, tokens=max(1, tokens), max_completion_tokens=self.recipe.rollout.max_tokens
        )
        aggregate = AGGREGATIONS[algo.loss_aggregation]
        advantages = torch.tensor(batch.advantages, dtype=torch.float32, device=self.accelerator.device)
        micro_batches = self._micro_batches(batch)
        reference = None
        if self.reference is not None:
            with self.reference_scope():
                reference = self._frozen_logprobs(self.reference, micro_batches)
        # With mu == 1 the old policy is the current one: detaching the live logprobs is exact and
        # saves a forward pass. With mu > 1 every pass must see the logprobs from before the first.
        old = self._frozen_logprobs(self.model, micro_batches) if algo.mu > 1 else None
        sums: dict[str, float] = {"time/logprobs_s": time.perf_counter() - start}
        # metrics stay on the device until the step's work is queued (reading one waits for the GPU)
        pending: list[tuple[str, torch.Tensor | float]] = []
        gaps: list[torch.Tensor] = []
        for pass_index in range(algo.mu):
            for index, (rows, packed) in enumerate(micro_batches):
                logp_BL1, entropy_BL1 = token_logprobs(self.model, packed, with_entropy=True)
                trainer_old_BL1 = old_BL1 = old[index] if old is not None else logp_BL1.detach()
                weight_BL1 = capped_BL1 = None
                if algo.old_policy == "sampler" or algo.sampler_ratio_cap is not None:
                    # vLLM's logprob where it gave one, else the trainer's (such a token: ratio and weight 1)
                    sampler_BL1 = torch.where(
                        packed.sampler_mask_BL1 > 0, packed.sampler_logp_BL1, trainer_old_BL1
                    )
                    if algo.old_policy == "sampler":  # the recipe refuses it beside the cap
                        old_BL1 = sampler_BL1
                    else:
                        weight_BL1, capped_BL1 = sampler_correction(
                            old_BL1, sampler_BL1, algo.sampler_ratio_cap
                        )
                loss, metrics = grpo_loss(
                    logp_BL1,
                    old_BL1,
                    reference[index] if reference is not None else None,
                    advantages[rows],
                    packed.completion_mask_BL1,
                    totals,
                    eps_low=algo.eps_low,
                    eps_high=algo.eps_high,
                    beta=algo.beta,
                    aggregate=aggregate,
                    ratio_level=algo.ratio_level,
                    weight_BT=weight_BL1,
                    kl_estimator=algo.kl_estimator,
                )
                if capped_BL1 is not None:
                    metrics["sampler_ratio_capped"] = token_mean(
                        capped_BL1.float(), packed.completion_mask_BL1, totals
                    )
                balance = balance_loss(self.model)
                if balance is not None:  # a mean over rows: weight it by the micro-batch's share of rows
                    balance = balance * len(packed.input_ids_BL) / totals.sequences
                    loss = loss + balance
                    metrics["moe/balance_loss"] = balance.detach()
                with torch.autograd.set_multithreading_enabled(not self.backward_on_this_thread):
                    self.accelerator.backward(loss)
                mask = packed.completion_mask_BL1
                metrics["entropy"] = (entropy_BL1.detach() * mask).sum() / totals.tokens
                metrics["loss"] = loss.detach()
                pending.extend(metrics.items())
                if pass_index == 0:  # the trainer's logprobs from before the step are the same in every pass
                    gaps.append(sampler_gap(trainer_old_BL1, packed))
            pending.append(("grad_norm", self._clip_gradients()))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            load = update_routing_bias(self.model, self.recipe.train.routing_bias_gamma, self.group)
            for key, value in load.items():
                sums[key] = sums.get(key, 0.0) + value / algo.mu
        for key, value in pending:
            sums[key] = sums.get(key, 0.0) + float(value) / algo.mu
        sums["sampler_logprob_diff"] = float(sum(gaps)) / totals.tokens
        sums["lr"] = rate
        seconds = time.perf_counter() - start
        sums["time/train_s"] = seconds
        tokens = sum(len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids))
        sums["trainer_tokens_per_s"] = tokens * algo.mu / seconds
        if self.group is not None:  # every rank's share of the batch adds up, throughput too
            additive = [key for key in (*ADDITIVE, "trainer_tokens_per_s") if key in sums]
            summed = self._over_ranks(*(sums[key] for key in additive))
            sums.update(zip(additive, summed))
        return sums

    def _over_ranks(self, *values: float) -> tuple:
        """`values` summed over the expert-parallel ranks (unchanged with one rank)."""
        if self.group is None:
            return values
        import torch.distributed as dist

        summed = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        dist.all_reduce(summed, group=self.group)
        return tuple(v if isinstance(v0, float) else int(v) for v, v0 in zip(summed.tolist(), values))

    def _clip_gradients(self) -> torch.Tensor | float:
        """The total gradient norm before clipping (on the device with one rank)."""
        max_norm = self.recipe.train.max_grad_norm
        if self.group is None:
            return self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        expert_parallel.sum_replicated_gradients(self.model, self.group)
        return expert_parallel.clip_grad_norm_(self.model, max_norm, self.group)

    # ---- export ---------------------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        """The model's weights under their unsharded names (a collective with several ranks)."""
        model = self.accelerator.unwrap_model(self.model)
        if self.lora is not None:
            return merged_state(model)
        return model.state_dict() if self.group is None else expert_parallel.full_state_dict(model)

    def publish_weights(self) -> Manifest | None:
        """Rank 0 publishes (every rank must call: the experts are gathered first)."""
        from transformers.core_model_loading import revert_weight_conversion

        state = self._state()
        if self.rank != 0:
            return None
        model = self.accelerator.unwrap_model(self.model)
        return self.weights.publish(revert_weight_conversion(model, state).items())

    def save(self, path: str, tokenizer_path: str) -> str:
        """Rank 0 writes the checkpoint (every rank must call)."""
        from transformers import AutoTokenizer

        model = self.accelerator.unwrap_model(self.model)
        # the model's own state dict is not the checkpoint's where experts are sharded or LoRA layers hold
        # base and adapters apart; `_state` is the checkpoint's (a collective with several ranks)
        own = self.group is None and self.lora is None
        state = {} if own else {"state_dict": self._state()}
        if self.rank == 0:
            model.save_pretrained(path, **state)
            AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(path)
        return path

    def save_training_state(self, checkpoint: str) -> None:
        """Every rank writes its own optimizer state (its experts' moments differ from the others');
        a LoRA run also its adapters, which the merged weights beside them do not give back."""
        path = optimizer_file(checkpoint, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.optimizer.state_dict(), path)
        if self.lora is not None:
            save_file(adapter_state(self.accelerator.unwrap_model(self.model)), str(adapter_file(checkpoint)))

    def close(self) -> None:
        self.weights.close()
        if self.group is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
