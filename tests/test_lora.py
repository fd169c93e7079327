"""LoRA runs through peft: adapters only, the base as reference, PEFT-format output, exact resume."""

import json
import logging
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

import pref.train as train_module
from pref.checkpoint import list_checkpoints
from pref.cli.main import cli
from pref.config import build_config
from pref.errors import PrefError
from pref.models import quiet_peft
from pref.plugins.lora import Lora
from pref.policy import HFPolicy
from pref.reference import AdaptersOffReference, FrozenReference
from pref.registry import load_registry
from pref.train import train

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "q_proj,v_proj"}


def run(tmp_path, model, dataset, name="run", objective="dpo", **flags):
    config = build_config(flags={"objective": objective, "model": model, "dataset": [dataset] if dataset else [], "output_dir": str(tmp_path / name),
                                 "batch_size": 2, "steps": 4, "lr": 1e-2, "device": "cpu", "lora": True, "lora_options": LORA, **flags})
    return train(config, load_registry())


def cli_ok(*args):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_lora_dpo_from_the_cli_writes_an_adapter_peft_loads_and_merged_weights(tmp_path, tiny_model_dir, prefs_file):
    out = str(tmp_path / "run")
    cli_ok("run", "--objective", "dpo", "--model", tiny_model_dir, "--dataset", prefs_file, "--steps", "3", "--batch-size", "2", "--lr", "1e-2",
           "--device", "cpu", "--output-dir", out, "--lora", "--lora-option", "r=4", "--lora-option", "target_modules=q_proj,v_proj", "--merge-lora")
    final = os.path.join(out, "final")
    assert os.path.exists(os.path.join(final, "adapter_config.json")) and not os.path.exists(os.path.join(final, "model.safetensors"))
    from peft import AutoPeftModelForCausalLM

    adapted = AutoPeftModelForCausalLM.from_pretrained(final).eval()
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(final, "merged")).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-4), "training did not move the adapters"
    # pref's own commands take the adapter folder as a model
    result = cli_ok("generate", "--model", final, "--prompt", "Name a fruit.", "--max-new-tokens", "3")
    assert result.output.startswith("> Name a fruit.")


def test_lora_divpo_from_the_cli_trains(tmp_path, tiny_model_dir):
    out = str(tmp_path / "divpo")
    cli_ok("run", "--objective", "divpo", "--model", tiny_model_dir, "--reward", "noun-diversity", "--steps", "2", "--batch-size", "2",
           "-k", "4", "--device", "cpu", "--output-dir", out, "--lora", "--lora-option", "r=4")
    adapter = load_file(os.path.join(out, "final", "adapter_model.safetensors"))
    assert adapter and all("lora_" in key for key in adapter)
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == [1, 2]


