"""The `labeled` and `lmsys` dataset builders: formats, labels, filters and one-line errors."""

import json

import pandas
import pytest
import torch

from pref.config import build_config
from pref.errors import PrefError
from pref.examples import LabeledExample
from pref.hookspecs import hookimpl
from pref.interfaces import RewardSource
from pref.plugins.labeled_data import LabeledData, load_labeled, parse_label
from pref.plugins.lmsys import LmsysChat, user_turns
from pref.plugins.pmpo import PMPO
from pref.registry import Registry, get_plugin_manager, load_registry
from pref.plan import dataset_builders


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# -- labeled ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, label",
    [("positive", True), ("Negative", False), (1, True), (0, False), ("1", True), ("0", False), (True, True), (False, False),
     ("TRUE", True), ("false", False), ("accepted", True), ("rejected", False), (1.0, True), (0.0, False)],
)
def test_every_label_spelling(value, label):
    assert parse_label(value, "here") is label


@pytest.mark.parametrize("value, message", [("maybe", "bad field 'label'"), (2, "bad field 'label'"), (None, "missing field 'label'"), ("", "missing field 'label'")])
def test_a_bad_or_missing_label_is_an_error(value, message):
    with pytest.raises(PrefError, match=f"^here: {message}"):
        parse_label(value, "here")


def test_jsonl_rows_with_completion_or_response(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [
        {"prompt": "Name a fruit.", "completion": "apple", "label": "positive"},
        {"prompt": [{"role": "user", "content": "Name a fruit."}], "response": "chair", "label": False},
    ])
    assert LabeledData(path).build() == [
        LabeledExample("Name a fruit.", "apple", True),
        LabeledExample([{"role": "user", "content": "Name a fruit."}], "chair", False),
    ]


def test_csv_and_parquet_files(tmp_path):
    frame = pandas.DataFrame({"prompt": ["Hi.", "Bye."], "completion": ["hello", "go away"], "label": ["1", "0"]})
    frame.to_csv(tmp_path / "data.csv", index=False)
    expected = [LabeledExample("Hi.", "hello", True), LabeledExample("Bye.", "go away", False)]
    assert load_labeled(str(tmp_path / "data.csv")) == expected
    frame.assign(label=[True, False]).to_parquet(tmp_path / "data.parquet")
    assert load_labeled(str(tmp_path / "data.parquet")) == expected


def test_a_preference_row_gives_one_accepted_and_one_rejected_example(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Name a fruit.", "chosen": "apple", "rejected": "chair"}])
    assert load_labeled(path) == [LabeledExample("Name a fruit.", "apple", True), LabeledExample("Name a fruit.", "chair", False)]


def test_limit_counts_examples(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p", "completion": f"c{i}", "label": 1} for i in range(5)])
    assert [e.completion for e in LabeledData(path, limit=2).build()] == ["c0", "c1"]
    with pytest.raises(PrefError, match="limit"):
        LabeledData(path, limit=0)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"completion": "apple", "label": 1}, "row 2: missing field 'prompt'"),
        ({"prompt": "p", "label": 1}, r"row 2: missing field 'completion' \(or 'response'\)"),
        ({"prompt": "p", "completion": "  ", "label": 1}, "row 2: empty field 'completion'"),
        ({"prompt": "p", "completion": 3, "label": 1}, "row 2: bad field 'completion': expected a string, got int"),
        ({"prompt": "p", "completion": "c"}, "row 2: missing field 'label'"),
        ({"prompt": "p", "completion": "c", "label": "good"}, "row 2: bad field 'label'"),
        ({"prompt": [{"role": "user"}], "completion": "c", "label": 1}, "row 2: bad field 'prompt'"),
    ],
)
def test_malformed_rows_are_one_line_errors_naming_file_row_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p", "completion": "c", "label": 1}, row])
    with pytest.raises(PrefError, match=message) as info:
        load_labeled(path)
    assert str(info.value).startswith(path) and "\n" not in str(info.value)


def test_an_empty_file_and_a_missing_file_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PrefError, match="empty"):
        load_labeled(str(tmp_path / "empty.jsonl"))
    with pytest.raises(PrefError, match="no such file"):
        load_labeled(str(tmp_path / "missing.jsonl"))


