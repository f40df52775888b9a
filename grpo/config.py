"""Recipe schema: one YAML file = model + data + rewards + algorithm + resources.

Every section is a pydantic model with `extra="forbid"`, so a typo in a key is an error naming the
key, not a silently ignored setting. `load_recipe` turns every problem into one `RecipeError` line.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from grpo.algorithms.advantages import ADVANTAGES
from grpo.algorithms.losses import AGGREGATIONS


class RecipeError(ValueError):
    """A problem with the user's recipe or command line; the CLI prints it and exits 2."""


def output_folder(path: Path, what: str) -> Path:
    """`path` made, parents too, for a command's outputs; a RecipeError naming `what` (the recipe key
    or option that gave it) where it cannot be made: a read-only place, a file in the way."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RecipeError(f"{what}: cannot create {path} ({error.strerror or error})") from None
    return path


class Section(BaseModel):
    # NaN and infinity are refused everywhere: a weight or learning rate of either ruins a run silently
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RunConfig(Section):
    name: str = "run"
    """Run folder name under `output_dir`: one folder, so no separator, `.` or `..` (which would put
    the run's files beside or above other runs')."""
    output_dir: Path = Path("runs")
    seed: int = 0
    tensorboard: bool = False
    """Also write each step's metrics as TensorBoard scalars under the run folder's `tensorboard/`
    (`tensorboard --logdir runs`)."""

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str) -> str:
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"{name!r} is not one folder's name (no '/', '.' or '..')")
        return name


class ModelConfig(Section):
    path: str
    """A Hugging Face folder, or `tiny:deepseek_v3` for the embedded tiny DeepSeek-V3 (random init).
    A folder in DeepSeek-V3's FP8 format is trained from its BF16 copy (`grpo.models.fp8_dequantize`)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Training and rollout dtype. float32 on CPU keeps vLLM and trainer logprobs equal to ~1e-6."""
    fp8: bool = False
    """Train with FP8 GEMMs (DeepSeek-V3 recipe, `grpo.models.fp8`): every linear layer but the
    embedding, output head, router gate and norms (and, with `moe: grouped`, the routed experts).
    The master weights (and what vLLM receives) stay in `dtype`; the parity check runs the trainer
    in that precision too, and logs the FP8 forward's own gap to vLLM as `sync/fp8_gap_*`."""
    fp8_exclude: list[str] = []
    """With `fp8`: layers kept in `dtype` besides the defaults, each named by whole dotted components
    of its module name: `self_attn` (every attention projection), `layers.0`, `mlp.experts` (the
    routed experts of `moe: grouped`). A part that names no layer FP8 would convert is an error."""
    tiny_overrides: dict[str, Any] = {}
    """DeepSeek-V3 config fields that grow the embedded model (`path: tiny:deepseek_v3`), e.g.
    `{hidden_size: 1024, num_hidden_layers: 8}`; see `recipes/arithmetic_sft_h100.yaml`."""
    moe: Literal["grouped", "transformers"] = "grouped"
    """How DeepSeek-V3 / Qwen3-MoE expert blocks train: `grouped` swaps in the project's MoE layer
    (`grpo.models.moe`: grouped GEMM, FP8 experts with `fp8`, load statistics, balancing);
    `transformers` keeps transformers' own blocks (experts then stay in `dtype` even with `fp8`)."""

    @model_validator(mode="after")
    def _overrides_need_the_tiny_model(self) -> ModelConfig:
        if self.tiny_overrides and self.path != "tiny:deepseek_v3":
            raise ValueError("tiny_overrides: only applies to path tiny:deepseek_v3")
        if self.tiny_overrides:  # at load, not when the model is built minutes into a run
            from grpo.models.tiny import check_tiny_overrides

            check_tiny_overrides(self.tiny_overrides)
        return self

    @model_validator(mode="after")
    def _exclusions_need_fp8(self) -> ModelConfig:
        if self.fp8_exclude and not self.fp8:
            raise ValueError("fp8_exclude: only applies with fp8: true")
        return self


