"""The `char-ngrams` embedder: how alike two texts are, from the character n-grams they share."""

from __future__ import annotations

from collections import Counter

import torch

from pref import Embedder, PrefError, hookimpl


class CharacterNgrams(Embedder):
    """Cosine similarity of character n-gram counts: alike in spelling, not in meaning (no model needed).

    Options:
        n: the n-gram length (default 3).
    """

    def __init__(self, n: int = 3):
        if n < 1:
            raise PrefError(f"char-ngrams: n must be at least 1, not {n}")
        self.n = n

    def similarity(self, texts: list[str]) -> torch.Tensor:
        """Pairwise similarity [N, N]: 1.0 for the same n-grams, 0.0 for none in common."""
        counts = [Counter(self.ngrams(text)) for text in texts]
        columns = {gram: i for i, gram in enumerate(sorted(set().union(*counts)))}
        vectors = torch.zeros(len(texts), max(1, len(columns)))
        for row, grams in enumerate(counts):
            for gram, count in grams.items():
                vectors[row, columns[gram]] = count
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return vectors @ vectors.T

    def ngrams(self, text: str) -> list[str]:
        padded = f" {text.strip().lower()} "  # marks where words start and end; never empty
        return [padded[i : i + self.n] for i in range(max(1, len(padded) - self.n + 1))]


@hookimpl
def register_embedders(register):
    register("char-ngrams", CharacterNgrams)
