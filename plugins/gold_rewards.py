"""Synthetic "gold" rewards, after D2PO's (Singhal et al. 2024, arXiv 2405.01511) gold functions.

Each is a reward plugin that scores a completion with a fixed rule, so an
experiment can count how many gold labels an algorithm spends and measure
the gold reward of what the policy writes:

- `bag-of-words`: how many words of a fixed list the response contains (each once);
- `unique-nouns`: how many distinct common nouns the response contains;
- `contrastive-distillation`: log-likelihood under a larger model minus under a smaller one;
- `stepwise-arithmetic`: minus the edit distance of each step to the worked solution.
"""

from __future__ import annotations

import os
import random
import re
from typing import Any, ClassVar

import torch

from pref.errors import PrefError
from pref.examples import Prompt
from pref.hookspecs import hookimpl
from pref.interfaces import RewardSource

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")

#: Things the embedded default model writes sentences about ("the river is quiet and i like it.").
SENTENCE_THINGS = ["house", "tree", "book", "city", "river", "garden", "school", "friend", "song", "road",
                   "window", "table", "mountain", "market", "kitchen", "letter", "picture", "island"]
SENTENCE_PROMPTS = [f"Write a sentence about a {thing}." for thing in SENTENCE_THINGS]


def words_of(text: str) -> list[str]:
    """Lowercase words of `text` (letters, with inner apostrophes): "The sky's blue." -> [the, sky's, blue]."""
    return _WORD.findall(text.lower())