class DataConfig(Section):
    source: str = "task:arithmetic"
    """`task:arithmetic`, a local .jsonl/.json/.parquet file, a Hugging Face dataset id, or
    `benchmark:NAME[:STYLE]`: a benchmark of `grpo eval` (`minif2f`, `proofnet`, `math500`, `gsm8k`),
    its file read and its rows prompted as `grpo eval NAME --prompt STYLE` does (`noncot` or `cot`
    for the Lean ones; `noncot` unless named)."""
    split: str = "train"
    eval_source: str | None = None
    """Held-out prompts; defaults to the task's eval split, or to `source` with `eval_split`."""
    eval_split: str = "test"
    prompt_field: str = "prompt"
    """The field whose text is each row's prompt, where `prompt_template` is not set."""
    answer_field: str = "answer"
    """The field holding each row's gold answer, which rewards compare against."""
    prompt_template: str | None = None
    """Python format string over the row's fields, e.g. `Problem: {problem}\\nAnswer: `."""
    chat: bool = False
    """Send each prompt as the user's turn of the model's chat template, the assistant's turn opened
    (an instruct model); off, the prompt text is the model's input as it is (a base model)."""
    system_prompt: str | None = None
    """With `chat`: a system turn before the user's."""

    @model_validator(mode="after")
    def _one_way_to_name_the_prompt(self) -> DataConfig:
        if self.prompt_template is not None and self.prompt_field != "prompt":
            raise ValueError("prompt_field: not read where prompt_template is set (name the field there)")
        if self.system_prompt is not None and not self.chat:
            raise ValueError("system_prompt: only applies with chat: true")
        sources = (self.source, self.eval_source or self.source)  # a file among them reads the keys
        given = [
            key
            for key in ("prompt_template", "prompt_field", "answer_field")
            if getattr(self, key) != type(self).model_fields[key].default
        ]
        if all(source.startswith("benchmark:") for source in sources) and given:
            raise ValueError(
                f"{given[0]}: not read with a benchmark: source, which prompts as grpo eval does"
            )
        return self


class RolloutConfig(Section):
    engines: int = Field(1, ge=1)
    """vLLM engines, each a Ray actor."""
    group_size: int = Field(8, ge=2)
    """G completions sampled per prompt; advantages are relative within the group."""
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[Annotated[str, Field(min_length=1)]] = []
    """Strings that end a completion (vLLM's `stop`), in training and in the held-out evaluation: the
    text the rewards read ends before the string; the tokens that train include it."""
    cpus_per_engine: float = Field(1.0, gt=0.0)
    engine_kwargs: dict[str, Any] = {}
    """Extra keyword arguments for `vllm.LLM` (e.g. `gpu_memory_utilization`)."""
    colocate: bool = False
    """GPUs: the trainer and the engines share cards (each asks Ray for 1 / (engines + 1) of a GPU).
    Set `engine_kwargs.gpu_memory_utilization` to the share of GPU memory vLLM may take."""
    overlap: bool = False
    """Sample the next step's groups while the trainer updates on this step's (one-step off-policy,
    as verl's and OpenRLHF's asynchronous modes): every step after the first trains on completions
    from the weights one step older than its own. `algorithm.sampler_ratio_cap` or
    `algorithm.old_policy: sampler` corrects for that lag; on the demo the lag cost learning without
    either (README, Algorithm)."""


