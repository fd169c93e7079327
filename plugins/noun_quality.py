"""Is an answer one common English noun? The quality check of the noun-diversity task.

An answer passes when, after trimming surrounding punctuation and spaces and
lowercasing, it is:

1. one word, letters only ("the cat" and "ice cream" fail, "Apple." and
   "  house!" pass);
2. not a spaCy stop word ("a", "in", "i", "are", but also "name", "part", "top")
   nor a single letter;
3. common: wordfreq's Zipf frequency is at least `min_zipf` (3.0 is once per
   million words; "xqzt" and "asdf" fail);
4. a noun in WordNet, inflections included ("apples", "children", "boxes"
   pass): WordNet's own lemmatizer (morphy) finds the noun's base form;
5. a common noun: it has a WordNet noun sense that is not an instance and not
   capitalized ("paris", "london", "mary", "june" fail);
6. not a first name: a name that at least `MIN_NAME_SHARE` percent of Americans
   have (1990 US Census, from the `names` package) fails unless its common-noun
   senses were tagged at least `MIN_NAME_NOUN_COUNT` times in WordNet's
   sense-tagged corpus ("anna", "billy", "john", "daisy", "jack" fail; "rose",
   "grace", "bill", "hope" pass; "moon", too rare a name, passes);
7. mostly enough a noun, judged by how often the same word was tagged as each
   part of speech in WordNet's corpus (lemma.count()). Noun uses must be at
   least `MIN_NOUN_SHARE` of all uses, and at least `MIN_NOUN_SHARE_OVER_MODIFIERS`
   of noun, adjective and adverb uses. A word never tagged counts its senses
   instead. Nouns that are also verbs stay ("water", "book", "light", "house",
   "play", "look"); adjectives ("good", "annual", "red") and mostly-verbs
   ("run", "help", "watch") fail. Gerunds with a noun sense pass ("swimming",
   "building", but also "going").

`tagger="spacy:<pipeline>"` replaces rules 4, 5 and 7 with the part-of-speech
tag of an installed trained spaCy pipeline: NOUN passes, PROPN and all else fail.

spaCy's lookup lemmatizer is not used for rule 4: it ignores the part of
speech, so it sends "rose" to "rise", "number" to "numb", "leaves" to "leave"
and "played" to "play". Among the 50,000 most frequent English words, the forms
it lemmatizes to a noun where WordNet's morphy finds none are 2,936 verb and
adjective forms ("played", "faster") and two real plurals ("monies", "passersby").
"""

from __future__ import annotations

import functools
import re

from pref.errors import PrefError

# Noun shares form a continuum, so any threshold misjudges some words; these were
# read off the 6,000 most frequent English words (shares in brackets).
#: Noun uses / all uses. Fails: "walk" (0.07), "watch" (0.088), "help" (0.097),
#: "run" (0.098). Passes: "look" (0.101), "fly" (0.13), "play" (0.20), "light" (0.62).
MIN_NOUN_SHARE = 0.1
#: Noun uses / (noun + adjective + adverb uses): adjectives with a rare noun sense
#: fail here. Fails: "red" (0.15), "cold" (0.17), "blue" (0.26), "alien" (0.29).
#: Passes: "chemical" (0.30), "public" (0.35), "secret" (0.36), "silver" (0.44), "orange" (0.53).
MIN_NOUN_SHARE_OVER_MODIFIERS = 0.3

#: Percent of the 1990 US population with a first name for it to count as a name:
#: "moon" (0.001), "numbers" (0.008) are not names; "jack" (0.32), "daisy" (0.06),
#: "ivy" (0.016) are.
MIN_NAME_SHARE = 0.01
#: Tagged common-noun uses a first name needs to pass as a common noun:
#: "john" (the toilet) has 2 and fails; "rose" has 5, "grace" 11, "bill" 33.
MIN_NAME_NOUN_COUNT = 3

# everything that is not a letter, digit or inner character, at either end
_EDGES = re.compile(r"^[\W_]+|[\W_]+$")


def trim(text: str) -> str:
    """`text` without the spaces and punctuation around it: "  Apple!" -> "Apple"."""
    return _EDGES.sub("", text.strip())


def normalize(text: str) -> str | None:
    """The answer as one lowercase word, or None when it is empty or several words."""
    word = trim(text).lower()
    if not word or any(ch.isspace() for ch in word):
        return None
    return word


@functools.lru_cache(maxsize=None)
def first_names() -> frozenset[str]:
    """Lowercase first names at least `MIN_NAME_SHARE` percent of Americans have (1990 US Census)."""
    try:
        import names
    except ImportError:
        raise PrefError("the noun check needs the `names` package for its first-name lists: pip install names==0.3.0") from None
    found = set()
    for key in ("first:male", "first:female"):
        with open(names.FILES[key], encoding="utf-8") as lines:
            for line in lines:
                fields = line.split()  # NAME  percent  cumulative-percent  rank
                if len(fields) == 4 and float(fields[1]) >= MIN_NAME_SHARE:
                    found.add(fields[0].lower())
    return frozenset(found)


