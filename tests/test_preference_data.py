import json
import re

import datasets
import huggingface_hub.constants
import pytest

from pref.errors import PrefError
from pref.examples import PreferenceExample
from pref.plugins.preference_data import PreferenceData, load_preferences
from pref.registry import load_registry

ROWS = [
    {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Lyon"},
]
EXPECTED = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"]) for r in ROWS]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_registered_as_builtin_dataset_builder():
    item = load_registry().get("dataset", "preferences")
    assert item.factory is PreferenceData
    assert item.package == "pref"


def test_builder_reads_jsonl_with_limit(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    assert PreferenceData(path).build() == EXPECTED
    assert PreferenceData(path, limit=1).build(policy=None) == EXPECTED[:1]


def test_json_array_file(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    assert load_preferences(str(path)) == EXPECTED


def test_jsonl_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    assert load_preferences(str(path)) == EXPECTED


def test_csv(tmp_path):
    path = tmp_path / "prefs.csv"
    datasets.Dataset.from_list(ROWS).to_csv(str(path), index=False)
    assert load_preferences(str(path)) == EXPECTED


def test_parquet(tmp_path):
    path = tmp_path / "prefs.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    assert load_preferences(str(path)) == EXPECTED


def test_saved_dataset_folder(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert load_preferences(str(tmp_path / "saved")) == EXPECTED


def test_saved_dataset_dict_reads_the_split(tmp_path):
    splits = {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[1:])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    assert load_preferences(str(tmp_path / "saved")) == EXPECTED
    assert load_preferences(str(tmp_path / "saved"), split="test") == EXPECTED[1:]
    with pytest.raises(PrefError, match=r"no split 'validation'; it has: train, test"):
        load_preferences(str(tmp_path / "saved"), split="validation")


def test_conversational_with_explicit_prompt(tmp_path):
    row = {"prompt": [user("Hi")], "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")]}
    path = write_jsonl(tmp_path / "chat.jsonl", [row])
    assert load_preferences(path) == [PreferenceExample([user("Hi")], "Hello!", "Go away.")]


def test_conversational_prompt_is_extended_by_shared_turns(tmp_path):
    turns = [assistant("Hello!"), user("Tell a joke.")]
    row = {"prompt": [user("Hi")], "chosen": turns + [assistant("Knock knock.")], "rejected": turns + [assistant("No.")]}
    path = write_jsonl(tmp_path / "chat.jsonl", [row])
    assert load_preferences(path) == [PreferenceExample([user("Hi")] + turns, "Knock knock.", "No.")]


def test_message_prompt_with_string_answers(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [user("Hi")], "chosen": "Hello!", "rejected": "Go away."}])
    assert load_preferences(path) == [PreferenceExample([user("Hi")], "Hello!", "Go away.")]


def test_conversational_with_implicit_prompt_from_parquet(tmp_path):
    # Parquet stores messages as structs; they must come back as plain message dicts
    history = [user("Hi"), assistant("Hello! How can I help?"), user("Tell a joke.")]
    row = {"chosen": history + [assistant("Why did the chicken...")], "rejected": history + [assistant("No.")]}
    path = tmp_path / "chat.parquet"
    datasets.Dataset.from_list([row]).to_parquet(str(path))
    assert load_preferences(str(path)) == [PreferenceExample(history, "Why did the chicken...", "No.")]


def test_conversational_that_differs_before_the_last_message_is_an_error(tmp_path):
    row = {"chosen": [user("Hi"), assistant("Hello")], "rejected": [user("Hey"), assistant("Hello")]}
    with pytest.raises(PrefError, match=r"row 1: 'chosen' and 'rejected' must differ only in their last"):
        load_preferences(write_jsonl(tmp_path / "chat.jsonl", [row]))


def test_conversational_answer_must_come_from_the_assistant(tmp_path):
    row = {"prompt": [user("Hi")], "chosen": [assistant("Hello")], "rejected": [user("Hello")]}
    with pytest.raises(PrefError, match=r"row 1: bad field 'rejected': the last message must be the assistant's"):
        load_preferences(write_jsonl(tmp_path / "chat.jsonl", [row]))


@pytest.mark.parametrize(
    "chosen, rejected, expected",
    [
        # the space before the answer goes with the answer, as tokenizers attach it
        ("Human: hi\n\nAssistant: Hello!", "Human: hi\n\nAssistant: Go away.", ("Human: hi\n\nAssistant:", " Hello!", " Go away.")),
        # a shared beginning that ends mid-word is cut back to the word boundary
        ("Q: greet me A: Hello", "Q: greet me A: Help", ("Q: greet me A:", " Hello", " Help")),
        # one text starting with the other still leaves each answer a word
        ("Q: yes? A: Yes", "Q: yes? A: Yes indeed", ("Q: yes? A:", " Yes", " Yes indeed")),
        # a newline before the answer stays in the prompt
        ("Question\nYes", "Question\nNo", ("Question\n", "Yes", "No")),
    ],
)
def test_implicit_prompt_from_strings(tmp_path, chosen, rejected, expected):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"chosen": chosen, "rejected": rejected}])
    assert load_preferences(path) == [PreferenceExample(*expected)]


