"""Answer normalisation: an answer is correct when normalize(output) == normalize(expected).

Torch-free; training (answer-form instructions), evaluation and the benchmarks score with it.
"""

from __future__ import annotations


def normalize(text: str) -> str:
    """Lower case, single spaces, no surrounding spaces or final period."""
    return " ".join(text.lower().split()).rstrip(".").strip()
