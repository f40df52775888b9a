"""Rollout engines (vLLM in Ray actors) and the weight transport from trainer to engines."""
