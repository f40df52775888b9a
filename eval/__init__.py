"""Benchmark evaluation (miniF2F, ProofNet, math), installed as `grpo.eval`. See the eval issue."""
