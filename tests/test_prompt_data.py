"""The `prompts` builder: prompt-only rows (TRL's prompt-only format, GSM8K's `question`, a conversation), pairs and labelled answers."""

import csv
import json

import pytest
from click.testing import CliRunner

from pref.cli.main import cli
from pref.errors import PrefError
from pref.examples import LabeledExample, PreferenceExample, PromptExample
from pref.plugins.prompt_data import load_prompts, prompt_record

USER = {"role": "user", "content": "Name a fruit."}
ANSWER = {"role": "assistant", "content": "apple"}


@pytest.mark.parametrize("row, record", [
    ({"prompt": "Name a fruit."}, PromptExample("Name a fruit.")),
    ({"prompt": [USER], "answer": "apple"}, PromptExample([USER], {"answer": "apple"})),  # the row's other fields are its columns
    ({"prompt": json.dumps([USER])}, PromptExample([USER])),  # a CSV cell holding messages
    ({"question": "What is 2 + 2?", "answer": "4"}, PromptExample("What is 2 + 2?", {"answer": "4"})),
    ({"messages": [{"role": "system", "content": "Be brief."}, USER, ANSWER]},  # its answer kept as the row's `completion` (GKD's)
     PromptExample([{"role": "system", "content": "Be brief."}, USER], {"completion": "apple"})),
    ({"messages": [USER]}, PromptExample([USER])),
    ("Name a fruit.", PromptExample("Name a fruit.")),
    ({"prompt": "Name a fruit.", "chosen": "apple", "rejected": "chair"}, PreferenceExample("Name a fruit.", "apple", "chair")),
    ({"chosen": [USER, ANSWER], "rejected": [USER, {"role": "assistant", "content": "chair"}]}, PreferenceExample([USER], "apple", "chair")),
    ({"prompt": "Name a fruit.", "completion": "apple", "label": True}, LabeledExample("Name a fruit.", "apple", True)),
    ({"prompt": "Name a fruit.", "chosen": "", "rejected": "", "solution": "apple"},  # a CSV's empty cells
     PromptExample("Name a fruit.", {"chosen": "", "rejected": "", "solution": "apple"})),
])
def test_each_row_format_gives_its_record(row, record):
    assert prompt_record(row, "data.jsonl row 1") == record


@pytest.mark.parametrize("row, message", [
    ({"text": "hello"}, r"data.jsonl row 1: no field 'prompt'; expected a prompt \('prompt': a string or chat messages"),
    ({"prompt": "  "}, r"row 1: empty field 'prompt'"),
    ({"prompt": 3}, r"bad field 'prompt': expected a string or a list of \{'role', 'content'\} messages"),
    ({"messages": [ANSWER]}, r"bad field 'messages': a prompt's messages must end in a turn the model answers"),
    ({"prompt": [USER, ANSWER]}, r"bad field 'prompt': a prompt's messages must end in a turn the model answers"),
    ({"prompt": "Name a fruit.", "completion": "apple", "label": "maybe"}, r"bad field 'label'"),
    (7, r"expected a prompt or an object with named fields, got int"),
])
def test_bad_rows_are_one_line_errors_naming_the_row(row, message):
    with pytest.raises(PrefError, match=message):
        prompt_record(row, "data.jsonl row 1")


def test_a_csv_of_prompts_and_a_limit(tmp_path):
    path = tmp_path / "prompts.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "solution"])
        writer.writerows([["Name a fruit.", "apple"], [json.dumps([USER]), "apple"], ["Name a tool.", "saw"]])
    assert load_prompts(str(path), limit=2) == [PromptExample("Name a fruit.", {"solution": "apple"}), PromptExample([USER], {"solution": "apple"})]


def test_online_objectives_train_on_a_file_of_prompts(tmp_path, tiny_model_dir):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in [{"prompt": "Name a fruit."}, {"prompt": [USER]}, {"question": "Name a tool."}]))
    for objective in ("grpo", "online-dpo"):
        out = tmp_path / objective
        result = CliRunner().invoke(cli, ["run", "--objective", objective, "--reward", "noun-diversity", "--dataset", str(data), "--model", tiny_model_dir,
                                          "-k", "2", "--batch-size", "3", "--steps", "1", "--max-new-tokens", "4", "--device", "cpu",
                                          "--log-completions", "--no-progress", "--output-dir", str(out)])
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in open(out / "completions.jsonl")]
        assert {json.dumps(row["prompt"]) for row in rows} == {json.dumps(p) for p in ("Name a fruit.", [USER], "Name a tool.")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "Name a fruit."}) + "\n")
    result = CliRunner().invoke(cli, ["run", "--objective", "grpo", "--reward", "noun-diversity", "--dataset", str(bad), "--model", tiny_model_dir,
                                      "--output-dir", str(tmp_path / "bad-run")])
    assert result.exit_code == 2 and f"{bad} row 1: no field 'prompt'" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("objective, builder, wanted", [("dpo", "prompts", "pairs (PreferenceExample, as the preferences builder reads them)"),
                                                        ("sft", "prompts", "sets (LabeledExample or ConversationExample, as the completions builder"),
                                                        ("kto", "text", "sets (LabeledExample or ConversationExample, as the labeled builder")])
def test_an_offline_objective_refuses_records_it_makes_no_batches_of_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch,
                                                                                            objective, builder, wanted):
    from pref.policy import HFPolicy

    monkeypatch.setattr(HFPolicy, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "Name a fruit.", "text": "apple"}) + "\n")
    result = CliRunner().invoke(cli, ["run", "--objective", objective, "--dataset", builder, "--dataset-option", f"path={data}",
                                      "--model", tiny_model_dir, "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and f"--dataset {builder} gives" in result.output and wanted in result.output, result.output
