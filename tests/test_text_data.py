"""The text, dialogue and translation dataset builders: sources, row formats, prompt splits and one-line errors."""

import json

import datasets
import pytest

from pref.config import build_config
from pref.errors import PrefError
from pref.examples import TextExample
from pref.plugins.text_data import DialogueData, TextData, TranslationData, split_prompt
from pref.registry import load_registry
from pref.plan import dataset_builders


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_builders_are_registered_as_builtins():
    registry = load_registry()
    for name, factory in [("text", TextData), ("dialogue", DialogueData), ("translation", TranslationData)]:
        item = registry.get("dataset", name)
        assert item.factory is factory and item.builtin


def test_the_first_words_become_the_prompt():
    assert split_prompt("one two three four", 2) == TextExample(" three four", prompt="one two")
    assert split_prompt("  one two\tthree ", 1) == TextExample(" two\tthree", prompt="one")
    assert split_prompt("one two", 5) == TextExample(" two", prompt="one")  # at least one word stays the text
    assert split_prompt("single", 3) == TextExample("single")
    assert split_prompt("one two three", 0) == TextExample("one two three")


def test_txt_lines_and_paragraphs(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("the sky is blue .\n\nthe sea is\ngreen today .\n", encoding="utf-8")
    assert TextData(str(path), prompt_words=2).build() == [
        TextExample(" is blue .", "the sky"), TextExample(" is", "the sea"), TextExample(" .", "green today"),
    ]
    assert TextData(str(path), unit="paragraph", prompt_words=0).build() == [TextExample("the sky is blue ."), TextExample("the sea is green today .")]
    assert len(TextData(str(path), limit=2).build()) == 2


def test_a_text_column_of_jsonl_csv_and_saved_datasets(tmp_path):
    expected = [TextExample(" b c", "a"), TextExample(" e", "d")]
    assert TextData(write_jsonl(tmp_path / "t.jsonl", [{"text": "a b c"}, {"text": "d e"}]), prompt_words=1).build() == expected
    assert TextData(write_jsonl(tmp_path / "body.jsonl", [{"body": "a b c"}, {"body": "d e"}]), column="body", prompt_words=1).build() == expected
    (tmp_path / "t.csv").write_text("text,id\na b c,1\nd e,2\n")
    assert TextData(str(tmp_path / "t.csv"), prompt_words=1).build() == expected
    datasets.Dataset.from_list([{"text": "a b c"}, {"text": "d e"}]).save_to_disk(str(tmp_path / "saved"))
    assert TextData(str(tmp_path / "saved"), prompt_words=1).build() == expected


def test_dialogue_turns_are_joined(tmp_path):
    rows = [
        {"dialog": ["Hi there .", " How are you ? ", "Fine ."]},  # DailyDialog
        {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]},
    ]
    built = DialogueData(write_jsonl(tmp_path / "d.jsonl", rows), prompt_words=0).build()
    assert built == [TextExample("Hi there .\nHow are you ?\nFine ."), TextExample("Hello\nHi")]
    joined = DialogueData(write_jsonl(tmp_path / "e.jsonl", rows[:1]), separator=" ", prompt_words=2).build()
    assert joined == [TextExample(" . How are you ? Fine .", "Hi there")]


def test_translation_keeps_one_side(tmp_path):
    rows = [{"translation": {"en": "the house", "de": "das Haus"}}, {"en": "a dog", "fr": "un chien"}]
    path = write_jsonl(tmp_path / "wmt.jsonl", rows)
    assert TranslationData(path, prompt_words=1).build() == [TextExample(" house", "the"), TextExample(" dog", "a")]
    assert TranslationData(write_jsonl(tmp_path / "de.jsonl", rows[:1]), language="de", prompt_words=0).build() == [TextExample("das Haus")]


@pytest.mark.parametrize("make, rows, message", [
    (lambda p: TextData(p), [{"body": "x"}], r"row 1: missing field 'text' \(choose the text column with --dataset-option column=NAME\)"),
    (lambda p: TextData(p), [{"text": 3}], "row 1: bad field 'text': expected a string, got int"),
    (lambda p: DialogueData(p), [{"text": "x"}], "row 1: missing field one of dialog, dialogue"),
    (lambda p: DialogueData(p), [{"dialog": ["a", 3]}], "row 1: bad field 'dialog': a turn must be a string"),
    (lambda p: TranslationData(p), [{"translation": {"en": "a", "de": "b"}}, {"translation": {"de": "c"}}], r"row 2: no 'en' text \(languages here: de\)"),
    (lambda p: TextData(p), [{"text": "  "}], "no text in it"),
])
def test_bad_rows_are_one_line_errors(tmp_path, make, rows, message):
    with pytest.raises(PrefError, match=message) as error:
        make(write_jsonl(tmp_path / "bad.jsonl", rows)).build()
    assert "\n" not in str(error.value)


def test_bad_files_and_options_are_one_line_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(PrefError, match="no text in it"):
        TextData(str(tmp_path / "empty.txt")).build()
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PrefError, match="the file is empty"):
        TextData(str(tmp_path / "empty.jsonl")).build()
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(PrefError, match="not UTF-8 text"):
        TextData(str(tmp_path / "latin.txt")).build()
    with pytest.raises(PrefError, match="unit must be one of line, paragraph"):
        TextData("a.txt", unit="sentence")
    with pytest.raises(PrefError, match="prompt_words must be zero or a positive"):
        TextData("a.txt", prompt_words=-1)


def test_a_txt_dataset_is_read_by_the_text_builder_whatever_the_objective(tmp_path):
    (tmp_path / "a.txt").write_text("one two\n")
    registry = load_registry()
    config = build_config(flags={"objective": "dpo", "dataset": [str(tmp_path / "a.txt"), str(tmp_path / "p.jsonl")]})
    with pytest.raises(PrefError, match="p.jsonl: no such file"):
        dataset_builders(config.dataset, config, registry, registry.create("objective", config.objective, config.objective_options).needs)
    (tmp_path / "p.jsonl").write_text("")
    text, prefs = dataset_builders(config.dataset, config, registry, registry.create("objective", config.objective, config.objective_options).needs)
    assert isinstance(text, TextData) and type(prefs).__name__ == "PreferenceData"
    config = build_config(flags={"dataset": [str(tmp_path / "missing.txt")]})
    with pytest.raises(PrefError, match="missing.txt: no such file or folder"):
        dataset_builders(config.dataset, config, registry, registry.create("objective", config.objective, config.objective_options).needs)