def test_the_reference_is_the_base_model_with_adapters_off(tiny_model_dir):
    policy = HFPolicy.load(tiny_model_dir)
    base = FrozenReference.copy_of(policy.model)
    adapter = Lora(**LORA)
    with quiet_peft():
        model = adapter.wrap(policy.model, "causal-lm")
    with torch.no_grad():  # adapters that already changed the model
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    policy.model = model
    seqs = policy.encode(["Name a fruit.", "Say something kind."], ["apple", "you are a good friend ."])
    reference = AdaptersOffReference(model, adapter)
    torch.testing.assert_close(reference.logps(seqs).sequence, base.logps(seqs).sequence, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert not torch.allclose(policy.logps(seqs).sequence, base.logps(seqs).sequence, atol=1e-3)
    # no second copy of the weights: the reference shares the policy's parameters
    assert reference.model is model


def test_lora_checkpoints_hold_only_adapters_and_resume_exactly(tmp_path, tiny_model_dir, prefs_file, monkeypatch, interrupted_after):
    whole = run(tmp_path, tiny_model_dir, prefs_file, name="whole", steps=6, save_every=2)

    with interrupted_after(3):
        run(tmp_path, tiny_model_dir, prefs_file, name="broken", steps=6, save_every=2)
    broken = str(tmp_path / "broken")
    saved = load_file(os.path.join(list_checkpoints(broken)[-1], "model.safetensors"))
    assert saved and all("lora_" in key for key in saved)
    run(tmp_path, tiny_model_dir, prefs_file, name="broken", steps=6, save_every=2, resume=broken)
    expected = load_file(os.path.join(whole, "final", "adapter_model.safetensors"))
    got = load_file(os.path.join(broken, "final", "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_resuming_a_lora_run_without_lora_is_refused(tmp_path, tiny_model_dir, prefs_file):
    out = run(tmp_path, tiny_model_dir, prefs_file, steps=3, save_every=2)
    config = build_config(flags={"objective": "dpo", "model": tiny_model_dir, "dataset": [prefs_file], "output_dir": out, "batch_size": 2,
                                 "steps": 3, "device": "cpu", "resume": out})
    with pytest.raises(PrefError, match='with adapter none: it was trained with adapter "lora", which a resume cannot change'):
        train(config, load_registry())


def test_a_moving_reference_is_refused_with_lora_before_training(tmp_path, tiny_model_dir, prefs_file):
    # the reference is the base with the adapters off: TR-DPO has nothing to move
    with pytest.raises(PrefError, match="drop --lora"):
        run(tmp_path, tiny_model_dir, prefs_file, reference="model", objective_options={"sync_ref_model": True, "ref_model_sync_steps": 1})
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


class LoadReports(logging.Handler):
    """The load reports transformers logs ("... LOAD REPORT ... score.weight | MISSING"), as they reach its handlers."""

    def __enter__(self):
        self.reports = []
        logging.getLogger("transformers.modeling_utils").addHandler(self)
        return self.reports

    def __exit__(self, *exc):
        logging.getLogger("transformers.modeling_utils").removeHandler(self)

    def emit(self, record):
        if "LOAD REPORT" in record.getMessage():
            self.reports.append(record.getMessage())


def test_reward_model_lora_trains_adapters_and_the_score_head(tmp_path, tiny_model_dir):
    rows = [{"prompt": "Name a fruit.", "chosen": "apple", "rejected": "chair"},
            {"prompt": "Say something kind.", "chosen": "you are a good friend .", "rejected": "go away ."}] * 2
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = run(tmp_path, tiny_model_dir, str(data), objective="reward-model", steps=2, merge_lora=True)
    adapter = load_file(os.path.join(out, "final", "adapter_model.safetensors"))
    assert any("lora_" in key for key in adapter) and any("score" in key for key in adapter)
    config = json.load(open(os.path.join(out, "final", "adapter_config.json")))
    assert config["task_type"] == "SEQ_CLS"
    # the adapter folder scores as the README says: --reward reward-model --reward-option model=PATH
    with LoadReports() as reports:  # the base model's new score head is replaced by the adapter's: transformers' notice would mislead
        reward = load_registry().create("reward", "reward-model", {"model": os.path.join(out, "final"), "device": "cpu"})
    assert reports == []
    merged = load_registry().create("reward", "reward-model", {"model": os.path.join(out, "final", "merged"), "device": "cpu"})
    prompts, answers = ["Name a fruit.", "Say something kind."], ["apple", "go away ."]
    assert_close(reward.score(prompts, answers)["reward"], merged.score(prompts, answers)["reward"], atol=1e-5, rtol=0)
    with LoadReports() as reports:  # only that load is quiet: a head that is really new is still reported
        HFPolicy.load(tiny_model_dir, kind="sequence-classifier")
    assert len(reports) == 1 and "score.weight" in reports[0] and "MISSING" in reports[0]
    score = next(v for k, v in adapter.items() if "score" in k)
    loaded = [p for name, p in reward.scorer.model.named_parameters() if "score" in name]
    assert any(p.shape == score.shape and torch.equal(p, score) for p in loaded), "the trained score head was not loaded"


@pytest.mark.parametrize("flags, message", [
    (["--lora-option", "r=0", "--lora"], "r must be a positive"),
    (["--lora-option", "rank=4", "--lora"], "unknown option for adapter 'lora': 'rank'"),
    (["--lora-option", "dropout=1.5", "--lora"], "dropout must be"),
    (["--lora-option", "r=4"], "without --lora"),
    (["--merge-lora"], "--merge-lora needs --lora"),
    (["--adapter", "lorra"], "unknown adapter 'lorra': did you mean 'lora'?"),
    (["--adapter-option", "r=4"], "without --lora or --adapter NAME"),
    (["--lora", "--adapter", "ia3"], "--lora is --adapter lora"),
])
def test_bad_lora_settings_are_one_line_errors(prefs_file, flags, message):
    result = CliRunner().invoke(cli, ["run", "--objective", "dpo", "--dataset", prefs_file, *flags])
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


def test_a_lora_table_in_a_config_file_turns_lora_on(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('objective = "dpo"\n[lora]\nr = 8\ntarget_modules = ["q_proj", "v_proj"]\n')
    from pref.config import read_config_file

    config = build_config(read_config_file(str(path)))
    assert config.adapter == "lora" and config.adapter_options == {"r": 8, "target_modules": ["q_proj", "v_proj"]}


def test_lora_flags_and_keys_are_the_adapter_lora(monkeypatch, prefs_file):
    """--lora is --adapter lora, its options the adapter's; an older run.json's `lora` keys (a resume) read the same."""
    seen = []
    monkeypatch.setattr(train_module, "train", lambda config, registry: seen.append(config) or "out")
    for flags in (["--lora", "--lora-option", "r=4"], ["--adapter", "lora", "--adapter-option", "r=4"]):
        cli_ok("run", "--objective", "dpo", "--dataset", prefs_file, *flags)
    assert [(c.adapter, c.adapter_options) for c in seen] == [("lora", {"r": 4})] * 2
    old_record = {"lora": True, "lora_options": {"r": 4}, "merge_lora": True}
    assert (build_config(old_record).adapter, build_config(old_record).adapter_options) == ("lora", {"r": 4})
    assert build_config({"lora": False, "lora_options": {}}).adapter is None
    assert build_config({"adapter": "lora"}, {"lora": False}).adapter is None  # --no-lora turns it off


@pytest.mark.parametrize("kind", ["causal-lm", "sequence-classifier"])
def test_a_merge_from_weights_gathered_whole_is_the_merge_of_the_model(tmp_path, tiny_model_dir, kind):
    # a sharded run (--fsdp) has only its state dict gathered whole: the merge is of a copy built from it on the meta device
    from safetensors.torch import load_file

    policy = HFPolicy.load(tiny_model_dir, kind=kind)
    with quiet_peft():
        model = Lora(**LORA).wrap(policy.model, kind)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name or "score" in name:
            param.data.normal_()
    gathered = {key: value.clone() for key, value in model.state_dict().items()}
    Lora(**LORA).save_merged(model, policy.tokenizer, str(tmp_path / "model"))
    Lora(**LORA).save_merged(model, policy.tokenizer, str(tmp_path / "gathered"), weights=gathered)
    from_model, from_gathered = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("model", "gathered"))
    assert from_gathered.keys() == from_model.keys() and not any("lora" in key for key in from_model)
    for key in from_model:
        assert torch.equal(from_gathered[key], from_model[key]), key
    assert any("lora_A" in key for key in model.state_dict())  # the model keeps its adapter


@pytest.mark.parametrize("objective, kept", [("dpo", False), ("kto", False), ("grpo", True)])
def test_dropout_is_off_for_the_preference_objectives_and_kept_for_grpo_as_in_trl(tmp_path, tiny_model_dir, prefs_file, objective, kept):
    """TRL's DPO and KTO trainers turn every dropout off (disable_dropout, an adapter's too); its GRPO keeps it."""
    from pref.train import train_policy

    flags = {"reward": ["noun-diversity"], "samples_per_prompt": 2, "max_new_tokens": 4} if objective == "grpo" else {"dataset": [prefs_file]}
    config = build_config(flags={"objective": objective, "model": tiny_model_dir, "output_dir": str(tmp_path / "run"), "batch_size": 2,
                                 "steps": 1, "device": "cpu", "lora": True, "lora_options": {**LORA, "dropout": 0.2}, **flags})
    _, policy = train_policy(config, load_registry())
    dropouts = [m.p for m in policy.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(p == (0.2 if kept else 0.0) for p in dropouts)  # LoRA's, on q_proj and v_proj of each layer
