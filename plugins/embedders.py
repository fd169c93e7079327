"""Embedders: how alike two short answers are, for pair selectors that reward diversity.

- `wordnet` (the default, offline): for single words, from WordNet's noun hierarchy.
- `sentence-transformers`: cosine similarity of any sentence-transformers model,
  from the Hugging Face hub or a local folder
  (`--embedder sentence-transformers:<name-or-path>`).
"""

from __future__ import annotations

import os

import torch

from pref.errors import PrefError
from pref.hub import FROM_CACHE, cache_only
from pref.hookspecs import hookimpl
from pref.interfaces import Embedder
from pref.plugins.noun_quality import trim

DEFAULT_SENTENCE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class WordNetEmbedder(Embedder):
    """Word similarity from WordNet: the best Wu-Palmer similarity between the words' first noun senses.

    Wu-Palmer is 2 x depth(common ancestor) / (depth(a) + depth(b)): 0.86 for
    dog and cat, 0.15 for dog and democracy (every noun shares the root, so
    unrelated nouns stay a little above 0). Inflections are looked up by their
    base form ("apples" is "apple"); case and surrounding punctuation are
    ignored. A text WordNet does not know is 0.0 to every other text and 1.0
    to itself. Each pair is computed once per embedder.

    Args:
        senses: how many noun senses of each word to compare, most frequent first.
    """

    def __init__(self, senses: int = 3):
        if senses < 1:
            raise PrefError(f"wordnet embedder: senses must be at least 1, not {senses}")
        self.senses = senses
        self._synsets: dict[str, list] = {}
        self._pairs: dict[tuple[str, str], float] = {}

    def similarity(self, texts: list[str]) -> torch.Tensor:
        """Pairwise similarity [N, N] of `texts`, symmetric, 1.0 on the diagonal."""
        keys = [self._key(text) for text in texts]
        out = torch.eye(len(keys))
        for i in range(len(keys)):
            for j in range(i + 1, len(keys)):
                out[i, j] = out[j, i] = self._pair(keys[i], keys[j])
        return out

    @staticmethod
    def _key(text: str) -> str:
        # WordNet writes multi-word entries with underscores: "ice_cream"
        return "_".join(trim(text).lower().split())

    def _pair(self, a: str, b: str) -> float:
        if a == b:
            return 1.0
        pair = (a, b) if a < b else (b, a)
        if pair not in self._pairs:
            scores = [x.wup_similarity(y) or 0.0 for x in self._noun_senses(a) for y in self._noun_senses(b)]
            self._pairs[pair] = max(scores, default=0.0)
        return self._pairs[pair]

    def _noun_senses(self, key: str) -> list:
        if key not in self._synsets:
            from pref.plugins.wordnet_data import wordnet

            self._synsets[key] = wordnet().synsets(key, "n")[: self.senses] if key else []
        return self._synsets[key]


class SentenceTransformerEmbedder(Embedder):
    """Cosine similarity of sentence-transformers embeddings (a hub id or a local folder).

    Args:
        model: a Hugging Face hub id or a local folder saved by sentence-transformers.
        device: "cpu", "cuda", ...; by default sentence-transformers picks one.
    """

    def __init__(self, model: str = DEFAULT_SENTENCE_MODEL, device: str | None = None):
        if model.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(model)):
            raise PrefError(f"sentence-transformers model folder {model!r} does not exist")
        from sentence_transformers import SentenceTransformer  # slow to import: only when used

        self.model_name, path = model, os.path.expanduser(model)
        hub = {"local_files_only": True, "model_kwargs": FROM_CACHE} if cache_only(path) else {}
        try:
            self.model = SentenceTransformer(path, device=device, **hub)
        except Exception as exc:  # hub unreachable, no such model, not a model folder
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise PrefError(
                f"cannot load sentence-transformers model {model!r} ({reason}); "
                "if the Hugging Face hub is unreachable, pass a local folder: --embedder sentence-transformers:/path/to/model"
            ) from None

    def similarity(self, texts: list[str]) -> torch.Tensor:
        """Pairwise cosine similarity [N, N] of `texts`' normalized embeddings."""
        if not texts:
            return torch.zeros(0, 0)
        embeddings = self.model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
        return (embeddings @ embeddings.T).float().cpu().clamp(-1.0, 1.0)


@hookimpl
def register_embedders(register):
    register("wordnet", WordNetEmbedder)
    register("sentence-transformers", SentenceTransformerEmbedder)
