#!/usr/bin/env bash
# The one-GPU GRPO run and its measurements, as run on the lent H100 (device machine).
# Prerequisite: the vLLM 0.26 / Ray wheels unpacked into /tmp/site (../shared/gpu/README.md) plus
# setuptools and matplotlib (the image lacks them). Each stage writes its log and results to $OUT.
#   usage: OUT=/some/dir benchmarks/h100_loop.sh STAGE...
#   stages: install | sft | smoke | grpo_fp8 | grpo_bf16 | moe_bench | fp8_bench
#           | sft_1b | smoke_1b | grpo_1b | breakdown_1b (the ~1.1 B variant: 96 routed experts, FP8 rollouts too)
#           | gpu_tests | grouped_bench | export_vllm | ep (ep: a machine of 2+ GPUs)
#           | fp8_profile (the FP8 layer step kernel by kernel, twice, and fp8_linear_gpu.py: the speed target)
#           | sft_short | grpo_ep (grpo_ep: a machine of 4 GPUs, after sft or sft_short)
#           | features (after sft or sft_short: sessions 31-32's loop features, a few steps each)
#           | overlap (after sft or sft_short: the loop with and without rollout.overlap, side by side)
#           | first_steps (the FP8 trainer's first steps on empty kernel caches) | token_cap (after sft)
#           | warm_up (the FP8 kernels compiled ahead: its GPU test, and first_steps with and without it)
# `install` needs only the image plus pydantic (carried as wheels in .whl); stages that start vLLM or
# Ray need the wheels of ../shared/gpu/README.md in /tmp/site. Without them, DEEP_GEMM_DIR names a folder made
# by deep_gemm_from_vllm_wheel.sh (carried along), so that the FP8 layers find DeepGEMM all the same.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/grpo_site:/tmp/site${DEEP_GEMM_DIR:+:$(realpath "$DEEP_GEMM_DIR")} VLLM_LOGGING_LEVEL=WARNING
# the installed entry point: `python3 -m` would import the source tree (cwd) instead of the install
grpo() { python3 /tmp/grpo_site/bin/grpo "$@"; }
# the ~1.1 B variant: the H100 recipe with 96 routed experts (active parameters unchanged); its GRPO
# run samples in FP8 too (vLLM's online quantization, redone at every in-place weight reload)
ONE_B=(--set model.tiny_overrides.n_routed_experts=96)
ONE_B_GRPO=(--set model.path=runs/arithmetic-sft-h100-1b/final --set rollout.engine_kwargs.quantization=fp8)

stage() {
  local name=$1
  shift
  echo "=== $name: $*"
  local start=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - start)) s"
  tail -n 25 "$OUT/$name.log"
  return $rc
}

run_summary() {  # keep what a run folder says about itself
  local run=$1
  cp "runs/$run/metrics.jsonl" "$OUT/$run.metrics.jsonl" 2>/dev/null
  cp "runs/$run/summary.json" "$OUT/$run.summary.json" 2>/dev/null
}

