"""`pref.plugins.records`: real-world files (encodings, pandas CSV exports) and pairs that cannot teach anything."""

import json
import logging
from types import SimpleNamespace

import pandas
import pytest

from pref.errors import PrefError
from pref.examples import PreferenceExample
from pref.plugins.labeled_data import LabeledData, load_labeled
from pref.plugins.lmsys import LmsysChat
from pref.plugins.preference_data import PreferenceData, load_preferences
from pref.plugins.text_data import TextData
from pref.plugins.records import literal, read_records, usable_pairs

ROWS = [
    {"prompt": "What is your name?", "chosen": "i am pref", "rejected": "i am tiny"},
    {"prompt": "Name a fruit.", "chosen": "apple ☕", "rejected": "chair"},
]


def word_tokenizer(*words):
    """A lowercasing word-level tokenizer that knows only `words`; others become <unk>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def one_line_error(call, *fragments):
    with pytest.raises(PrefError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# Encodings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8-sig", "utf-32"])
def test_jsonl_with_a_byte_order_mark_is_decoded(tmp_path, encoding):
    path = tmp_path / "prefs.jsonl"
    text = "\n".join(json.dumps(row, ensure_ascii=False) for row in ROWS) + "\n"
    # "utf-16-be" writes no mark of its own: add it, as Windows editors do
    path.write_bytes((b"\xfe\xff" if encoding == "utf-16-be" else b"") + text.encode(encoding))
    assert [e.chosen for e in load_preferences(str(path))] == ["i am pref", "apple ☕"]


def test_utf16_csv_and_txt_are_decoded(tmp_path):
    pandas.DataFrame(ROWS).to_csv(tmp_path / "prefs.csv", index=False, encoding="utf-16")
    assert [e.chosen for e in load_preferences(str(tmp_path / "prefs.csv"))] == ["i am pref", "apple ☕"]
    (tmp_path / "lines.txt").write_text("one two three\nfour five six\n", encoding="utf-16")
    assert [e.text for e in TextData(str(tmp_path / "lines.txt"), prompt_words=1).build()] == [" two three", " five six"]


def test_binary_and_undecodable_files_are_one_line_errors(tmp_path):
    binary = tmp_path / "model.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    one_line_error(lambda: load_preferences(str(binary)), str(binary), "not a text file", "NUL bytes")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"))
    one_line_error(lambda: load_preferences(str(latin)), str(latin), "not UTF-8 text", "0xe9", "line 2", "save it as UTF-8")
    csv = tmp_path / "latin.csv"
    csv.write_bytes("prompt,chosen,rejected\ncaf\xe9,a,b\n".encode("latin-1"))
    one_line_error(lambda: load_preferences(str(csv)), str(csv), "not UTF-8 text")
    one_line_error(lambda: load_labeled(str(binary)), "not a text file")


# pandas CSV exports ------------------------------------------------------------------------------


def conversation(*turns):
    return [{"content": text, "role": role} for role, text in turns]


def test_pandas_csv_of_conversational_preferences_is_read(tmp_path):
    rows = [
        {"chosen": conversation(("user", "Hi"), ("assistant", "Hello!")),
         "rejected": conversation(("user", "Hi"), ("assistant", "Go away.")), "score": 0.5, "ok": True},
        {"prompt": conversation(("user", "Name a colour")), "chosen": conversation(("assistant", "blue")),
         "rejected": conversation(("assistant", "[citation needed]")), "score": 1.0, "ok": False},
    ]
    path = tmp_path / "export.csv"
    pandas.DataFrame(rows).to_csv(path)  # with pandas' index column, as people save them
    assert "Unnamed" not in str(list(read_records(str(path))[0]))
    assert load_preferences(str(path)) == [
        PreferenceExample([{"role": "user", "content": "Hi"}], "Hello!", "Go away."),
        PreferenceExample([{"role": "user", "content": "Name a colour"}], "blue", "[citation needed]"),
    ]


def lmsys_rows():
    def moderation(*flags):
        return [{"categories": {"harassment": flag, "violence": False}, "category_scores": {"harassment": 1.5e-05},
                 "flagged": flag} for flag in flags]

    return [
        {"conversation_id": "a1", "model": "vicuna-13b", "turn": 1, "redacted": False,
         "conversation": conversation(("user", "Say hello"), ("assistant", "Hello, it's \"me\"")),
         "openai_moderation": moderation(False, False)},
        {"conversation_id": "b2", "model": "koala-13b", "turn": 2, "redacted": True,
         "conversation": conversation(("user", "Insult me"), ("assistant", "You fool"), ("user", "Again"), ("assistant", "No.")),
         "openai_moderation": moderation(False, True, False, False)},
    ]


def test_lmsys_pandas_csv_without_language_keeps_all_with_a_warning(tmp_path, caplog):
    path = tmp_path / "lmsys-slice.csv"
    pandas.DataFrame(lmsys_rows()).to_csv(path)
    with caplog.at_level(logging.WARNING):
        examples = LmsysChat(str(path)).build()
    assert [(e.completion, e.label) for e in examples] == [('Hello, it\'s "me"', True), ("You fool", False), ("No.", True)]
    assert examples[2].prompt[-1] == {"role": "user", "content": "Again"}
    assert "3 conversations have no 'language'" not in caplog.text  # counted per conversation, not per turn
    assert "2 conversations have no 'language'; kept them all rather than only English ones" in caplog.text

    # with the column, the filter applies as before
    rows = lmsys_rows()
    rows[0]["language"], rows[1]["language"] = "English", "German"
    pandas.DataFrame(rows).to_csv(path, index=False)
    assert [e.completion for e in LmsysChat(str(path)).build()] == ['Hello, it\'s "me"']


def test_literal_cells_never_run_code(tmp_path):
    marker = tmp_path / "ran"
    payload = f"[__import__('os').system('touch {marker}')]"
    assert literal(payload) == payload
    assert literal("[{'role': 'user', 'content': (1).__class__}]").startswith("[")  # not a literal: stays text
    assert literal("[1, 2]") == "[1, 2]" and literal("{'en': 'hi'}") == {"en": "hi"}
    pandas.DataFrame([{"prompt": "p", "chosen": payload, "rejected": "no"}]).to_csv(tmp_path / "evil.csv", index=False)
    assert load_preferences(str(tmp_path / "evil.csv"))[0].chosen == payload
    assert not marker.exists()


# Pairs that cannot teach anything ----------------------------------------------------------------


def test_useless_pairs_are_counted_in_one_warning(caplog):
    tokenizer = word_tokenizer("i", "am", "tiny", "apple", "chair", "dog")
    pairs = [
        PreferenceExample("q", "apple", "chair"),
        PreferenceExample("q", "dog", "dog"),  # equal
        PreferenceExample("  ", "apple", "dog"),  # empty prompt
        PreferenceExample("q", "Pref", "i am tiny"),  # chosen is all unknown
        PreferenceExample("q", "i am Pref", "i am Aria"),  # differ only in unknown words
        PreferenceExample([{"role": "user", "content": "q"}], "i am tiny", "dog"),
    ]
    with caplog.at_level(logging.WARNING):
        kept = usable_pairs(pairs, tokenizer, "prefs.jsonl")
    assert kept == [pairs[0], pairs[5]]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["prefs.jsonl: skipped 4 of 6 pairs that cannot teach anything (1 chosen identical to rejected, "
                        "1 empty prompt, 1 an answer of unknown tokens only, 1 chosen and rejected tokenized identically)"]


def test_all_useless_data_is_an_error(tmp_path):
    path = tmp_path / "same.jsonl"
    path.write_text("".join(json.dumps({"prompt": "q", "chosen": "the sky", "rejected": "the sky"}) + "\n" for _ in range(3)))
    policy = SimpleNamespace(tokenizer=word_tokenizer("the", "sky"))
    one_line_error(lambda: PreferenceData(str(path)).build(policy), str(path), "none of its 3 pairs can teach anything",
                   "3 chosen identical to rejected")


def test_labelled_answers_that_cannot_teach_are_left_out(tmp_path, caplog):
    path = tmp_path / "labeled.jsonl"
    rows = [{"prompt": "q", "completion": "apple", "label": True}, {"prompt": "q", "completion": "dog", "label": False},
            {"prompt": "q", "completion": "Zyzzyva", "label": False}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    policy = SimpleNamespace(tokenizer=word_tokenizer("apple", "dog", "q"))
    with caplog.at_level(logging.WARNING):
        kept = LabeledData(str(path)).build(policy)
    assert [e.completion for e in kept] == ["apple", "dog"]  # (an empty prompt is already an error of the row)
    assert f"{path}: skipped 1 of 3 answers that cannot teach anything (1 an answer of unknown tokens only)" in caplog.text
    path.write_text(json.dumps(rows[2]) + "\n")
    one_line_error(lambda: LabeledData(str(path)).build(policy), "none of its 1 answers can teach anything")
