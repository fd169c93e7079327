"""End-to-end offline DPO runs, resume equivalence, and atomic checkpoints."""

import itertools
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import pref.checkpoint as checkpoint
from pref.config import build_config
from pref.errors import PrefError
from pref.run_folder import resume_checkpoint
from pref.registry import load_registry
from pref.train import train


def run(tmp_path, model, dataset, name="run", **flags):
    config = build_config(flags={"objective": "dpo", "model": model, "dataset": [dataset], "output_dir": str(tmp_path / name), "batch_size": 2,
                                 "steps": 4, "lr": 1e-3, "device": "cpu", **flags})
    return train(config, load_registry())


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def test_dpo_run_writes_a_loadable_model_metrics_and_record(tmp_path, tiny_model_dir, prefs_file):
    out = run(tmp_path, tiny_model_dir, prefs_file)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"))
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), start.state_dict().values()))
    assert changed, "training did not change the weights"
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert {"loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "grad_norm", "lr"} <= set(lines[0])
    record = json.load(open(os.path.join(out, "run.json")))
    assert record["config"]["objective"] == "dpo" and record["config"]["steps"] == 4
    assert "torch" in record["versions"] and "transformers" in record["versions"]
    assert any(p["name"] == "dpo" and p["package"] == "pref" for p in record["plugins"])


def test_a_batch_larger_than_the_dataset_holds_every_row_once_and_a_run_is_not_overwritten(tmp_path, tiny_model_dir, prefs_file, monkeypatch, caplog):
    import pref.data
    from pref.data import rows_per_batch

    drawn, collate = [], pref.data.collate
    monkeypatch.setattr(pref.data, "collate", lambda policy, examples: drawn.append([e.prompt for e in examples]) or collate(policy, examples))
    with caplog.at_level("INFO", logger="pref"):
        run(tmp_path, tiny_model_dir, prefs_file, steps=1, grad_accum=2, batch_size=8)  # 6 rows: a pair came twice in a batch of 8
    assert [len(prompts) for prompts in drawn] == [6, 6] and all(len(set(prompts)) == 6 for prompts in drawn)
    assert "the dataset's 6 training rows are fewer than --batch-size 8: a batch holds 6, each row once" in caplog.text
    assert (rows_per_batch(6, 8, 2), rows_per_batch(20, 8, 2)) == (3, 8)
    with pytest.raises(PrefError, match="the dataset has 1 training rows for 2 processes: each needs one"):
        rows_per_batch(1, 8, 2)
    # the same folder again (one launch serves both checks: the suite's time is short)
    with pytest.raises(PrefError, match="already holds a run"):
        run(tmp_path, tiny_model_dir, prefs_file, steps=1)


def test_reference_cache_is_reused(tmp_path, tiny_model_dir, prefs_file, private_cache):
    run(tmp_path, tiny_model_dir, prefs_file, name="a", steps=1, reference="cached")
    files = sorted(os.listdir(private_cache / "reference"))
    run(tmp_path, tiny_model_dir, prefs_file, name="b", steps=1, reference="cached")
    assert sorted(os.listdir(private_cache / "reference")) == files


def test_cached_and_model_reference_train_the_same(tmp_path, tiny_model_dir, prefs_file, monkeypatch):
    import contextlib

    from pref import reference

    monkeypatch.setenv("PREF_CACHE", str(tmp_path / "cache"))  # no cache another test made
    shown = []  # (rows, rows done) of each precompute's progress bar

    @contextlib.contextmanager
    def progress(rows):
        shown.append([rows, 0])
        yield lambda n: shown[-1].__setitem__(1, shown[-1][1] + n)

    monkeypatch.setattr(reference, "precompute_progress", progress)
    a = run(tmp_path, tiny_model_dir, prefs_file, name="cached", reference="cached")
    assert len(shown) == 1 and shown[0][0] == shown[0][1] > 0  # the precompute said how far it was, to the end
    run(tmp_path, tiny_model_dir, prefs_file, name="cached-again", reference="cached")
    assert len(shown) == 1  # found in the cache: nothing to compute, no bar
    b = run(tmp_path, tiny_model_dir, prefs_file, name="model", reference="model")
    for key, value in weights(os.path.join(a, "final")).items():
        torch.testing.assert_close(value, weights(os.path.join(b, "final"))[key], atol=1e-5, rtol=1e-4)



def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, tiny_model_dir, prefs_file, monkeypatch, interrupted_after):
    whole = run(tmp_path, tiny_model_dir, prefs_file, name="whole", steps=6, save_every=2)

    with interrupted_after(3):
        run(tmp_path, tiny_model_dir, prefs_file, name="broken", steps=6, save_every=2)
    broken = str(tmp_path / "broken")
    assert [os.path.basename(c) for c in checkpoint.list_checkpoints(broken)] == ["checkpoint-000002"]

    config = build_config(flags={"objective": "dpo", "model": tiny_model_dir, "dataset": [prefs_file], "output_dir": broken, "batch_size": 2,
                                 "steps": 6, "lr": 1e-3, "device": "cpu", "save_every": 2, "resume": broken})
    train(config, load_registry())
    expected, got = weights(os.path.join(whole, "final")), weights(os.path.join(broken, "final"))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    lines = [[json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))] for run in (whole, broken)]
    assert [line["step"] for line in lines[1]] == [1, 2, 3, 4, 5, 6]  # step 3's line from before the crash was cut when resuming from step 2
    # TRL's num_tokens counts the tokens trained on since the run began, across the resume
    tokens = [[line["num_tokens"] for line in run_lines] for run_lines in lines]
    assert tokens[0] == tokens[1] and all(a < b for a, b in itertools.pairwise(tokens[0]))


