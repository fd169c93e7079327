"""The model card in final/: Hub metadata that huggingface_hub reads, and the command that trains the model again."""

import json

from huggingface_hub import ModelCard

from pref.cli.main import parse_options
from pref.config import build_config
from pref.reporting.card import hub_datasets, model_card, reproduce, write_model_card


def record(**flags):
    return {"config": build_config(flags=flags).to_dict(), "versions": {"pref": "0.1.0", "torch": "2.13.0"},
            "plugins": [{"kind": "dataset", "name": "identity-shift", "package": "pref", "version": "0.1.0"}]}


def test_card_of_an_online_run_on_the_default_model(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "run.json").write_text(json.dumps(record(objective="divpo", reward="noun-diversity", steps=60)))
    rows = [{"step": 1, "loss": 2.0, "reward/mean": 0.5}, {"step": 2, "loss": 1.5, "reward/mean": float("nan")}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    card = ModelCard.load(write_model_card(str(tmp_path)))
    assert card.data.base_model == "pref-default" and card.data.library_name == "transformers"
    assert card.data.tags == ["pref", "divpo", "preference-optimization"] and card.data.datasets is None
    assert "| `loss` | 1.5 | 2 |" in card.text and "| `reward/mean` | 0.5 | 1 |" in card.text  # the last finite value
    assert "pref run --objective divpo --reward noun-diversity --seed 0 --steps 60" in card.text
    assert "--model" not in card.text and "--lr" not in card.text  # the embedded default and its learning rate are defaults


def test_hub_datasets_are_named_and_local_data_is_not(tmp_path):
    local = tmp_path / "prefs"
    local.mkdir()
    entries = ["trl-lib/ultrafeedback_binarized", "data/prefs.jsonl", str(local), "identity-shift", "prefs.jsonl"]
    assert hub_datasets(entries, {"identity-shift"}) == ["trl-lib/ultrafeedback_binarized"]
    text = model_card(record(objective="dpo", dataset=entries[:1], model="HuggingFaceTB/SmolLM2-135M-Instruct"), [])
    card = ModelCard(text)
    assert card.data.datasets == ["trl-lib/ultrafeedback_binarized"] and card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "## Final metrics" not in text  # nothing was logged


def test_an_adapter_runs_card_is_a_peft_card_and_its_command_names_the_adapter():
    text = model_card(record(objective="dpo", dataset=["prefs.jsonl"], adapter="lora", adapter_options={"r": 4}), [])
    card = ModelCard(text)
    assert card.data.library_name == "peft" and card.data.tags == ["pref", "dpo", "preference-optimization", "lora"]
    assert "pref run --objective dpo --dataset prefs.jsonl --seed 0 --adapter lora --adapter-option r=4 --steps 400" in text


def test_reward_model_card_is_a_text_classifier():
    text = model_card(record(objective="reward-model", dataset=["prefs.jsonl"]), [], pipeline_tag="text-classification")
    assert ModelCard(text).data.pipeline_tag == "text-classification"


def test_a_lora_reward_models_card_is_a_text_classifier(tmp_path):
    """final/ of an adapter run has no config.json: peft's task type says what the model is."""
    (tmp_path / "final").mkdir()
    (tmp_path / "run.json").write_text(json.dumps(record(objective="reward-model", dataset=["prefs.jsonl"], adapter="lora")))
    (tmp_path / "final" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "SEQ_CLS"}))
    assert ModelCard.load(write_model_card(str(tmp_path))).data.pipeline_tag == "text-classification"
    (tmp_path / "final" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM"}))
    assert ModelCard.load(write_model_card(str(tmp_path))).data.pipeline_tag == "text-generation"


def test_the_command_spells_options_and_puts_the_rest_in_a_config_file():
    config = build_config(flags={
        "objective": "divpo", "embedder": "sentence-transformers", "embedder_options": {"model": "/m/minilm", "batch_size": 4}, "curriculum": True,
        "dataset": ["a.jsonl", "b.jsonl"], "objective_options": {"beta": 0.2, "criterion": "frequency"},
        "reward_options": {"min_zipf": 3.5}, "temperature": 0.7, "output_dir": "runs/x", "save_every": 10,
    }).to_dict()
    command, extra = reproduce(config)
    assert command == ("pref run --objective divpo -o beta=0.2 -o criterion=frequency --dataset a.jsonl --dataset b.jsonl "
                       "--reward-option min_zipf=3.5 --embedder sentence-transformers:/m/minilm --seed 0 --steps 400 "
                       "--curriculum --config run-config.yaml")
    assert extra == {"embedder_options": {"batch_size": 4}, "temperature": 0.7}  # the file sets them; where the run was kept is not part of it
    # --temperature is a flag too: the card does not say the file holds settings without one
    text = model_card({"config": config, "versions": {}}, [])
    assert "holding the settings the command does not spell out:\n\n```yaml\nembedder_options:" in text


def test_a_run_that_samples_nothing_records_and_spells_no_sampling_settings(prefs_file):
    from pref.plan import PLAN_DEFAULTS, resolve_plan
    from pref.registry import load_registry
    from pref.train import run_record

    registry = load_registry()

    def recorded(**flags):
        config = build_config(flags=flags)
        return run_record(config, resolve_plan(config, registry), registry)["config"]

    offline = recorded(objective="dpo", dataset=[prefs_file])
    assert offline["max_new_tokens"] is None and offline["temperature"] is None
    assert reproduce(offline)[1] == {}  # no run-config.yaml: it held max_new_tokens 32, though nothing was sampled
    assert recorded(objective="dpo", dataset=[prefs_file], test_prompts=["Hi."])["max_new_tokens"] == 32  # their answers' length
    online = recorded(objective="divpo")
    assert online["max_new_tokens"] == 8 and reproduce(online)[1] == {"max_new_tokens": 8}  # the noun reward's, as it sampled
    assert reproduce({**offline, **PLAN_DEFAULTS})[1] == {}  # an older run.json recorded the defaults: the card spells none


def test_the_command_gives_option_texts_back_as_they_were():
    import shlex

    texts = {"separator": "\n\n", "system": "Answer: one word.", "model": "runs/rm #2/final", "split": "yes", "tag": "1e-3", "words": ["a, b", "off"],
             "plain": "sigmoid", "empty": "", "number": 3}
    command, _ = reproduce(build_config(flags={"objective": "dpo", "dataset_options": texts}).to_dict())
    args = shlex.split(command)
    # each was read back as something else: "\n\n" as None, "Answer: one word." as a mapping, "runs/rm #2/final" cut at the #
    assert parse_options(tuple(args[i + 1] for i, a in enumerate(args) if a == "--dataset-option"), "--dataset-option") == texts
    assert "--dataset-option plain=sigmoid" in command  # plain texts stay plain