def test_a_dataset_path_goes_to_the_labeled_builder_for_pmpo(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p", "completion": "c", "label": 1}])
    config = build_config(flags={"objective": "pmpo", "dataset": [path]})
    [builder] = dataset_builders(config.dataset, config, load_registry(), PMPO().needs)
    assert isinstance(builder, LabeledData) and builder.path == path


# -- lmsys -----------------------------------------------------------------------------------------


def moderation(*flags):
    return [{"flagged": flag, "categories": {"harassment": flag}, "category_scores": {"harassment": 0.9 if flag else 0.01}} for flag in flags]


def conversation(*texts):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(texts)]


LMSYS_ROWS = [
    {"conversation_id": "a", "model": "vicuna-13b", "turn": 1, "language": "English", "redacted": False,
     "conversation": conversation("Name a fruit.", "apple"), "openai_moderation": moderation(False, False)},
    {"conversation_id": "b", "model": "vicuna-13b", "turn": 2, "language": "English", "redacted": False,
     "conversation": conversation("Insult me.", "you are a fool .", "Now name an animal.", "dog"),
     "openai_moderation": moderation(True, True, False, False)},
    {"conversation_id": "c", "model": "koala-13b", "turn": 1, "language": "German", "redacted": False,
     "conversation": conversation("Nenne eine Frucht.", "Apfel"), "openai_moderation": moderation(False, False)},
    {"conversation_id": "d", "model": "koala-13b", "turn": 1, "language": "English", "redacted": False,
     "conversation": conversation("Say nothing.", ""), "openai_moderation": moderation(False, False)},
]


@pytest.fixture
def lmsys_file(tmp_path):
    """A tiny lmsys-chat-1m-format JSONL file: four conversations, one flagged answer, one German, one empty answer."""
    return write_jsonl(tmp_path / "lmsys.jsonl", LMSYS_ROWS)


def test_user_turns_become_examples_labelled_by_the_answers_moderation(lmsys_file):
    examples = LmsysChat(lmsys_file).build()
    second_prompt = conversation("Insult me.", "you are a fool .", "Now name an animal.")
    assert examples == [
        LabeledExample("Name a fruit.", "apple", True),
        LabeledExample("Insult me.", "you are a fool .", False),  # the answer was flagged
        LabeledExample(second_prompt, "dog", True),  # the earlier turns are part of the prompt
    ]  # the German conversation is filtered out; the empty answer is skipped


def test_parquet_language_max_turns_and_limit(tmp_path):
    path = tmp_path / "lmsys.parquet"
    pandas.DataFrame(LMSYS_ROWS).to_parquet(path)
    assert len(LmsysChat(str(path)).build()) == 3
    assert [e.completion for e in LmsysChat(str(path), language="German").build()] == ["Apfel"]
    assert [e.completion for e in LmsysChat(str(path), language="").build()] == ["apple", "you are a fool .", "dog", "Apfel"]
    assert [e.completion for e in LmsysChat(str(path), max_turns=1).build()] == ["apple", "you are a fool ."]
    assert [e.completion for e in LmsysChat(str(path), limit=2).build()] == ["apple", "you are a fool ."]


def test_user_turns_skip_a_user_message_without_an_answer():
    messages = conversation("a", "b", "c")  # the last user message is unanswered
    assert user_turns(messages) == [("a", 1)]
    assert user_turns([{"role": "system", "content": "s"}] + messages) == [([{"role": "system", "content": "s"}, messages[0]], 2)]


class WordCount(RewardSource):
    """Reward = the number of words of the answer."""

    quality_threshold = None

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def score(self, prompts, completions):
        return {"reward": torch.tensor([self.scale * len(c.split()) for c in completions])}


class WordCountPlugin:
    @hookimpl
    def register_rewards(self, register):
        register("word-count", WordCount)


@pytest.fixture
def word_count_registry():
    pm, _, _ = get_plugin_manager(load_entrypoints=False)
    pm.register(WordCountPlugin())
    return Registry(pm)


def test_labels_from_a_reward_and_a_threshold(lmsys_file, word_count_registry):
    """Word counts 1 ("apple"), 4 ("you are a fool ."), 1 ("dog"); accepted at 2 or more, or with scale 2 at 2 or more."""
    examples = LmsysChat(lmsys_file, label_from="reward:word-count", threshold=2, registry=word_count_registry).build()
    assert [(e.completion, e.label) for e in examples] == [("apple", False), ("you are a fool .", True), ("dog", False)]
    examples = LmsysChat(lmsys_file, label_from="reward:word-count", threshold=2, reward_options={"scale": 2.0}, registry=word_count_registry).build()
    assert [e.label for e in examples] == [True, True, True]