def test_implicit_prompt_needs_shared_text(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"chosen": "Yes please", "rejected": "No thanks"}])
    with pytest.raises(PrefError, match=r"row 1: missing field 'prompt' \('chosen' and 'rejected' share no leading text"):
        load_preferences(path)


def test_stack_exchange_paired_prefers_response_j(tmp_path):
    row = {"qid": 1, "question": "How do I exit vim?", "response_j": ":q", "response_k": "Reboot.", "date": "2020"}
    path = write_jsonl(tmp_path / "se.jsonl", [row])
    assert load_preferences(path) == [PreferenceExample("How do I exit vim?", ":q", "Reboot.")]


def test_missing_field_names_file_row_and_field(tmp_path):
    rows = ROWS + [{"prompt": "p", "chosen": "c"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(PrefError) as info:
        load_preferences(path)
    message = str(info.value)
    assert message == (
        f"{path} row 3: missing field 'rejected' "
        "(expected prompt/chosen/rejected, conversational messages, or question/response_j/response_k)"
    )
    assert "\n" not in message


@pytest.mark.parametrize("row, hint", [({"prompt": "p"}, "prompts alone train an objective that samples its answers (--objective online-dpo"),
                                       ({"prompt": "p", "completion": "c"}, "prompt/completion rows train --objective sft")])
def test_another_objectives_rows_are_named_with_the_objective_they_train(tmp_path, row, hint):
    path = write_jsonl(tmp_path / "rows.jsonl", [row])
    with pytest.raises(PrefError, match=r"row 1: a prompt without chosen and rejected answers \(expected prompt/chosen/rejected"):
        load_preferences(path)
    with pytest.raises(PrefError, match=re.escape(hint)):
        load_preferences(path)


def test_csv_cells_stay_text(tmp_path):
    path = tmp_path / "math.csv"
    path.write_text("prompt,chosen,rejected\n2+2?,4,5\n", encoding="utf-8")
    assert load_preferences(str(path)) == [PreferenceExample("2+2?", "4", "5")]


def test_csv_errors_count_data_rows(tmp_path):
    path = tmp_path / "prefs.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\nd,,f\n", encoding="utf-8")
    with pytest.raises(PrefError, match=r"prefs\.csv row 2: empty field 'chosen'"):
        load_preferences(str(path))
    path.write_text("prompt,chosen\na,b\n", encoding="utf-8")
    with pytest.raises(PrefError, match=r"prefs\.csv row 1: missing field 'rejected'"):
        load_preferences(str(path))


def test_missing_field_in_stack_exchange_row(tmp_path):
    path = write_jsonl(tmp_path / "se.jsonl", [{"question": "q", "response_j": "a"}])
    with pytest.raises(PrefError, match=r"se\.jsonl row 1: missing field 'response_k'"):
        load_preferences(path)


def test_bad_field_type(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": 3, "rejected": "r"}])
    with pytest.raises(PrefError, match=r"row 1: bad field 'chosen': expected a string, got int"):
        load_preferences(path)


def test_row_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [ROWS[0], ["a", "b"]])
    with pytest.raises(PrefError, match=r"row 2: expected an object with named fields, got list"):
        load_preferences(path)


def test_bad_json_line_names_the_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "p", "chosen": \n', encoding="utf-8")
    with pytest.raises(PrefError, match=r"prefs\.jsonl line 2: invalid JSON"):
        load_preferences(str(path))


def test_missing_file_says_what_is_accepted(tmp_path):
    with pytest.raises(PrefError, match=r"nope\.jsonl: no such file or folder; use a \.jsonl/\.json, \.csv or \.parquet file"):
        load_preferences(str(tmp_path / "nope.jsonl"))


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "prefs.txt"
    path.write_text("hello\n", encoding="utf-8")
    with pytest.raises(PrefError, match=r"prefs\.txt: unsupported file type"):
        load_preferences(str(path))


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("header.csv", "prompt,chosen,rejected\n")])
def test_empty_data_is_an_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PrefError, match=rf"{name}: (the file is empty|no rows of data)"):
        load_preferences(str(path))


def test_unknown_hub_name_is_a_clean_error(monkeypatch):
    # offline mode fails at once instead of retrying an unreachable hub
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PrefError) as info:
        load_preferences("nobody-here/no-such-preferences")
    message = str(info.value)
    assert message.startswith("cannot load dataset 'nobody-here/no-such-preferences': no such local file or folder, and it is not in "
                              "the local datasets cache")
    assert "\n" not in message


def test_limit_must_be_positive(tmp_path):
    with pytest.raises(PrefError, match="limit must be a positive"):
        load_preferences(write_jsonl(tmp_path / "prefs.jsonl", ROWS), limit=0)


def test_folder_of_data_files(tmp_path):
    # such as a hub dataset repository cloned with git
    (tmp_path / "repo").mkdir()
    write_jsonl(tmp_path / "repo" / "train.jsonl", ROWS)
    assert load_preferences(str(tmp_path / "repo")) == EXPECTED