class AlgorithmConfig(Section):
    advantage: str = "grpo"
    """One of `grpo` ((r-mean)/std), `dr_grpo` (r-mean), `rloo` (leave-one-out)."""
    loss_aggregation: str = "seq_mean_token_mean"
    """`seq_mean_token_mean` (GRPO), `token_mean` (DAPO), `seq_mean_token_sum_norm` (Dr. GRPO)."""
    eps_low: float = Field(0.2, ge=0.0, lt=1.0)
    eps_high: float = Field(0.2, ge=0.0)
    """Upper clip; eps_high > eps_low is DAPO's clip-higher."""
    beta: float = Field(0.0, ge=0.0)
    """KL coefficient to the frozen reference; 0 builds no reference model at all."""
    kl_estimator: Literal["k3", "k2"] = "k3"
    """`k3` (GRPO's; its gradient is the forward KL's) or `k2` (its gradient is the reverse KL's),
    see `grpo.algorithms.kl`."""
    mu: int = Field(1, ge=1)
    """Optimizer passes over each rollout batch, all against the same old-policy logprobs."""
    ratio_level: Literal["token", "sequence"] = "token"
    """`token`: each token's ratio pi / pi_old is clipped (PPO, GRPO). `sequence`: GSPO's, one
    length-normalised ratio per completion, clipped as a whole (GSPO clips it with small bounds,
    eps_low 3e-4 and eps_high 4e-4). The two differ only with mu > 1: in one pass the ratio is 1."""
    sampler_ratio_cap: float | None = Field(None, ge=1.0)
    """Truncated importance sampling: weight each token's policy-gradient term by
    min(pi_old / pi_vllm, cap), correcting for the sampling engine's logprobs differing from the
    trainer's (FP8 rollouts, other kernels). Both are logprobs of the untempered model, so it corrects
    that difference, not the sampling temperature. Off (None) by default; set a cap such as 2."""
    old_policy: Literal["trainer", "sampler"] = "trainer"
    """The clipped ratio's pi_old. `trainer`: the trainer's logprobs from before the step's first
    pass (PPO's). `sampler`: vLLM's logprobs of the sampled tokens, so the clip also bounds how far
    the update moves from the weights that sampled (a step behind with `rollout.overlap`; verl's
    one-step off-policy mode does the same). A token vLLM gave no logprob keeps the trainer's."""
    drop_tied_groups: bool = False
    """Leave out groups whose rewards all tie (they carry no signal)."""
    resample_rounds: int = Field(0, ge=0)
    """DAPO's dynamic sampling, with `drop_tied_groups`: up to this many more rounds of sampling per
    step, each on as many new prompts as the batch lacks groups with signal; the batch then trains on
    `train.prompts_per_step` such groups, or on those it found. 0: the tied groups are only left out."""

    @model_validator(mode="after")
    def _one_correction_for_the_sampler(self) -> AlgorithmConfig:
        if self.old_policy == "sampler" and self.sampler_ratio_cap is not None:
            raise ValueError(
                "sampler_ratio_cap: weights by pi_old / pi_vllm, which is 1 when old_policy is "
                "sampler; set one of the two"
            )
        return self

    @model_validator(mode="after")
    def _resample_replaces_dropped_groups(self) -> AlgorithmConfig:
        if self.resample_rounds and not self.drop_tied_groups:
            raise ValueError(
                "resample_rounds: replaces the tied groups drop_tied_groups leaves out; set "
                "drop_tied_groups: true"
            )
        return self

    @model_validator(mode="after")
    def _known_components(self) -> AlgorithmConfig:
        for key, table in (("advantage", ADVANTAGES), ("loss_aggregation", AGGREGATIONS)):
            if getattr(self, key) not in table:
                raise ValueError(f"{key}: unknown {getattr(self, key)!r}, use one of {sorted(table)}")
        return self


class LoraConfig(Section):
    """LoRA adapters (`grpo.models.lora`): only they train; vLLM receives the merged weights."""

    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0.0)
    """The adapters' output is scaled by alpha / rank."""
    targets: list[Annotated[str, Field(min_length=1)]] = Field(
        [
            *("q_proj", "k_proj", "v_proj", "o_proj"),
            *("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"),
            *("gate_proj", "up_proj", "down_proj"),
        ],
        min_length=1,
    )
    """Names of the linear layers that get adapters, matched as the last part of a module's name
    (the default covers Llama, Qwen and DeepSeek attention and MLPs; routed experts held as one
    grouped weight get none). Each name of a list you give must name a linear layer of the model;
    of the default's names, those of other model families are skipped."""


