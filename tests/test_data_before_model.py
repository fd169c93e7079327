"""The datasets are read with the tokenizer alone and checked before the model loads: a bad file fails in seconds."""

import json
import os

import pytest
from click.testing import CliRunner

import pref.policy
from pref.cli.main import cli
from pref.errors import ModelNotLoaded
from pref.examples import PreferenceExample
from pref.hookspecs import hookimpl
from pref.interfaces import SamplingConfig
from pref.models import load_tokenizer
from pref.policy import HFPolicy
from pref.registry import Registry, get_plugin_manager


@pytest.fixture
def model_loads(monkeypatch):
    """Each model load of the run, in order; the real loading function still runs."""
    loads = []
    real = pref.policy.load_model

    def spy(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(pref.policy, "load_model", spy)
    return loads


def error_of(args):
    result = CliRunner().invoke(cli, ["run", "--device", "cpu", "--steps", "1", *map(str, args)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    [line] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    return line


def write(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


PAIR = {"prompt": "Name a fruit.", "chosen": "apple", "rejected": "chair"}


@pytest.mark.parametrize("rows, flags, message", [
    ([PAIR, '{"prompt": "x", '], [], "line 2: invalid JSON"),
    ([PAIR, {"prompt": "Name a colour.", "chosen": "red"}], [], "missing field 'rejected'"),
    ([{**PAIR, "rejected": "apple"}], [], "can teach anything"),
    ([PAIR], ["--validation-split", "0.5"], "dataset 1 has 1 records, too few to hold some out"),
])
def test_a_bad_dataset_fails_before_the_model_loads(tmp_path, tiny_model_dir, model_loads, rows, flags, message):
    bad = write(tmp_path / "bad.jsonl", rows)
    line = error_of(["--objective", "dpo", "--dataset", bad, "--model", tiny_model_dir, "--output-dir", tmp_path / "run", *flags])
    assert message in line
    assert model_loads == []


def test_a_bad_validation_dataset_fails_before_the_model_loads(tmp_path, tiny_model_dir, prefs_file, model_loads):
    bad = write(tmp_path / "held.jsonl", [PAIR, "not json"])
    line = error_of(["--objective", "dpo", "--dataset", prefs_file, "--validation-dataset", bad, "--model", tiny_model_dir, "--output-dir", tmp_path / "run"])
    assert "held.jsonl line 2: invalid JSON" in line
    assert model_loads == []


class SamplingBuilder:
    """Pairs of the model's own answers: it samples from the model, as identity-shift does, and declares nothing."""

    def build(self, policy):
        [[first, second]] = policy.generate(["Name a fruit."], 2, SamplingConfig(max_new_tokens=4))
        return [PreferenceExample("Name a fruit.", "apple", first + "!"), PreferenceExample("Name a fruit.", "apple", second + "?")]


class SamplingPlugin:
    @hookimpl
    def register_dataset_builders(register):
        register("sampled", SamplingBuilder)


@pytest.fixture
def sampling_plugin(monkeypatch):
    pm, failures, sources = get_plugin_manager()
    pm.register(SamplingPlugin, name="test-plugin")
    monkeypatch.setattr("pref.cli.main.load_registry", lambda: Registry(pm, failures, sources))


def test_a_builder_that_samples_is_built_from_the_loaded_model_and_the_others_are_read_first(tmp_path, tiny_model_dir, prefs_file,
                                                                                              model_loads, sampling_plugin, monkeypatch):
    built = []  # the number of model loads when each build() got its records
    build = SamplingBuilder.build

    def counting(self, policy):
        records = build(self, policy)
        built.append(len(model_loads))
        return records

    monkeypatch.setattr(SamplingBuilder, "build", counting)
    bad = write(tmp_path / "bad.jsonl", [PAIR, "not json"])
    args = ["--objective", "dpo", "--dataset", "sampled", "--model", tiny_model_dir, "--batch-size", "2"]
    # a bad file next to a builder that samples still fails before the model loads
    assert "bad.jsonl line 2: invalid JSON" in error_of([*args, "--dataset", bad, "--output-dir", tmp_path / "bad"])
    assert model_loads == [] and built == []
    result = CliRunner().invoke(cli, ["run", "--device", "cpu", "--steps", "1", *args, "--dataset", prefs_file, "--validation-split", "0.5",
                                      "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert len(model_loads) == 1 and built == [1]  # its records came once, from the loaded model
    assert os.path.isfile(tmp_path / "run" / "final" / "model.safetensors")


def test_a_policy_without_its_model_says_so(tiny_model_dir):
    policy = HFPolicy(None, load_tokenizer(tiny_model_dir))
    assert policy.tokenizer("Hello")["input_ids"]
    for use in (lambda: policy.model, lambda: policy.device, lambda: policy.logps(policy.encode(["Hi"], ["there"]))):
        with pytest.raises(ModelNotLoaded, match="the policy's model is not loaded yet; call policy.load_model"):
            use()
    policy.load_model(tiny_model_dir)
    assert policy.model.config.pad_token_id == policy.tokenizer.pad_token_id
    assert policy.generate(["Hi"], 1, SamplingConfig(max_new_tokens=2))
