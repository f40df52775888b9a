"""Pure tensor functions of the GRPO family: advantages, per-token losses, KL estimators, aggregation."""