class TrainConfig(Section):
    steps: int = Field(20, ge=1)
    prompts_per_step: int = Field(8, ge=1)
    learning_rate: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    lr_warmup_steps: int = Field(0, ge=0)
    """Raise the learning rate linearly over the first N steps: step k of them trains at k/N of it."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """After the warm-up: keep the rate, or take it down to `lr_min_ratio` of it by the end of
    `train.steps`, on a line or half a cosine (`grpo.trainer.schedule`)."""
    lr_min_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Where `linear` and `cosine` end, as a share of `learning_rate`."""
    max_grad_norm: float = Field(1.0, gt=0.0)
    micro_batch_size: int = Field(64, ge=1)
    """Completions per forward/backward; gradients accumulate to the whole rollout batch."""
    micro_batch_tokens: int | None = Field(None, ge=1)
    """Also cap each micro-batch's padded size (rows x its longest row, prompt and completion) at this
    many tokens, so that memory follows the tokens rather than the row count (verl's
    `ppo_max_token_len_per_gpu`). A row longer than the cap gets a micro-batch of its own."""
    fp8_warm_up: bool = False
    """With `model.fp8` on a Hopper GPU where DeepGEMM runs: before the first step, compile the FP8
    GEMMs' kernels for every micro-batch size up to the largest (`micro_batch_tokens`, else
    `micro_batch_size` times the context; in `grpo sft`, `sft.batch_size` times the context; 32768
    tokens at most) in processes side by side, instead
    of one after another during the first steps (`grpo.models.fp8_warm_up`). Off by default: it
    compiles every padded row size, which paid on an H100 with 16 CPUs (0.72x the time to the third
    step), was even at 8 and cost 1.22x at 4; turn it on where more than 8 CPUs compile side by side."""
    sync_interval: int = Field(1, ge=1)
    """Push weights to the vLLM engines every this many optimizer steps."""
    parity_tolerance: float | None = Field(None, gt=0.0)
    """Max |logprob_vllm - logprob_trainer| per token of a fixed sequence after a sync; above it the run
    stops. Default by `model.dtype`: 1e-3 in float32; 2.0 in bfloat16, where vLLM's kernels and the
    trainer's round differently (up to 0.93 measured on an H100; a broken sync moved logprobs by 4)."""
    checkpoint_interval: int = Field(0, ge=0)
    """Save a checkpoint every N steps (0: only the final one); each is one `grpo train --resume` can
    continue from (`grpo.trainer.checkpoint`)."""
    threads: int = Field(0, ge=0)
    """torch CPU threads in the trainer (0: all cores)."""
    bf16_moments: bool = False
    """AdamW keeps its two moments in BF16 (half the optimizer memory) and, for BF16 weights, an
    FP32 master copy (`grpo.trainer.optim`)."""
    routing_bias_gamma: float = Field(0.0, ge=0.0)
    """Auxiliary-loss-free balancing: after each optimizer step every expert's routing bias moves by
    gamma * sign(mean load - its load) (in `grpo train` and `grpo sft`); DeepSeek-V3 used 0.001.
    Needs `model.moe: grouped`."""
    balance_loss_alpha: float = Field(0.0, ge=0.0)
    """Weight of DeepSeek-V3's sequence-wise balance loss in `grpo train` and `grpo sft` (0: off).
    Needs `model.moe: grouped`."""
    gradient_checkpointing: bool = False
    """Keep only each decoder layer's input for the backward and run its forward again there: the
    activations' memory for one more forward of compute (`grpo.models.activation_checkpointing`)."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of every weight (`{rank: 16, alpha: 32}`); the checkpoints hold the
    merged weights. Not with `model.fp8` or `expert_parallel_size` above 1."""
    expert_parallel_size: int = Field(1, ge=1)
    """Trainer ranks in `grpo train` (`grpo sft` refuses more than 1), one process each (gloo on CPU,
    NCCL on GPUs, on one host): the routed experts are sharded over them and the rollout batch is
    split between them, while every other weight is replicated and its gradients summed
    (`grpo.parallel.expert_parallel`). Needs `model.moe: grouped` and a number of routed experts it
    divides."""


class RewardSpec(Section):
    name: str
    """Registry name (`math`), import path `pkg.module:fn`, or file path `path/to/file.py:fn`."""
    weight: float = 1.0
    kwargs: dict[str, Any] = {}
    """Keyword arguments bound to the function, e.g. `{max_tokens: 1024, buffer: 256}` for `overlong`."""

    @property
    def label(self) -> str:
        """The name its metrics carry (`reward/<label>/ok`): the function's name, or the registry's."""
        return self.name.rpartition(":")[2]


class RewardRuntimeConfig(Section):
    workers: int = Field(2, ge=1)
    timeout_s: float = Field(10.0, gt=0.0)


class EvalConfig(Section):
    prompts: int = Field(200, ge=0)
    """Held-out prompts scored before and after training (0 skips)."""
    temperature: float = Field(0.0, ge=0.0)
    """0 is greedy decoding; above 0, greedy accuracy is reported as well."""
    samples: int = Field(1, ge=1)
    """Completions per held-out prompt; accuracy is their mean (mean@k). More than 1 needs a
    temperature above 0 (greedy samples are one completion repeated)."""
    max_tokens: int = Field(64, ge=1)
    interval: int = Field(0, ge=0)
    """Also evaluate every N training steps and log `eval/accuracy`... in that step's metrics (0: only
    before and after training)."""

    @model_validator(mode="after")
    def _samples_need_sampling(self) -> EvalConfig:
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(
                f"samples: {self.samples} at temperature 0 decodes one greedy completion "
                f"{self.samples} times; give temperature above 0, or samples: 1"
            )
        return self


