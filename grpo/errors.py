"""Errors that stop a run with a one-line message (kept free of heavy imports for the CLI)."""


class ParityError(RuntimeError):
    """vLLM and the trainer disagree on logprobs after a weight sync: the sync is broken."""
