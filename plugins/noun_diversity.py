"""The `noun-diversity` reward: is each answer one common English noun?

The task asks a model for a random common noun, many times over. This reward
scores only quality (1.0 for a common noun, 0.0 for anything else, see
`pref.plugins.noun_quality`); diversity depends on the other answers in the
pool, so the pair selector computes it with an embedder.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from pref.examples import Prompt
from pref.hookspecs import hookimpl
from pref.interfaces import Embedder, RewardSource
from pref.reporting.diversity import distinct_ratio, entropy_bits
from pref.plugins.noun_quality import NounChecker


class NounDiversityReward(RewardSource):
    """1.0 when an answer is one common English noun, else 0.0 (diversity is left to the selector).

    Args:
        min_zipf: the least wordfreq Zipf frequency a word needs (3.0 is once per million words).
        tagger: "wordnet" (offline, the default) or "spacy:<pipeline>" for an installed
            trained spaCy pipeline, such as "spacy:en_core_web_sm".
        dat_words: how many of the first unique valid nouns the DAT-style score uses.
        embedder: the similarity used by `report` (default: the offline WordNet embedder).
    """

    default_prompts: ClassVar[list[str]] = [
        "Name one random common English noun.",
        "Give me a random noun.",
        "Say one common noun.",
        "Name a common noun, just one word.",
        "Tell me any common English noun.",
        "Pick a random everyday noun.",
        "One common noun, please.",
        "Name a random object, one word.",
    ]
    quality_threshold: ClassVar[float | None] = 0.5  # quality is 1.0 or 0.0
    # a valid answer is one word, a few tokens long in a BPE vocabulary (1-5 for the
    # embedded default's nouns, 1-3 for most), then the end of the turn; a longer one fails
    # whatever follows, and a batch samples until its longest answer ends
    max_new_tokens: ClassVar[int | None] = 8

    def __init__(self, min_zipf: float = 3.0, tagger: str = "wordnet", dat_words: int = 10, embedder: Embedder | None = None):
        self.checker = NounChecker(min_zipf=min_zipf, tagger=tagger)
        self.dat_words = dat_words
        self._embedder = embedder

    def score(self, prompts: list[Prompt], completions: list[str]) -> dict[str, torch.Tensor]:
        """`reward` and `quality`, both float [B]: 1.0 where the completion is a common noun."""
        quality = torch.tensor([float(self.checker.is_common_noun(text)) for text in completions], dtype=torch.float32)
        return {"reward": quality, "quality": quality.clone()}

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            from pref.plugins.embedders import WordNetEmbedder

            self._embedder = WordNetEmbedder()
        return self._embedder

    def report(self, prompts: list[Prompt], completions: list[str]) -> dict[str, float]:
        """Valid rate, unique valid nouns, distinct ratio, entropy, pairwise similarity and a DAT-style score.

        The DAT-style score follows the Divergent Association Task (Olson et al.
        2021): the mean pairwise semantic distance x 100 over the first
        `dat_words` unique valid nouns, in the order they were sampled.
        """
        nouns = [self.checker.normalize(c) for c in completions]
        valid = [n for n, c in zip(nouns, completions) if n is not None and self.checker.is_common_noun(c)]
        unique = list(dict.fromkeys(valid))
        figures: dict[str, float] = {
            "samples": float(len(completions)),
            "valid_rate": len(valid) / max(1, len(completions)),
            "unique_valid": float(len(unique)),
            "distinct_ratio": distinct_ratio(completions),
            "entropy_bits": entropy_bits(completions),
        }
        if len(unique) >= 2:
            similarity = self.embedder.similarity(unique)
            pairs = similarity[torch.triu(torch.ones_like(similarity, dtype=torch.bool), diagonal=1)]
            figures.update({"similarity/min": pairs.min().item(), "similarity/mean": pairs.mean().item(), "similarity/max": pairs.max().item()})
            first = similarity[: self.dat_words, : self.dat_words]
            upper = torch.triu(torch.ones_like(first, dtype=torch.bool), diagonal=1)
            figures["dat_score"] = 100.0 * (1.0 - first[upper]).mean().item()
        return figures


@hookimpl
def register_rewards(register):
    register("noun-diversity", NounDiversityReward)