def prompt_text(prompt: Prompt) -> str:
    """A prompt as text: the string itself, or the content of its last message."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


class BagOfWords(RewardSource):
    """How many words from a fixed list the response contains, each counted once.

    Options:
        words: the list of words, or the path of a file of words (separated by spaces or
            lines). The default is a nature vocabulary the embedded default model knows
            ("river", "green", "quiet", ...), so its sentences sometimes score.
    """

    DEFAULT_WORDS: ClassVar[tuple[str, ...]] = (
        "tree", "river", "mountain", "island", "garden", "water", "light", "sun", "sea", "bird",
        "flower", "music", "green", "warm", "bright", "beautiful", "quiet", "happy",
    )
    default_prompts: ClassVar[list[str]] = SENTENCE_PROMPTS

    def __init__(self, words: list[str] | str | None = None):
        if words is None:
            words = list(self.DEFAULT_WORDS)
        elif isinstance(words, str):
            if not os.path.isfile(words):
                raise PrefError(f"bag-of-words: words must be a list or a file of words; no such file {words!r}")
            with open(words, encoding="utf-8") as f:
                words = f.read().split()
        self.words = frozenset(w.lower() for w in words)
        if not self.words:
            raise PrefError("bag-of-words: the word list is empty")

    def score(self, prompts: list[Prompt], completions: list[str]) -> dict[str, torch.Tensor]:
        """`reward`: the number of distinct listed words in each completion, float [B]."""
        return {"reward": torch.tensor([float(len(self.words.intersection(words_of(c)))) for c in completions])}


class UniqueNouns(RewardSource):
    """How many distinct common English nouns the response contains.

    Each distinct word is judged by `pref.plugins.noun_quality.NounChecker`
    (common, a noun, not a stop word nor a first name).

    Options:
        min_zipf: the least wordfreq Zipf frequency of a common word (default 3.0).
        tagger: "wordnet" (offline, the default) or "spacy:<pipeline>".
    """

    default_prompts: ClassVar[list[str]] = SENTENCE_PROMPTS

    def __init__(self, min_zipf: float = 3.0, tagger: str = "wordnet"):
        from pref.plugins.noun_quality import NounChecker

        self.checker = NounChecker(min_zipf=min_zipf, tagger=tagger)

    def score(self, prompts: list[Prompt], completions: list[str]) -> dict[str, torch.Tensor]:
        """`reward`: the number of distinct nouns in each completion, float [B]."""
        counts = [sum(self.checker.is_common_noun(w) for w in set(words_of(c))) for c in completions]
        return {"reward": torch.tensor([float(n) for n in counts])}


class ContrastiveDistillation(RewardSource):
    """Log-likelihood of the response under a larger model minus under a smaller one.

    Rewards what the larger model knows and the smaller does not. Both models
    score the completion (and its EOS) given the prompt, each with its own
    tokenizer and chat template, summed over tokens.

    Options:
        large: the larger model (hub id or path).
        small: the smaller model (hub id or path).
        batch_size: rows per forward pass (default 16).
        device: "auto" (a GPU if there is one), "cpu", "cuda" or "mps".
    """

    default_prompts: ClassVar[list[str]] = SENTENCE_PROMPTS

    def __init__(self, large: str | None = None, small: str | None = None, batch_size: int = 16, device: str = "auto"):
        from pref.plugins.reward_model import pick_device
        from pref.policy import HFPolicy

        if not large or not small:
            raise PrefError("contrastive-distillation: pass both models: --reward-option large=PATH --reward-option small=PATH")
        if batch_size < 1:
            raise PrefError(f"contrastive-distillation: batch_size must be at least 1, got {batch_size}")
        self.large = HFPolicy.load(large)
        self.small = HFPolicy.load(small)
        for policy in (self.large, self.small):
            policy.model.to(pick_device(device)).eval()
        self.batch_size = batch_size

    def _logps(self, policy: Any, prompts: list[Prompt], completions: list[str]) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for start in range(0, len(completions), self.batch_size):
                end = start + self.batch_size
                out.append(policy.logps(policy.encode(prompts[start:end], completions[start:end])).sequence.float().cpu())
        return torch.cat(out)

    def score(self, prompts: list[Prompt], completions: list[str]) -> dict[str, torch.Tensor]:
        """`reward` = `logps/large` - `logps/small`, float [B]."""
        large = self._logps(self.large, prompts, completions)
        small = self._logps(self.small, prompts, completions)
        return {"reward": large - small, "logps/large": large, "logps/small": small}


# -- stepwise arithmetic ------------------------------------------------------------

_EXPRESSION = re.compile(r"\d+(?:\s*[-+*]\s*\d+)+")
_TOKEN = re.compile(r"\d+|[-+*]")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between two strings (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def reduction_steps(expression: str) -> list[str]:
    """The expression after each single operation, in order: "3 + 4 * 2" -> ["3 + 8", "11"].

    Multiplication goes first, then addition and subtraction left to right.
    """
    tokens = _TOKEN.findall(expression)
    if len(tokens) < 3 or len(tokens) % 2 == 0:
        raise PrefError(f"stepwise-arithmetic: {expression!r} is not an expression like '3 + 4 * 2'")
    values, operators = [int(t) for t in tokens[0::2]], tokens[1::2]
    steps = []
    while operators:
        i = operators.index("*") if "*" in operators else 0
        a, b, op = values[i], values[i + 1], operators.pop(i)
        values[i : i + 2] = [a * b if op == "*" else a + b if op == "+" else a - b]
        steps.append(" ".join([str(values[0])] + [f"{o} {v}" for o, v in zip(operators, values[1:])]))
    return steps


def worked_solution(expression: str) -> str:
    """The worked solution as one line: "3 + 4 * 2" -> "3 + 8 = 11"."""
    return " = ".join(reduction_steps(expression))


def normalise(step: str) -> str:
    """Spaces collapsed, one space around each sign: "3+8" -> "3 + 8", "-3" -> "- 3"."""
    return " ".join(re.sub(r"([-+*])", r" \1 ", step).split())


def response_steps(response: str, expression: str) -> list[str]:
    """The steps of a response: its parts between "=" signs and line breaks, spaces normalised.

    A first part that restates the expression itself is dropped, so "3 + 4 * 2 = 3 + 8 = 11"
    and "3 + 8\\n11" both have the steps ["3 + 8", "11"].
    """
    parts = [normalise(p) for p in re.split(r"[=\n]", response)]
    parts = [p for p in parts if p]
    if parts and parts[0] == normalise(expression):
        parts = parts[1:]
    return parts


def arithmetic_prompts(count: int = 64, seed: int = 0) -> list[str]:
    """`count` distinct expressions of 2 or 3 operations on 1-9, every intermediate value in 0..100."""
    rng = random.Random(seed)
    found: list[str] = []
    while len(found) < count:
        tokens = [str(rng.randint(1, 9))]
        for _ in range(rng.choice([2, 3])):
            tokens += [rng.choice("+-*"), str(rng.randint(1, 9))]
        expression = " ".join(tokens)
        values = [int(t) for step in reduction_steps(expression) for t in step.split() if t.lstrip("-").isdigit()]
        if all(0 <= v <= 100 for v in values) and expression not in found:
            found.append(expression)
    return found


class StepwiseArithmetic(RewardSource):
    """Minus the summed edit distance of the response's steps to the worked solution's steps.

    The prompt is an arithmetic expression ("3 + 4 * 2"); its worked solution
    reduces one operation per step, multiplication first ("3 + 8 = 11": the steps
    "3 + 8" and "11"). Step i of the response is compared with step i of the
    solution by Levenshtein distance; a missing step costs the solution step's
    length, an extra one its own length. A perfect answer scores 0.
    """

    default_prompts: ClassVar[list[str]] = arithmetic_prompts()

    def score(self, prompts: list[Prompt], completions: list[str]) -> dict[str, torch.Tensor]:
        """`reward` (<= 0) and `correct` (1.0 when the last step is the right result), float [B]."""
        rewards, correct = [], []
        for prompt, completion in zip(prompts, completions):
            match = _EXPRESSION.search(prompt_text(prompt))
            if match is None:
                raise PrefError(f"stepwise-arithmetic: the prompt {prompt_text(prompt)!r} holds no expression like '3 + 4 * 2'")
            solution = [normalise(step) for step in reduction_steps(match.group(0))]
            steps = response_steps(completion, match.group(0))
            width = max(len(solution), len(steps))
            padded_solution, padded_steps = solution + [""] * (width - len(solution)), steps + [""] * (width - len(steps))
            rewards.append(-float(sum(edit_distance(a, b) for a, b in zip(padded_steps, padded_solution))))
            correct.append(float(bool(steps) and steps[-1] == solution[-1]))
        return {"reward": torch.tensor(rewards), "correct": torch.tensor(correct)}


@hookimpl
def register_rewards(register):
    register("bag-of-words", BagOfWords)
    register("unique-nouns", UniqueNouns)
    register("contrastive-distillation", ContrastiveDistillation)
    register("stepwise-arithmetic", StepwiseArithmetic)