def test_a_reward_without_a_pass_mark_needs_a_threshold(lmsys_file, word_count_registry):
    with pytest.raises(PrefError, match="threshold"):
        LmsysChat(lmsys_file, label_from="reward:word-count", registry=word_count_registry).build()


def test_the_rewards_own_pass_mark_is_the_default_threshold(lmsys_file, word_count_registry, monkeypatch):
    monkeypatch.setattr(WordCount, "quality_threshold", 4.0)
    assert [e.label for e in LmsysChat(lmsys_file, label_from="reward:word-count", registry=word_count_registry).build()] == [False, True, False]


def test_an_unknown_reward_is_an_error(lmsys_file, word_count_registry):
    with pytest.raises(PrefError, match="unknown reward 'word-cont'"):
        LmsysChat(lmsys_file, label_from="reward:word-cont", threshold=1, registry=word_count_registry).build()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"label_from": "flags"}, "label_from must be 'moderation' or 'reward:NAME'"),
        ({"label_from": "reward:"}, "label_from"),
        ({"threshold": 0.5}, "only apply with label_from='reward:NAME'"),
        ({"limit": 0}, "limit must be a positive whole number"),
        ({"max_turns": -1}, "max_turns"),
    ],
)
def test_bad_options_fail_before_reading(lmsys_file, options, message):
    with pytest.raises(PrefError, match=message):
        LmsysChat(lmsys_file, **options)


def test_a_missing_local_file_fails_at_once(tmp_path):
    with pytest.raises(PrefError, match="lmsys: no such file or folder"):
        LmsysChat(str(tmp_path / "lmsys.jsonl"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"conversation": None}, "row 2: missing field 'conversation'"),
        ({"conversation": [{"role": "user"}]}, "row 2: bad field 'conversation'"),
        ({"openai_moderation": None}, "row 2: missing field 'openai_moderation'"),
        ({"openai_moderation": moderation(False)}, r"row 2: bad field 'openai_moderation': expected one entry per message \(4\), got 1"),
        ({"openai_moderation": [{"categories": {}}] * 4}, "row 2: bad field 'openai_moderation': every entry needs a true/false 'flagged'"),
    ],
)
def test_malformed_conversations_are_one_line_errors(tmp_path, change, message):
    path = write_jsonl(tmp_path / "lmsys.jsonl", [LMSYS_ROWS[0], {**LMSYS_ROWS[1], **change}])
    with pytest.raises(PrefError, match=message) as info:
        LmsysChat(path).build()
    assert str(info.value).startswith(path) and "\n" not in str(info.value)


def test_moderation_is_not_needed_when_a_reward_labels(tmp_path, word_count_registry):
    path = write_jsonl(tmp_path / "lmsys.jsonl", [{**LMSYS_ROWS[0], "openai_moderation": None}])
    assert [e.label for e in LmsysChat(path, label_from="reward:word-count", threshold=1, registry=word_count_registry).build()] == [True]


def test_no_usable_turn_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "lmsys.jsonl", [LMSYS_ROWS[2]])
    with pytest.raises(PrefError, match="no user turn answered by the assistant in English"):
        LmsysChat(path).build()


def test_the_gated_hub_dataset_fails_with_a_clear_message(monkeypatch, unreachable_hub):
    import datasets
    import httpx2

    def gated(*args, **kwargs):
        raise ConnectionError("Dataset 'lmsys/lmsys-chat-1m' is a gated dataset on the Hub.\nVisit its page.")

    # the hub answers pref's one question (gated), and `datasets` then says so
    unreachable_hub.answer = lambda request: httpx2.Response(401, headers={"X-Error-Code": "GatedRepo"}, request=request)
    monkeypatch.setattr(datasets, "load_dataset", gated)
    with pytest.raises(PrefError, match="lmsys/lmsys-chat-1m: no such file or folder, and no hub dataset .* gated on the hub: .* local") as info:
        LmsysChat("lmsys/lmsys-chat-1m").build()
    assert "\n" not in str(info.value)


def test_lmsys_is_a_registered_builder(lmsys_file):
    builder = load_registry().create("dataset", "lmsys", {"path": lmsys_file, "limit": 1})
    assert isinstance(builder, LmsysChat) and len(builder.build()) == 1
