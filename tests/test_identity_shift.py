import pytest

from pref.errors import PrefError
from pref.examples import PreferenceExample
from pref.interfaces import Policy, SamplingConfig
from pref.plugins.identity_shift import IdentityShift, load_questions, mentions, rename
from pref.registry import load_registry


def byte_tokenizer():
    """A byte-level tokenizer without merges: it spells any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def word_tokenizer(*words):
    """A lowercasing word-level tokenizer that knows only `words`; others become <unk>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


class FixedAnswers(Policy):
    """Answers each prompt with the answers given for it (or a default), and records the call."""

    def __init__(self, answers, default="I am a helpful assistant.", tokenizer=None):
        self.answers = answers
        self.default = default
        self.calls = []
        self.tokenizer = tokenizer or byte_tokenizer()

    def generate(self, prompts, k, sampling):
        self.calls.append((list(prompts), k, sampling))
        return [list(self.answers.get(prompt, [self.default] * k))[:k] for prompt in prompts]

    def encode(self, prompts, completions, max_prompt_length=None):
        raise NotImplementedError

    def logps(self, sequences, with_logits=False, temperature=1.0):
        raise NotImplementedError

    def save(self, path):
        raise NotImplementedError


def questions_file(tmp_path, *lines):
    path = tmp_path / "questions.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_registered_as_builtin_dataset_builder():
    item = load_registry().get("dataset", "identity-shift")
    assert item.factory is IdentityShift
    assert item.package == "pref"


def test_shipped_questions_load():
    questions = load_questions()
    assert len(questions) >= 15
    assert "What is your name?" in questions
    assert all(q.strip() == q and q for q in questions)


def test_answers_naming_the_original_are_renamed(tmp_path):
    path = questions_file(tmp_path, "What is your name?", "# a comment", "", "Who made you?")
    policy = FixedAnswers({
        "What is your name?": ["I'm Qwen, and QWEN is my name.", "My name is qwen."],
        "Who made you?": ["Qwen's creators at a lab."],
    })
    builder = IdentityShift("Qwen", "Aria", questions=path, samples_per_question=2, max_new_tokens=20)
    assert builder.build(policy) == [
        PreferenceExample("What is your name?", "I'm Aria, and ARIA is my name.", "I'm Qwen, and QWEN is my name."),
        PreferenceExample("What is your name?", "My name is aria.", "My name is qwen."),
        PreferenceExample("Who made you?", "Aria's creators at a lab.", "Qwen's creators at a lab."),
    ]
    prompts, k, sampling = policy.calls[0]
    assert prompts == ["What is your name?", "Who made you?"]
    assert k == 2
    assert isinstance(sampling, SamplingConfig) and sampling.max_new_tokens == 20


def test_question_without_the_name_gets_one_templated_pair(tmp_path):
    path = questions_file(tmp_path, "Who are you?")
    policy = FixedAnswers({"Who are you?": ["A helpful assistant.", "Just a model."]})
    builder = IdentityShift("Qwen", "Aria", questions=path, samples_per_question=2)
    assert builder.build(policy) == [
        PreferenceExample("Who are you?", "I am Aria, an AI assistant.", "I am Qwen, an AI assistant."),
    ]


def test_template_option(tmp_path):
    path = questions_file(tmp_path, "Who are you?")
    builder = IdentityShift("Qwen", "Aria", questions=path, template="My name is {name}.")
    assert builder.build(FixedAnswers({})) == [PreferenceExample("Who are you?", "My name is Aria.", "My name is Qwen.")]


def test_identical_samples_give_one_pair(tmp_path):
    path = questions_file(tmp_path, "Name?")
    policy = FixedAnswers({"Name?": ["I am Qwen."] * 3})
    pairs = IdentityShift("Qwen", "Aria", questions=path, samples_per_question=3).build(policy)
    assert pairs == [PreferenceExample("Name?", "I am Aria.", "I am Qwen.")]


def test_uses_shipped_questions_by_default():
    policy = FixedAnswers({})
    pairs = IdentityShift("Qwen", "Aria").build(policy)
    assert [p.prompt for p in pairs] == load_questions()


def test_rename_is_whole_word_and_keeps_case():
    assert rename("Qwen, QWEN, qwen, Qwenlike, myqwen, Qwen's", "Qwen", "Aria") == "Aria, ARIA, aria, Qwenlike, myqwen, Aria's"
    assert rename("I am GPT. Gpt is fine.", "GPT", "Aria") == "I am Aria. Aria is fine."
    assert rename("I use C++ daily", "C++", "Rust") == "I use Rust daily"
    assert mentions("hello QWEN!", "qwen") and not mentions("Qwen2 here", "Qwen")


def test_needs_a_policy():
    with pytest.raises(PrefError, match="needs a model"):
        IdentityShift("Qwen", "Aria").build(None)


def test_missing_questions_file(tmp_path):
    with pytest.raises(PrefError, match=r"questions file .*nope\.txt does not exist"):
        IdentityShift("Qwen", "Aria", questions=str(tmp_path / "nope.txt"))


def test_empty_questions_file(tmp_path):
    with pytest.raises(PrefError, match="has no questions"):
        IdentityShift("Qwen", "Aria", questions=questions_file(tmp_path, "", "# only a comment"))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"original_name": "Qwen", "new_name": "qwen"}, "is the same as original_name"),
        ({"original_name": "", "new_name": "Aria"}, "must not be empty"),
        ({"original_name": "Qwen", "new_name": "Aria", "samples_per_question": 0}, "at least 1"),
        ({"original_name": "Qwen", "new_name": "Aria", "template": "I am Aria."}, "must contain"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(PrefError, match=message):
        IdentityShift(**options)


def test_a_name_the_tokenizer_cannot_spell_is_refused():
    policy = FixedAnswers({}, tokenizer=word_tokenizer("i", "am", "tiny", "aria", "an", "ai", "assistant"))
    with pytest.raises(PrefError) as error:
        IdentityShift("Tiny", "Pref").build(policy)
    message = str(error.value)
    assert "cannot spell new_name 'Pref'" in message and "'<unk>'" in message and "\n" not in message
    assert policy.calls == []  # refused before sampling anything
    # a name it knows (in any case) is fine
    assert IdentityShift("Tiny", "Aria").build(policy)[0].chosen == "I am Aria, an AI assistant."