for what in "$@"; do
  case $what in
  install)
    stage install python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade \
      --target /tmp/grpo_site . ;;
  sft)
    stage sft grpo sft recipes/arithmetic_sft_h100.yaml ;;
  sft_short)  # a shorter warm-up, enough for the GRPO run to start from a non-zero reward
    stage sft_short grpo sft recipes/arithmetic_sft_h100.yaml --set sft.steps="${SFT_STEPS:-600}" ;;
  smoke)
    stage smoke grpo train recipes/arithmetic_grpo_h100.yaml --set run.name=smoke --set train.steps=3 \
      --set eval.prompts=8 ;;
  grpo_fp8)
    stage grpo_fp8 grpo train recipes/arithmetic_grpo_h100.yaml
    run_summary arithmetic-grpo-h100
    stage breakdown_fp8 python3 benchmarks/loop_breakdown.py runs/arithmetic-grpo-h100 ;;
  grpo_bf16)
    stage grpo_bf16 grpo train recipes/arithmetic_grpo_h100.yaml --set run.name=bf16-20 \
      --set model.fp8=false --set train.steps=20 --set eval.prompts=0
    run_summary bf16-20
    stage breakdown_bf16 python3 benchmarks/loop_breakdown.py runs/bf16-20 ;;
  moe_bench)
    stage moe_bench python3 benchmarks/moe_layer_gpu.py ;;
  fp8_bench)
    stage fp8_bench python3 benchmarks/fp8_linear_gpu.py
    stage fp8_quantizers python3 benchmarks/probe_fp8_quantizers_gpu.py ;;
  sft_1b)
    stage sft_1b grpo sft recipes/arithmetic_sft_h100.yaml "${ONE_B[@]}" \
      --set run.name=arithmetic-sft-h100-1b ;;
  smoke_1b)
    stage smoke_1b grpo train recipes/arithmetic_grpo_h100.yaml "${ONE_B_GRPO[@]}" --set run.name=smoke-1b \
      --set train.steps=2 --set eval.prompts=8 ;;
  grpo_1b)
    stage grpo_1b grpo train recipes/arithmetic_grpo_h100.yaml "${ONE_B_GRPO[@]}" \
      --set run.name=grpo-h100-1b --set train.steps="${STEPS_1B:-20}"
    run_summary grpo-h100-1b ;;
  breakdown_1b)
    stage breakdown_1b_fp8_engine python3 benchmarks/loop_breakdown.py runs/grpo-h100-1b
    stage breakdown_1b_bf16_engine python3 benchmarks/loop_breakdown.py runs/grpo-h100-1b \
      --engine-kwarg quantization=none ;;
  gpu_tests)  # -P: import grpo from the install, not the source tree (rewards/, eval/ map into it)
    stage gpu_tests python3 -P -m pytest -q -m gpu tests/test_fp8_grouped.py tests/test_fp8_triton.py \
      tests/test_weight_sync.py tests/test_moe.py tests/test_fp8_activation_cache.py tests/test_swiglu.py tests/test_gather_sum.py \
      tests/test_deep_gemm_mirror.py tests/test_fp8_warm_up.py ;;
  fp8_profile)
    stage fp8_profile_1 python3 benchmarks/probe_fp8_linear_profile_gpu.py
    stage fp8_profile_2 python3 benchmarks/probe_fp8_linear_profile_gpu.py
    stage fp8_linear python3 benchmarks/fp8_linear_gpu.py ;;
  grouped_bench)
    stage grouped_bench python3 benchmarks/fp8_grouped_gpu.py ;;
  export_vllm)
    stage export_vllm env VLLM_USE_DEEP_GEMM=0 python3 benchmarks/fp8_export_vllm_gpu.py ;;
  ep)
    stage ep_tests python3 -P -m pytest -q tests/test_expert_parallel.py tests/test_expert_parallel_trainer.py
    stage ep_bench python3 benchmarks/expert_parallel_gpu.py ;;
  grpo_ep)  # the loop over 4 GPUs: 2 vLLM engines and 2 expert-parallel trainer ranks, one GPU each
    stage grpo_ep grpo train recipes/arithmetic_grpo_h100.yaml --set run.name=grpo-4gpu \
      --set rollout.colocate=false --set rollout.engines=2 --set train.expert_parallel_size=2 \
      --set train.steps="${STEPS_EP:-15}"
    run_summary grpo-4gpu
    stage breakdown_ep python3 benchmarks/loop_breakdown.py runs/grpo-4gpu --batches 0 ;;
  features)  # functional, not timed: eager engines, no held-out evaluation
    local_short=(--set train.steps=2 --set eval.prompts=0 --set rollout.engine_kwargs.enforce_eager=true)
    # FP8: GSPO's sequence ratio, truncated importance sampling, activation checkpointing; then resumed
    fp8_features=(--set run.name=features-fp8 --set train.checkpoint_interval=1 --set algorithm.ratio_level=sequence
      --set algorithm.sampler_ratio_cap=2 --set train.gradient_checkpointing=true)
    stage features_fp8 grpo train recipes/arithmetic_grpo_h100.yaml "${local_short[@]}" "${fp8_features[@]}"
    stage features_fp8_resume grpo train recipes/arithmetic_grpo_h100.yaml "${local_short[@]}" "${fp8_features[@]}" \
      --set train.steps=3 --resume
    run_summary features-fp8
    # BF16 with LoRA adapters: vLLM gets the merged weights; the KL reference (k2) is the adapters
    # turned off; a warm-up then cosine decay of the learning rate
    stage features_lora grpo train recipes/arithmetic_grpo_h100.yaml "${local_short[@]}" --set run.name=features-lora \
      --set model.fp8=false --set 'train.lora={rank: 16, alpha: 32}' --set algorithm.beta=0.04 \
      --set algorithm.kl_estimator=k2 --set train.learning_rate=1e-4 --set train.lr_warmup_steps=1 \
      --set train.lr_schedule=cosine
    run_summary features-lora ;;
  overlap)  # eager engines; on a fresh machine the warm-up run took 5 minutes and a round 3-4, so one
    # round fits a call's ten minutes (session 34: two were cut by the limit)
    stage overlap python3 benchmarks/rollout_overlap.py recipes/arithmetic_grpo_h100.yaml \
      --steps "${OVERLAP_STEPS:-8}" --rounds "${OVERLAP_ROUNDS:-1}" --warmup-steps 3 \
      --set rollout.engine_kwargs.enforce_eager=true ;;
  first_steps)  # the FP8 trainer's first steps under the token cap, each setting on empty kernel caches;
    # `before` and `now` took 259 s and 187 s on the H100 (session 35); `now_nvrtc` fails on CUDA 13 (session 36)
    # shellcheck disable=SC2086
    stage first_steps python3 benchmarks/fp8_first_steps_gpu.py --settings ${FIRST_STEPS_SETTINGS:-before now} ;;
  warm_up)  # the FP8 kernels compiled ahead (train.fp8_warm_up): its GPU test on an empty kernel cache,
    # then the trainer's first steps with and without it, each on empty caches
    stage warm_up_test env DG_JIT_CACHE_DIR=/tmp/dg_warm_up_test python3 -P -m pytest -q -m gpu tests/test_fp8_warm_up.py
    stage first_steps_warm_up python3 benchmarks/fp8_first_steps_gpu.py --settings warm_up now warm_up_again --no-gemm ;;
  token_cap)  # after sft or sft_short: session 34's token-capped run (session 37, empty caches: step 1 trained 240-258 s);
    # FP8_WARM_UP=true compiles the FP8 kernels before step 1 (grpo.models.fp8_warm_up)
    stage token_cap grpo train recipes/arithmetic_grpo_h100.yaml --set run.name=tokcap \
      --set rollout.overlap=true --set algorithm.sampler_ratio_cap=2 --set train.micro_batch_size=128 \
      --set train.micro_batch_tokens=4096 --set train.steps=3 --set eval.prompts=0 \
      --set rollout.engine_kwargs.enforce_eager=true --set train.fp8_warm_up="${FP8_WARM_UP:-false}"
    run_summary tokcap
    # which DeepGEMM kernels the machine has compiled so far (session 37: 61 in a fresh machine's first step)
    stage deep_gemm_kernels python3 benchmarks/deep_gemm_cache_list.py ;;
  *) echo "unknown stage $what"; exit 2 ;;
  esac
done