def test_resume_with_another_seed_is_refused(tmp_path, tiny_model_dir, prefs_file):
    out = run(tmp_path, tiny_model_dir, prefs_file, steps=3, save_every=2)
    config = build_config(flags={"objective": "dpo", "model": tiny_model_dir, "dataset": [prefs_file], "output_dir": out, "batch_size": 2,
                                 "steps": 3, "device": "cpu", "seed": 7, "resume": out})
    with pytest.raises(PrefError, match="seed 0"):
        train(config, load_registry())


def test_resume_with_another_number_of_processes_is_refused(tmp_path, tiny_model_dir, prefs_file):
    out = run(tmp_path, tiny_model_dir, prefs_file, steps=3, save_every=2)
    state_file = os.path.join(out, "checkpoint-000002", checkpoint.STATE_FILE)
    state = json.load(open(state_file))
    json.dump({**state, "world": 2}, open(state_file, "w"))  # as if two processes had trained it
    config = build_config(flags={"objective": "dpo", "model": tiny_model_dir, "dataset": [prefs_file], "output_dir": out, "batch_size": 2,
                                 "steps": 3, "device": "cpu", "resume": out})
    with pytest.raises(PrefError, match="trained by 2 processes, not 1; resume it with 2") as error:
        train(config, load_registry())
    assert "\n" not in str(error.value)


