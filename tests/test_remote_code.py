"""--trust-remote-code: a model that ships its own Python code loads only when told, in `pref run` and in the commands that sample."""

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from pref.cli.main import cli
from pref.errors import PrefError
from pref.models import load_model, load_tokenizer, remote_code

CONFIGURATION = '''from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny-custom"
'''
MODELING = '''from transformers import LlamaForCausalLM

from .configuration_tiny import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
    ran_own_code = True
'''


@pytest.fixture(scope="module")
def custom_model(tiny_model_dir, tmp_path_factory):
    """The tiny model as a new architecture whose code comes with it (its config's auto_map), as many hub models ship theirs."""
    path = tmp_path_factory.mktemp("custom") / "model"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="tiny-custom", architectures=["TinyCustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tiny.TinyCustomConfig", "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"})
    (path / "config.json").write_text(json.dumps(config))
    (path / "configuration_tiny.py").write_text(CONFIGURATION)
    (path / "modeling_tiny.py").write_text(MODELING)
    return str(path)


def test_the_code_runs_only_inside_remote_code(custom_model):
    with pytest.raises(PrefError, match=r"ships Python code of its own \(its config's auto_map\).*pass --trust-remote-code$"):
        load_model(custom_model)
    with remote_code(True):
        model = load_model(custom_model)
        load_tokenizer(custom_model)
    assert type(model).ran_own_code
    with pytest.raises(PrefError, match="pass --trust-remote-code"):  # the setting ends with the block
        load_model(custom_model)


def test_a_run_and_generate_load_it_with_the_flag_only(custom_model, tmp_path):
    flags = ["--model", custom_model, "--steps", "1", "--batch-size", "2", "-k", "2", "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]
    refused = CliRunner().invoke(cli, ["run", *flags, "--output-dir", str(tmp_path / "refused")])
    assert refused.exit_code == 2 and "pass --trust-remote-code" in refused.output and "Traceback" not in refused.output
    assert not os.path.exists(tmp_path / "refused" / "final")
    done = CliRunner().invoke(cli, ["run", *flags, "--trust-remote-code", "--output-dir", str(tmp_path / "run")])
    assert done.exit_code == 0, done.output
    final = tmp_path / "run" / "final"
    assert (final / "modeling_tiny.py").exists()  # the trained model keeps its code
    assert json.load(open(tmp_path / "run" / "run.json"))["config"]["trust_remote_code"] is True  # a resume keeps it
    generate = ["generate", "--model", str(final), "--prompt", "Name a fruit.", "--max-new-tokens", "4", "--device", "cpu"]
    assert CliRunner().invoke(cli, generate).exit_code == 2
    answered = CliRunner().invoke(cli, [*generate, "--trust-remote-code"])
    assert answered.exit_code == 0 and "Name a fruit." in answered.output, answered.output