class SftConfig(Section):
    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0)
    boxed_fraction: float = Field(1.0, ge=0.0, le=1.0)
    """Arithmetic task only: share of worked solutions that end in a boxed answer."""


PARITY_TOLERANCE = {"float32": 1e-3, "bfloat16": 2.0}
"""`train.parity_tolerance` where the recipe gives none, by `model.dtype`."""


class Recipe(Section):
    run: RunConfig = RunConfig()
    model: ModelConfig
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    train: TrainConfig = TrainConfig()
    rewards: list[RewardSpec] = Field([RewardSpec(name="math")], min_length=1)
    reward_runtime: RewardRuntimeConfig = RewardRuntimeConfig()
    eval: EvalConfig = EvalConfig()
    sft: SftConfig | None = None
    """Supervised warm-up settings, used by `grpo sft`."""

    @property
    def run_dir(self) -> Path:
        return self.run.output_dir / self.run.name

    @model_validator(mode="after")
    def _parity_tolerance_by_dtype(self) -> Recipe:
        if self.train.parity_tolerance is None:
            self.train.parity_tolerance = PARITY_TOLERANCE[self.model.dtype]
        return self

    @model_validator(mode="after")
    def _rewards_learn_and_log_apart(self) -> Recipe:
        """Some reward must count. And two rewards of one label would share their metrics, and the
        first listed one's outcome, which held-out accuracy reads, would be the second's."""
        if all(reward.weight == 0 for reward in self.rewards):
            raise ValueError(
                "rewards: every weight is 0, so every advantage would be 0 and no step would learn"
            )
        seen: dict[str, str] = {}
        for reward in self.rewards:
            if reward.label not in seen:
                seen[reward.label] = reward.name
            elif seen[reward.label] == reward.name:
                raise ValueError(f"rewards: {reward.name} is listed twice (their metrics would merge)")
            else:
                raise ValueError(
                    f"rewards: {seen[reward.label]} and {reward.name} would both log as {reward.label!r}; "
                    "give one function another name"
                )
        return self

    @model_validator(mode="after")
    def _lora_on_plain_layers(self) -> Recipe:
        if self.train.lora is not None and self.model.fp8:
            raise ValueError("train.lora: the FP8 layers take no LoRA adapters; set model.fp8: false")
        if self.train.lora is not None and self.train.expert_parallel_size > 1:
            raise ValueError(
                "train.lora: not with expert_parallel_size above 1 (the adapters are not sharded)"
            )
        return self

    @model_validator(mode="after")
    def _schedule_does_what_it_says(self) -> Recipe:
        train = self.train
        if train.lr_warmup_steps >= train.steps:
            raise ValueError(
                f"train.lr_warmup_steps: {train.lr_warmup_steps} is not below train.steps "
                f"({train.steps}), so no step would train at train.learning_rate"
            )
        if train.lr_schedule == "constant" and train.lr_min_ratio != 0:
            raise ValueError("train.lr_min_ratio: needs train.lr_schedule: linear or cosine")
        return self

    @model_validator(mode="after")
    def _moe_options_need_the_moe_layer(self) -> Recipe:
        # transformers' MoE blocks have none of these; left on there, they would be ignored silently
        if self.model.moe != "grouped":
            for key, off in (
                ("expert_parallel_size", 1),
                ("routing_bias_gamma", 0.0),
                ("balance_loss_alpha", 0.0),
            ):
                if getattr(self.train, key) != off:
                    raise ValueError(f"train.{key}: needs model.moe: grouped")
        return self


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """`rewards.1.weight` names a list's item by its index, as the error messages do."""
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        slot = _slot(node, key, dotted)
        if isinstance(node, dict):
            node.setdefault(slot, {})
        if not isinstance(node[slot], (dict, list)):
            raise RecipeError(f"--set {dotted}: {key!r} is not a section")
        node = node[slot]
    node[_slot(node, leaf, dotted)] = value