def test_checkpoints_are_atomic_and_only_the_last_k_are_kept(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    rng = [checkpoint.rng_state()]
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(str(tmp_path), step, checkpoint.Trained(model, optimizer, scheduler), {"seed": 0}, rng, keep=2)
    assert [os.path.basename(c) for c in checkpoint.list_checkpoints(str(tmp_path))] == ["checkpoint-000002", "checkpoint-000003"]

    # a crash while writing step 4 leaves no checkpoint-000004 and the older ones intact
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if str(path).endswith(checkpoint.SCHEDULER_FILE):
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(str(tmp_path), 4, checkpoint.Trained(model, optimizer, scheduler), {"seed": 0}, rng, keep=2)
    found = checkpoint.list_checkpoints(str(tmp_path))
    assert [os.path.basename(c) for c in found] == ["checkpoint-000002", "checkpoint-000003"]
    assert resume_checkpoint(str(tmp_path)) == found[-1]
    state = json.load(open(os.path.join(found[-1], checkpoint.STATE_FILE)))
    assert state["step"] == 3


def test_processes_that_report_different_figures_average_each_over_those_that_report_it():
    # KTO's rewards/chosen is missing on a process whose batch holds no desirable answer:
    # a reduction over unequal tensors made two-process runs wait forever
    from test_group_processes import in_two_processes  # tests/ is on sys.path

    from pref.train import combine_across_processes

    figures = [{"loss": 1.0, "rewards/chosen": 0.5, "completions/max_length": 5.0, "clip_ratio/low_min": 0.25},
               {"loss": 3.0, "rewards/rejected": -1.0, "completions/max_length": 6.0, "clip_ratio/low_min": 0.0}]
    combined = in_two_processes(lambda processes: combine_across_processes(processes, figures[processes.rank]))
    # a maximum is the largest over the processes (it was averaged to 5.5), a minimum the smallest
    assert combined[0] == combined[1] == {"loss": 2.0, "rewards/chosen": 0.5, "completions/max_length": 6.0, "clip_ratio/low_min": 0.0,
                                          "rewards/rejected": -1.0}


def test_micro_batches_that_report_different_figures_average_each_over_those_that_report_it():
    # with --grad-accum 2, a KTO micro-batch without a desirable answer has no rewards/chosen: it must not halve it
    from pref.train import combine_reports

    reports = [{"loss": 1.0, "rewards/chosen": 0.5}, {"loss": 3.0, "rewards/rejected": -1.0}, {"loss": 2.0, "rewards/chosen": 1.5}]
    assert combine_reports(reports) == {"loss": 2.0, "rewards/chosen": 1.0, "rewards/rejected": -1.0}


def test_maxima_and_minima_are_combined_as_such_and_other_figures_averaged():
    # rloo --grad-accum 2 logged completions/max_length 5.5 for micro-batches whose longest answers had 5 and 6 tokens
    from pref.train import combine_reports

    reports = [{"reward/max": 1.0, "max_reward": 0.5, "min_reward": -2.0, "similarity/min": 0.25, "completions/max_length": 5.0,
                "clip_ratio/high_max": 0.0, "maximum_weight": 1.0, "admin": 1.0},
               {"reward/max": 0.0, "max_reward": 1.5, "min_reward": -1.0, "similarity/min": 0.75, "completions/max_length": 6.0,
                "clip_ratio/high_max": 0.5, "maximum_weight": 3.0, "admin": 3.0}]
    assert combine_reports(reports) == {"reward/max": 1.0, "max_reward": 1.5, "min_reward": -2.0, "similarity/min": 0.25,
                                        "completions/max_length": 6.0, "clip_ratio/high_max": 0.5, "maximum_weight": 2.0, "admin": 2.0}


def test_processes_share_the_reference_precompute(tmp_path, tiny_model_dir, prefs_file):
    """Each of two processes computes every other forward of the cached reference; together they give one process's table."""
    from pref.data import collate, sequences_of
    from pref.examples import PreferenceExample
    from pref.interfaces import Processes
    from pref.policy import HFPolicy
    from pref.reference import CachedReference

    class OneOfTwo(Processes):  # process `rank` of two, seen alone: the other's share of the gather is left out
        world = 2

        def __init__(self, rank):
            self.rank = rank

        def gather(self, items):
            return [False, False] if isinstance(items[0], bool) else list(items)

    policy = HFPolicy.load(tiny_model_dir)
    examples = [PreferenceExample(**json.loads(line)) for line in open(prefs_file)]
    rows = [rows for start in range(0, len(examples), 2) for rows in sequences_of(collate(policy, examples[start : start + 2]))]
    whole = CachedReference.build(policy.model, "tiny", rows, str(tmp_path / "one")).table
    parts = [CachedReference.build(policy.model, "tiny", rows, str(tmp_path / f"rank{rank}"), processes=OneOfTwo(rank)).table
             for rank in (0, 1)]
    assert parts[0] and parts[1] and not parts[0].keys() & parts[1].keys()
    assert {**parts[0], **parts[1]} == whole
    assert os.listdir(tmp_path / "rank0") and not (tmp_path / "rank1").exists()  # process 0 writes the file
