"""The `identity-shift` dataset builder: pairs that teach a model to answer to a new name.

The model answers identity questions ("What is your name?"). Each answer that
mentions the original name becomes a pair: rejected is the answer as the model
wrote it, chosen is the same answer with the new name in its place. The two
differ only in the name, so training changes the name and little else.

A question none of whose answers mention the original name gets one templated
pair instead: "I am {new name}, an AI assistant." over "I am {original name},
an AI assistant." (the `template` option changes the wording). So every
question gives at least one pair, even with a model that rarely says its name.
"""

from __future__ import annotations

import os
import re
from importlib import resources

from pref.errors import PrefError
from pref.examples import PreferenceExample
from pref.hookspecs import hookimpl
from pref.interfaces import Policy, SamplingConfig
from pref.plugins.records import read_text

DEFAULT_TEMPLATE = "I am {name}, an AI assistant."


class IdentityShift:
    """Pairs that rename the model: its own answers to identity questions, with the new name."""

    def __init__(
        self,
        original_name: str,
        new_name: str,
        questions: str | None = None,
        samples_per_question: int = 1,
        max_new_tokens: int = 48,
        template: str = DEFAULT_TEMPLATE,
    ):
        original_name, new_name = str(original_name), str(new_name)  # a name like 007 arrives as a number from YAML
        if not original_name.strip() or not new_name.strip():
            raise PrefError("identity-shift: original_name and new_name must not be empty")
        if original_name.strip().lower() == new_name.strip().lower():
            raise PrefError(f"identity-shift: new_name {new_name!r} is the same as original_name")
        if samples_per_question < 1:
            raise PrefError(f"identity-shift: samples_per_question must be at least 1, not {samples_per_question}")
        if "{name}" not in template:
            raise PrefError(f"identity-shift: template must contain {{name}}, got {template!r}")
        self.original_name = original_name.strip()
        self.new_name = new_name.strip()
        self.questions = load_questions(questions)
        self.samples_per_question = samples_per_question
        self.max_new_tokens = max_new_tokens
        self.template = template

    def build(self, policy: Policy | None) -> list[PreferenceExample]:
        """Sample answers from `policy` and pair each with its renamed copy."""
        if policy is None:
            raise PrefError("identity-shift needs a model to answer the identity questions, and none was given")
        if not spells(policy.tokenizer, self.new_name):
            raise PrefError(f"identity-shift: the model's tokenizer cannot spell new_name {self.new_name!r} (it becomes "
                            f"{spelled(policy.tokenizer, self.new_name)!r}), so training would teach unknown tokens; choose a name it can write")
        # a little below temperature 1 keeps answers on topic, yet varied across samples
        sampling = SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=0.7, top_p=0.9)
        answers = policy.generate(self.questions, self.samples_per_question, sampling)
        examples = []
        for question, samples in zip(self.questions, answers):
            renamed = [
                PreferenceExample(question, rename(answer, self.original_name, self.new_name), answer)
                for answer in dict.fromkeys(samples)  # identical samples would only repeat a pair
                if mentions(answer, self.original_name)
            ]
            if not renamed:
                chosen = self.template.format(name=self.new_name)
                rejected = self.template.format(name=self.original_name)
                renamed = [PreferenceExample(question, chosen, rejected)]
            examples.extend(renamed)
        return examples


@hookimpl
def register_dataset_builders(register):
    register("identity-shift", IdentityShift)


def load_questions(path: str | None = None) -> list[str]:
    """Questions one per line from `path`, or the shipped ones; blank lines and `#` comments are skipped."""
    if path is None:
        text = resources.files("pref.plugins").joinpath("data/identity_questions.txt").read_text(encoding="utf-8")
        path = "the shipped identity questions"
    else:
        if not os.path.isfile(os.path.expanduser(path)):
            raise PrefError(f"identity-shift: questions file {path} does not exist (expected one question per line)")
        text = read_text(path)
    questions = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not questions:
        raise PrefError(f"identity-shift: {path} has no questions (expected one question per line)")
    return questions


def spelled(tokenizer, name: str) -> str:
    """`name` as `tokenizer` writes it back after encoding it (an unknown word comes back as its unknown token)."""
    return tokenizer.decode(tokenizer(name, add_special_tokens=False)["input_ids"])


def spells(tokenizer, name: str) -> bool:
    """True if `tokenizer` encodes `name` without unknown tokens and decodes it back (ignoring case and spacing).

    Case is ignored because a lowercasing tokenizer still writes the name, only in lower case.
    """
    ids = tokenizer(name, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    return bool(ids) and (unk is None or unk not in ids) and _squeeze(tokenizer.decode(ids)) == _squeeze(name)


def _squeeze(text: str) -> str:
    return "".join(text.split()).lower()


def _name_pattern(name: str) -> re.Pattern:
    # lookarounds rather than \b, so names that end in a symbol ("C++") still match whole
    return re.compile(r"(?<!\w)" + re.escape(name) + r"(?!\w)", re.IGNORECASE)


def mentions(text: str, name: str) -> bool:
    """True if `name` occurs in `text` as a whole word, in any case."""
    return _name_pattern(name).search(text) is not None


def rename(text: str, old: str, new: str) -> str:
    """Replace whole-word `old` with `new` in any case, keeping the case style of each occurrence.

    "Qwen" -> "Aria", "QWEN" -> "ARIA", "qwen" -> "aria"; an occurrence spelled
    exactly as `old` gets `new` exactly as given.
    """

    def replace(match: re.Match) -> str:
        word = match.group(0)
        if word == old:
            return new
        if word.isupper():
            return new.upper()
        if word.islower():
            return new.lower()
        if word[:1].isupper():
            return new[:1].upper() + new[1:]
        return new

    return _name_pattern(old).sub(replace, text)