def _slot(node: dict | list, key: str, dotted: str) -> str | int:
    """`key` as `node` takes it: a list's items by index, only those it has."""
    if not isinstance(node, list):
        return key
    if not (key.isdigit() and int(key) < len(node)):
        raise RecipeError(f"--set {dotted}: no item {key!r} (the list has {len(node)}, from 0)")
    return int(key)


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """`["train.steps=3", "rollout.temperature=0.7"]`: values are parsed as YAML scalars."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise RecipeError(f"--set {item!r}: not a YAML value ({str(error).splitlines()[0]})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _one_line(error: ValidationError, source: str, overrides: Sequence[str]) -> str:
    """`SOURCE: KEY: MESSAGE`, where SOURCE is the `--set` that gave KEY its value, else the recipe."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])  # empty for a check across sections
    message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
    message = message.removeprefix("Value error, ")  # a check across sections names its keys itself
    # the `--set` of this key or of a section above it (`train.lora.targets=['']` for `...targets.0`)
    given = [item for item in overrides if _covers(item.partition("=")[0].strip(), where)]
    if given:
        source = f"--set {given[-1]!r}"
        if first["type"].endswith("_type") and isinstance(first.get("input"), (dict, list)):
            message += " (YAML read the value as a mapping or list; quote it)"  # `{q}` or `[a]` unquoted
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{source}: {where}: {message}{more}" if where else f"{source}: {message}{more}"


def _covers(dotted: str, where: str) -> bool:
    return where == dotted or where.startswith(f"{dotted}.")


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML forbids a key twice in one mapping, but PyYAML keeps the last silently: a section written
    twice would drop the first one's keys without a word."""

    def construct_mapping(self, node, deep=False):
        lines: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, str) and key in lines:
                raise _DuplicateKey(f"key {key!r} twice in one mapping, lines {lines[key]} and {line}")
            lines[key] = line
        return super().construct_mapping(node, deep)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        tree = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections")
    overrides = list(overrides)
    return recipe_from_dict(apply_overrides(tree, overrides), source=str(path), overrides=overrides)


def recipe_from_dict(tree: dict, source: str = "recipe", overrides: Sequence[str] = ()) -> Recipe:
    """The recipe `tree` describes; a RecipeError naming `source`, or the one of `overrides` (`--set`
    items) that gave the bad value."""
    try:
        return Recipe.model_validate(tree)
    except ValidationError as error:
        raise RecipeError(_one_line(error, source, overrides)) from None


def changed_settings(earlier, now: Mapping, may_change: Sequence[str] = ()) -> list[str]:
    """`KEY EARLIER, not NOW` for each setting whose value differs, nested sections named by dotted
    keys (`train.learning_rate`), in `now`'s order; the keys in `may_change` are left out. What a run
    folder recorded (`earlier`) may be anything its file held: every setting then reads as changed."""
    before, after = dict(_leaves(earlier)), dict(_leaves(now))
    keys = [*after, *(key for key in before if key not in after)]
    return [
        f"{key} {before.get(key)!r}, not {after.get(key)!r}"
        for key in keys
        if key not in may_change and before.get(key) != after.get(key)
    ]


def _leaves(tree, prefix: str = ""):
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tree


def dump_recipe(recipe: Recipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))


RUN_OUTPUTS = (
    *("config.yaml", "metrics.jsonl", "summary.json", "curves.png"),
    *("tensorboard", "init", "final", "checkpoints"),
)
"""What `grpo sft` and `grpo train` write in a run folder, besides the `eval_*.jsonl` records."""


def check_model_outside_run(recipe: Recipe) -> None:
    """A RecipeError where the model to start from lies in the run's own folder, whose outputs the
    run clears when it starts (continuing from `runs/x/final` as run `x` would delete the input)."""
    run_dir, model = recipe.run_dir.resolve(), Path(recipe.model.path).resolve()
    if model == run_dir or run_dir in model.parents:
        raise RecipeError(
            f"model.path: {recipe.model.path} is inside {recipe.run_dir}, the folder of run "
            f"{recipe.run.name!r}, which a run clears when it starts: give run.name another name"
        )


def start_run_folder(recipe: Recipe) -> Path:
    """The run's folder, made, holding its recipe and none of an earlier run's outputs: a stale
    `checkpoints/step-40` or `eval_before.jsonl` beside this run's files would read as its own, and
    a `summary.json` as its result if it stopped early. Other files in the folder are left alone."""
    run_dir = output_folder(recipe.run_dir, "run.output_dir")
    for entry in [*map(run_dir.joinpath, RUN_OUTPUTS), *run_dir.glob("eval_*.jsonl")]:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
    dump_recipe(recipe, run_dir / "config.yaml")
    return run_dir
