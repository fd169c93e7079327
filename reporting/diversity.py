"""Diversity measures over a list of sampled answers."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def normalize(text: str) -> str:
    return text.strip().lower()


def distinct_ratio(texts: Sequence[str]) -> float:
    """Distinct answers / answers (after trimming and lowercasing)."""
    return len({normalize(t) for t in texts}) / max(1, len(texts))


def entropy_bits(texts: Sequence[str]) -> float:
    """Entropy in bits of the empirical distribution of answers."""
    counts = Counter(normalize(t) for t in texts)
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
