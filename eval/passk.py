"""Unbiased pass@k (Chen et al., 2021, "Evaluating Large Language Models Trained on Code")."""

from __future__ import annotations


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n, of which c are
    correct, is correct: `1 - C(n-c, k) / C(n, k)`, computed as a stable product.

    >>> pass_at_k(n=4, c=1, k=2)
    0.5
    """
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product
