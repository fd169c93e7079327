"""The CLI's user errors: one line on stderr, exit code 2, no traceback, before any model loads.

`pref list-plugins --json` is checked here too, as the machine-readable view
of the registry that error messages point users to.
"""

import json

import pytest
import torch
from click.testing import CliRunner

from pref.cli.main import cli, parse_options
from pref.config import build_config, read_config_file
from pref.errors import PrefError
from pref.policy import HFPolicy


@pytest.fixture(autouse=True)
def no_model(monkeypatch, tmp_path):
    """Fail the test if anything loads a model: every error here must come before that.

    The tests also run in `tmp_path`, so nothing is written to the checkout.
    """

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error was found")

    monkeypatch.setattr(HFPolicy, "load_model", refuse)
    monkeypatch.delenv("PREF_PLUGINS", raising=False)
    monkeypatch.chdir(tmp_path)


def run(*args):
    """`pref ARGS`; return the result after checking it is a clean user error."""
    result = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, AssertionError), result.exception
    return result


def error_line(result):
    """The one `Error:` line on stderr (plugin warnings may come before it)."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert result.stdout == ""
    return errors[0]


def test_unknown_objective_suggests_close_name(prefs_file):
    line = error_line(run("run", "--objective", "dpx", "--dataset", prefs_file))
    assert line.startswith("Error: unknown objective 'dpx': did you mean 'dpo'")


def test_missing_dataset_file_is_named():
    line = error_line(run("run", "--dataset", "no_such_prefs.jsonl"))
    assert "no_such_prefs.jsonl" in line
    assert "no such file" in line


def test_missing_dataset_path_is_named():
    line = error_line(run("run", "--dataset", "./data/prefs"))
    assert "./data/prefs" in line


def test_unknown_reward_is_found_before_the_model(prefs_file):
    line = error_line(run("run", "--dataset", prefs_file, "--reward", "no-such-reward"))
    assert "unknown reward 'no-such-reward'" in line


def test_bad_config_key_suggests_the_right_one(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('objective = "dpo"\nstepz = 3\n')
    line = error_line(run("run", "--config", str(config)))
    assert "unknown config key 'stepz': did you mean 'steps'?" in line


def test_missing_config_file_is_named():
    line = error_line(run("run", "--config", "nowhere.toml"))
    assert "nowhere.toml" in line


def test_bad_config_value_is_an_error(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("steps: 0\n")
    line = error_line(run("run", "--config", str(config)))
    assert "steps must be a positive whole number" in line


def test_yaml_config_is_read_and_flags_override_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("objective: dpo\nsteps: 7\nlr: 0.001\ndataset: prefs.jsonl\nobjective_options:\n  beta: 0.3\n  loss_type: ipo\n")
    file_values = read_config_file(str(config))
    built = build_config(file_values, {"steps": 3, "objective_options": {"beta": 0.5}})
    assert built.steps == 3  # the flag wins
    assert built.lr == 0.001  # the file's value stays
    assert built.dataset == ["prefs.jsonl"]
    assert built.objective_options == {"beta": 0.5, "loss_type": "ipo"}  # options merge key by key


def test_toml_yaml_and_json_configs_agree(tmp_path):
    # one string where a list of names goes is a list of one (`loggers = "jsonl"` was refused)
    toml = tmp_path / "run.toml"
    toml.write_text('steps = 7\nbatch-size = 2\nloggers = "tensorboard"\n[objective_options]\nbeta = 0.3\n')
    yaml = tmp_path / "run.yml"
    yaml.write_text("steps: 7\nbatch-size: 2\nloggers: tensorboard\nobjective_options:\n  beta: 0.3\n")
    json_file = tmp_path / "run.json"
    json_file.write_text('{"steps": 7, "batch-size": 2, "loggers": ["tensorboard"], "objective_options": {"beta": 0.3}}')
    built = build_config(read_config_file(str(toml)))
    assert built == build_config(read_config_file(str(yaml))) == build_config(read_config_file(str(json_file)))
    assert (built.steps, built.batch_size, built.loggers, built.objective_options) == (7, 2, ["tensorboard"], {"beta": 0.3})


@pytest.mark.parametrize("text, message", [
    ('{"steps": 7,}', "cannot parse config file run.json: Expecting property name"),
    ('["steps", 7]', "config file run.json must hold a mapping of keys to values"),
    ('{"steps": "x"}', "steps must be a whole number, not 'x'"),
])
def test_a_bad_json_config_is_a_one_line_error(tmp_path, text, message):
    (tmp_path / "run.json").write_text(text)
    assert message in error_line(run("run", "--config", "run.json"))


def test_the_embedded_default_model_trains_on_one_thread():
    from pref.config import EMBEDDED_MODEL_THREADS

    assert build_config().threads == EMBEDDED_MODEL_THREADS == 1
    assert build_config(flags={"model": "pref-default", "threads": 2}).threads == 2  # a flag wins
    assert build_config(flags={"model": "some/hub-model"}).threads is None  # torch's own choice
    with pytest.raises(PrefError, match="threads must be a positive whole number"):
        build_config(flags={"threads": 0})


def test_pref_log_records_are_printed_as_plain_lines(capsys):
    import logging

    from pref.cli.main import EchoHandler

    EchoHandler().handle(logging.LogRecord("pref.x", logging.INFO, __file__, 1, "building %s", ("it",), None))
    assert capsys.readouterr().err == "building it\n"


def test_bad_option_syntax():
    line = error_line(run("run", "--dataset", "prefs.jsonl", "--option", "beta"))
    assert "--option expects KEY=VALUE" in line
    assert "'beta'" in line


def test_unknown_objective_option_names_accepted_ones(prefs_file):
    line = error_line(run("run", "--objective", "dpo", "--dataset", prefs_file, "-o", "zzz=1"))
    assert "unknown option for objective 'dpo'" in line
    for accepted in ("beta", "loss_type", "label_smoothing"):
        assert accepted in line


def test_list_plugins_json():
    result = run("list-plugins", "--json")
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert set(listing) == {"plugins", "failures"}
    assert listing["plugins"]
    for row in listing["plugins"]:
        assert set(row) == {"kind", "name", "package", "version", "builtin", "description"}
    dpo = next(row for row in listing["plugins"] if (row["kind"], row["name"]) == ("objective", "dpo"))
    assert dpo["package"] == "pref" and dpo["builtin"] is True and dpo["version"]
    assert {"dataset", "objective"} <= {row["kind"] for row in listing["plugins"]}


def test_list_plugins_shows_a_table_per_kind_with_whole_names_in_80_columns(monkeypatch):
    # one table of six columns squeezed descriptions to a dozen characters a line
    monkeypatch.setenv("COLUMNS", "80")
    listing = json.loads(run("list-plugins", "--json").stdout)["plugins"]
    text = run("list-plugins").stdout
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80
    for kind in {row["kind"] for row in listing}:
        assert f"{kind} plugins" in [line.strip() for line in lines]
    for row in listing:
        assert any(line.startswith(f"│ {row['name']} ") and f" {row['package']} {row['version']} " in line for line in lines), row["name"]


def test_list_plugins_kind_filters():
    result = run("list-plugins", "--json", "--kind", "objective")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["plugins"]
    assert "dpo" in [row["name"] for row in rows]
    assert {row["kind"] for row in rows} == {"objective"}


def test_list_plugins_unknown_kind_is_a_usage_error():
    result = run("list-plugins", "--kind", "objectives")
    assert result.exit_code == 2
    assert "objectives" in result.stderr


def test_fsdp_needs_several_processes(prefs_file):
    line = error_line(run("run", "--dataset", prefs_file, "--steps", "1", "--fsdp"))
    assert "--fsdp shards the model over several processes" in line and "--num_processes" in line


def test_sample_sharded_needs_fsdp(prefs_file):
    line = error_line(run("run", "--dataset", prefs_file, "--steps", "1", "--test-prompt", "Hi.", "--sample-sharded"))
    assert line == "Error: --sample-sharded samples through the model --fsdp shards, and this run shards none: add --fsdp, or drop --sample-sharded"


def test_fsdp_refuses_what_it_does_not_support():
    from pref.sharding import refuse_unsupported

    # --merge-lora merges on process 0 from the gathered weights (tests/test_fsdp.py); under accelerate's FSDP that has not run
    refuse_unsupported(build_config(flags={"fsdp": True, "merge_lora": True, "adapter": "lora"}), world=2, distributed_type="MULTI_CPU",
                       online=False, moves_reference=False)
    with pytest.raises(PrefError, match="accelerate's FSDP does not support --merge-lora yet"):
        refuse_unsupported(build_config(flags={"merge_lora": True, "adapter": "lora"}), world=2, distributed_type="FSDP", online=False,
                           moves_reference=False)
    # a moving reference is sharded like the policy: each process mixes its own pieces (tests/test_fsdp.py)
    refuse_unsupported(build_config(flags={"fsdp": True}), world=2, distributed_type="MULTI_CPU", online=False, moves_reference=True)
    with pytest.raises(PrefError, match=r"accelerate's FSDP does not support a moving reference \(sync_ref_model, bema_reference, teacher_model_kind=ema\) yet"):
        refuse_unsupported(build_config(flags={}), world=2, distributed_type="FSDP", online=False, moves_reference=True)
    with pytest.raises(PrefError, match="both shard the model"):
        refuse_unsupported(build_config(flags={"fsdp": True}), world=2, distributed_type="FSDP", online=False, moves_reference=False)
    # pref's own sharding generates: online objectives and test prompts run sharded (tests/test_fsdp.py)
    refuse_unsupported(build_config(flags={"fsdp": True, "test_prompts": ["Hi"]}), world=2, distributed_type="MULTI_CPU", online=True,
                       moves_reference=False)
    # accelerate's own FSDP wraps the model where pref's generation cannot reach it
    with pytest.raises(PrefError, match="accelerate's FSDP does not support online objectives"):
        refuse_unsupported(build_config(flags={}), world=2, distributed_type="FSDP", online=True, moves_reference=False)
    with pytest.raises(PrefError, match="accelerate's FSDP does not support --test-prompt"):
        refuse_unsupported(build_config(flags={"test_prompts": ["Hi"]}), world=2, distributed_type="FSDP", online=False, moves_reference=False)
    refuse_unsupported(build_config(flags={}), world=2, distributed_type="FSDP", online=False, moves_reference=False)


def test_deepspeed_is_refused_before_it_can_save_empty_weights():
    from pref.sharding import refuse_unsupported

    with pytest.raises(PrefError, match="DeepSpeed is not supported: .*--fsdp"):
        refuse_unsupported(build_config(flags={}), world=2, distributed_type="DEEPSPEED", online=False, moves_reference=False)


def test_exponent_numbers_are_numbers_in_yaml_configs_and_options(tmp_path):
    # PyYAML alone reads 1e-6 (no dot) as the string "1e-6"
    config = tmp_path / "run.yaml"
    config.write_text("objective: dpo\nlr: 1e-6\nobjective_options:\n  beta: 2E-1\n")
    built = build_config(read_config_file(str(config)))
    assert built.lr == 1e-6 and built.objective_options == {"beta": 0.2}
    assert parse_options(("beta=1e-3", "label_smoothing=-1.5e+0", "loss_type=e5"), "--option") == {"beta": 1e-3, "label_smoothing": -1.5, "loss_type": "e5"}


def test_an_option_value_that_is_not_yaml_is_a_one_line_error():
    line = error_line(run("run", "--dataset", "prefs.jsonl", "-o", "loss_type=[sigmoid"))
    assert "--option 'loss_type=[sigmoid': the value is not valid YAML" in line
    line = error_line(run("run", "--dataset", "prefs.jsonl", "--lora", "--lora-option", "target_modules=@q_proj"))
    assert "--lora-option 'target_modules=@q_proj'" in line and "quote a text" in line


@pytest.mark.parametrize("line, message", [
    ('temperature = "hot"', "temperature must be a number, not 'hot'"),  # was a TypeError traceback
    ('seed = "x"', "seed must be a whole number, not 'x'"),
    ('gradient_checkpointing = "no"', "gradient_checkpointing must be true or false, not 'no'"),  # was read as on
    ("lr = true", "lr must be a number, not True"),  # was a learning rate of 1
    ('objective_options = "beta=0.1"', "objective_options must be a table of names to values"),
    ('loggers = ["jsonl", 5]', "loggers must be a list of strings, not ['jsonl', 5]"),
    ("loggers = 5", "loggers must be a list of strings, not 5"),  # one string is a list of one, one number is not
    ("test_prompts = [1, 2]", "test_prompts must be a list of strings"),
    ('lora = "yes"', "lora must be true or false"),
])
def test_config_values_of_the_wrong_type_are_named(tmp_path, prefs_file, line, message):
    config = tmp_path / "run.toml"
    config.write_text(f'objective = "dpo"\ndataset = "{prefs_file}"\n{line}\n')
    assert message in error_line(run("run", "--config", str(config)))


@pytest.mark.parametrize("args, message", [
    (["-o", "beta=abc"], "dpo option beta must be a number, not 'abc'"),  # was "'<=' not supported between 'str' and 'int'"
    (["-o", "reference_free=maybe"], "dpo option reference_free must be true or false, not 'maybe'"),  # was read as true
    (["-o", "loss_type=5"], "dpo option loss_type must be a string or a list of strings, not 5"),
    (["--evaluator", "test-prompts", "--evaluator-option", "prompts=5"], "test-prompts option prompts must be a list of strings, not 5"),
])
def test_plugin_options_of_the_wrong_type_are_named(prefs_file, args, message):
    assert message in error_line(run("run", "--objective", "dpo", "--dataset", prefs_file, *args))


def test_ppo_target_kl_still_takes_none_as_text_but_no_other():
    from pref.registry import load_registry

    assert load_registry().create("objective", "ppo", {"target_kl": "none"}).kl.target is None
    with pytest.raises(PrefError, match="target_kl must be positive"):
        load_registry().create("objective", "ppo", {"target_kl": "abc"})


@pytest.mark.parametrize("args", [
    ["eval", "--reward", "noun-diversity", "--samples", "0"],  # was a report of 0 samples, valid_rate 0.0, exit 0
    ["eval", "--reward", "noun-diversity", "--max-new-tokens", "0"],  # was a transformers traceback
    ["generate", "--prompt", "hi", "-n", "-1"],  # printed no answers, exit 0
    ["generate", "--prompt", "hi", "--temperature", "-1"],
    ["compare", "--before", "a", "--after", "b", "--prompt", "hi", "-n", "0"],
    ["compare", "--before", "a", "--after", "b", "--reward", "noun-diversity", "--max-new-tokens", "0"],
])
def test_sampling_counts_below_one_are_usage_errors(args):
    result = run(*args)
    assert result.exit_code == 2 and "is not in the range" in result.stderr


def test_curriculum_options_without_the_curriculum_are_an_error(prefs_file):
    # were silently ignored
    line = error_line(run("run", "--objective", "dpo", "--dataset", prefs_file, "--curriculum-option", "eta=1"))
    assert "curriculum options were given without --curriculum" in line


@pytest.mark.parametrize("args, message", [
    (["--objective", "dpo", "--reward-option", "min_zipf=3"], "objective 'dpo' trains on a dataset and uses no reward: drop --reward-option"),
    (["--objective", "d2po", "--reward", "repetition"], "objective 'd2po' brings its own reward, set by its options (-o KEY=VALUE): drop --reward"),
    (["--objective", "d2po", "--reward-option", "n=3"], "brings its own reward, set by its options (-o KEY=VALUE): drop --reward-option"),
    (["--objective", "divpo", "--selector-option", "rho=0.5"], "selector options were given without --selector: add --selector NAME, "
                                                                "or give the objective's own selector its options with -o KEY=VALUE"),
])
def test_options_of_a_plugin_the_run_does_not_use_are_an_error(prefs_file, args, message):
    # were silently ignored: an offline objective's reward options, D2PO's --reward, selector options without --selector
    line = error_line(run("run", "--dataset", prefs_file, *args))
    assert message in line


def test_a_config_files_option_tables_for_unused_plugins_are_an_error(tmp_path, prefs_file):
    (tmp_path / "run.toml").write_text(f'objective = "dpo"\ndataset = ["{prefs_file}"]\n[reward_options]\nmin_zipf = 3\n')
    assert "uses no reward: drop --reward-option" in error_line(run("run", "--config", str(tmp_path / "run.toml")))
    (tmp_path / "run.yaml").write_text(f"objective: dpo\ndataset: {prefs_file}\nembedder_options:\n  model: minilm\n")
    assert "embedder options were given without --embedder" in error_line(run("run", "--config", str(tmp_path / "run.yaml")))


def test_a_missing_validation_file_is_named_with_its_own_flag(prefs_file):
    line = error_line(run("run", "--objective", "dpo", "--dataset", prefs_file, "--validation-dataset", "held_out.jsonl"))
    assert line.startswith("Error: --validation-dataset held_out.jsonl: no such file")


@pytest.mark.parametrize("record", ['{"config": {"objec', "{}", "[]"])
def test_resuming_a_folder_whose_run_json_is_not_a_run_record_is_an_error(tmp_path, record):
    # each was a traceback (JSONDecodeError, KeyError, TypeError)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "run.json").write_text(record)
    line = error_line(run("run", "--resume", str(tmp_path / "old")))
    assert "run.json is not a pref run record" in line


def test_a_run_folder_given_as_a_model_points_at_its_final_model(tmp_path):
    from pref.models import load_tokenizer

    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "run.json").write_text("{}")
    with pytest.raises(PrefError, match="is a pref run folder, not a model: pass its model, .*final"):
        load_tokenizer(str(tmp_path / "run"))  # was "Couldn't instantiate the backend tokenizer from one of:"


def test_a_model_that_is_neither_a_folder_nor_on_the_hub_names_a_fix_every_command_has():
    # the message is shared by run, eval, generate and compare (--before/--after): no "--model" in the fix
    from pref.models import _load_error

    message = str(_load_error("nope/final", "nope/final", OSError("404")))
    assert "no such local folder" in message and "--model" not in message and "pref-default for the embedded default model" in message


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "holds no model (no config.json): pass a folder holding a saved model"),
    (lambda p: p.write_text("{}"), "is a file, not a model: pass a folder holding a saved model"),
    (lambda p: (p.mkdir(), (p / "state.json").write_text("{}"), (p / "model.safetensors").write_bytes(b"")),
     "is a checkpoint of a pref run (for `pref run --resume`), not a model: pass the run's final/"),
])
def test_a_folder_or_file_that_is_no_model_says_what_it_is(tmp_path, make, message):
    # each was "Couldn't instantiate the backend tokenizer from one of:" or "no such local folder"
    make(tmp_path / "thing")
    line = error_line(run("generate", "--model", str(tmp_path / "thing"), "--prompt", "hi"))
    assert message in line


def test_an_adapter_whose_base_model_is_gone_names_the_base_and_the_file_to_edit(tmp_path):
    from pref.models import load_model

    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(tmp_path / "moved-base")}))
    with pytest.raises(PrefError, match=r"its base model .*moved-base is not there; put that model back, or write where it is now "
                                        r"into base_model_name_or_path in .*adapter_config.json"):
        load_model(str(tmp_path / "final"))  # was "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"
    (tmp_path / "final" / "adapter_config.json").write_text("{")
    with pytest.raises(PrefError, match="adapter_config.json is damaged"):
        load_model(str(tmp_path / "final"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["eval", "--reward", "noun-diversity"],
                                     ["compare", "--before", "pref-default", "--after", "pref-default", "--prompt", "hi"]])
def test_sampling_commands_on_a_gpu_that_is_not_there(command, monkeypatch):
    def refuse(*args, **kwargs):  # compare once built the default model (30 s) before it looked at --device
        raise AssertionError("a tokenizer was loaded before the error was found")

    monkeypatch.setattr("pref.models.load_tokenizer", refuse)
    line = error_line(run(*command, "--device", "cuda"))
    assert line == "Error: --device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto"



def test_compare_finds_a_wrong_after_before_it_samples_the_before_model(tiny_model_dir, tmp_path):
    # the no_model fixture fails the test if --before's model loads first
    line = error_line(run("compare", "--before", tiny_model_dir, "--after", str(tmp_path / "typo"), "--reward", "noun-diversity"))
    assert "typo" in line