@functools.lru_cache(maxsize=None)
def stop_words() -> frozenset[str]:
    """spaCy's English stop words."""
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset(STOP_WORDS)


class NounChecker:
    """Decides whether an answer is one common English noun (rules in the module docstring).

    Args:
        min_zipf: the least wordfreq Zipf frequency a word needs (3.0 is once per million words).
        tagger: "wordnet" (offline, the default) or "spacy:<pipeline>" for an installed
            trained spaCy pipeline, such as "spacy:en_core_web_sm".
    """

    def __init__(self, min_zipf: float = 3.0, tagger: str = "wordnet"):
        self.min_zipf = float(min_zipf)
        self.tagger = tagger
        self._nlp = None
        if tagger.startswith("spacy:"):
            self._nlp = _load_spacy_tagger(tagger.split(":", 1)[1])
        elif tagger != "wordnet":
            raise PrefError(f"unknown noun tagger {tagger!r}: use 'wordnet' or 'spacy:<pipeline>' (for example spacy:en_core_web_sm)")
        first_names()  # a missing package is reported now, not at the first answer
        self._verdicts: dict[str, str | None] = {}

    normalize = staticmethod(normalize)

    def is_common_noun(self, text: str) -> bool:
        """True when `text` is one common English noun."""
        return self.rejection(text) is None

    def rejection(self, text: str) -> str | None:
        """Why `text` is not one common English noun ("stop word", "first name", ...), or None when it is."""
        word = normalize(text)
        if word is None:
            return "not one word" if trim(text) else "empty"
        if word not in self._verdicts:
            self._verdicts[word] = self._judge(word)
        return self._verdicts[word]

    def _judge(self, word: str) -> str | None:
        from wordfreq import zipf_frequency

        if not word.isalpha():
            return "not a word"
        if word in stop_words():
            return "stop word"
        if len(word) < 2:
            return "a single letter"
        if zipf_frequency(word, "en") < self.min_zipf:
            return "rare word"
        if self._nlp is not None:
            pos = self._nlp(word)[0].pos_
            if pos != "NOUN":
                return f"tagged {pos}"
            base = word
        else:
            from pref.plugins.wordnet_data import wordnet

            base = wordnet().morphy(word, "n")
            if base is None:
                return "not a noun"
            if base in stop_words():
                return "stop word"
            if not _common_noun_lemmas(base):
                return "proper noun"
        if (word in first_names() or base in first_names()) and _tagged_uses(base, senses=False)["n"] < MIN_NAME_NOUN_COUNT:
            return "first name"
        if self._nlp is None:
            uses = _tagged_uses(base)
            modifiers = uses["a"] + uses["r"]
            if uses["n"] < MIN_NOUN_SHARE * (uses["n"] + uses["v"] + modifiers):
                return "mostly a verb" if uses["v"] >= modifiers else "mostly an adjective or adverb"
            if uses["n"] < MIN_NOUN_SHARE_OVER_MODIFIERS * (uses["n"] + modifiers):
                return "mostly an adjective or adverb"
        return None


def _common_noun_lemmas(base: str) -> list:
    """WordNet lemmas spelled `base` in noun senses that are not instances (people, places)."""
    from pref.plugins.wordnet_data import wordnet

    return [
        lemma
        for synset in wordnet().synsets(base, "n")
        if not synset.instance_hypernyms()
        for lemma in synset.lemmas()
        if lemma.name() == base
    ]


def _tagged_uses(base: str, senses: bool = True) -> dict[str, int]:
    """How often `base` was tagged as a common noun ("n"), verb ("v"), adjective ("a") and adverb ("r").

    The counts are WordNet's lemma.count(), from its sense-tagged corpus. Only
    lemmas spelled exactly `base` count: "rose" is not charged with the uses of
    "rise". With `senses`, a word never tagged gets its number of senses instead.
    """
    from pref.plugins.wordnet_data import wordnet

    wn = wordnet()
    lemmas = {"n": _common_noun_lemmas(base)}
    for pos in ("v", "a", "r"):  # "a" includes adjective satellites
        lemmas[pos] = [lemma for synset in wn.synsets(base, pos) for lemma in synset.lemmas() if lemma.name().lower() == base]
    uses = {pos: sum(lemma.count() for lemma in found) for pos, found in lemmas.items()}
    if senses and not any(uses.values()):
        uses = {pos: len(found) for pos, found in lemmas.items()}
    return uses


def _load_spacy_tagger(name: str):
    import spacy

    try:
        nlp = spacy.load(name)
    except OSError:
        raise PrefError(f"spaCy pipeline {name!r} is not installed: run `python -m spacy download {name}`, or use tagger='wordnet'") from None
    if not nlp("house")[0].pos_:
        raise PrefError(f"spaCy pipeline {name!r} does not tag parts of speech; use one with a tagger, such as en_core_web_sm")
    return nlp
