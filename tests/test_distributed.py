"""Two CPU processes under `accelerate launch` train as one job.

One launch (a fixture shared by the tests) runs three short jobs in a row in the same two processes:
`distributed_train.py` (DPO), `distributed_d2po.py`, `distributed_early_stop.py` (online DPO that
stops early) and `distributed_stop.py` (the DPO run stopped by a signal, and resumed); each process reports
the weights it ends with, and what it trained on.
"""

import itertools
import json

import pytest
import torch

from distributed_runs import launch  # tests/ is on sys.path
from distributed_train import BATCH_SIZE, SAVE_EVERY, STEPS, weights_hash
from pref.plugins.length_buckets import DEFAULT_WINDOW, LengthBucketedBatches, example_length
from pref.examples import PreferenceExample
from pref.plugins.preference_data import load_preferences
from trained_alike import assert_trained_alike


@pytest.fixture(scope="module")
def jobs(tiny_model_dir, shared_prefs_file, private_cache, tmp_path_factory):
    """The folder of the three jobs' runs (JOB/run) and reports (JOB/report), the job names as keys, and the launch's stderr.

    Each launched process pays the imports of torch and transformers (~10 s on 2 cores) once for the three jobs.
    """
    root = tmp_path_factory.mktemp("distributed")
    # "auto" on a machine without a GPU must still join the two processes into one job (the first job's accelerator joins them)
    device = "cpu" if torch.cuda.is_available() or torch.backends.mps.is_available() else "auto"
    held = root / "held.txt"
    held.write_text("the sky is blue and the sea is green .\n")
    folders = {name: (root / name / "run", root / name / "report") for name in ("train", "d2po", "early_stop", "stop")}
    feedback = root / "feedback.jsonl"  # one row with feedback, one without: each step one process has teachers, the other none
    feedback.write_text(json.dumps({"prompt": "Name a fruit.", "privileged_context": "Name a red one."}) + "\n"
                        + json.dumps({"prompt": "Name an animal.", "privileged_context": ""}) + "\n")
    sft_data = root / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"prompt": f"Say something {i}.", "completion": answer}) + "\n" for i, answer in enumerate(SFT_ANSWERS)))
    plan = [
        {"main": "distributed_train", "args": [tiny_model_dir, shared_prefs_file, device, *map(str, folders["train"])]},
        {"main": "distributed_d2po", "args": [tiny_model_dir, device, *map(str, folders["d2po"])]},
        {"main": "distributed_early_stop", "args": [tiny_model_dir, str(held), device, *map(str, folders["early_stop"])]},
        {"main": "distributed_stop", "args": [tiny_model_dir, shared_prefs_file, device, *map(str, folders["stop"])]},
        ["run", *sft_args(tiny_model_dir, sft_data), "--batch-size", "1", "--grad-accum", "2", "--output-dir", str(root / "sft")],
        ["run", "--objective", "sdpo", "--model", tiny_model_dir, "--dataset", str(feedback), "--reward", "noun-diversity", "--steps", "2",
         "--batch-size", "1", "-k", "2", "-o", "include_environment_feedback=true", "-o", "use_successful_as_teacher=false", "--seed", "3",
         "--device", "cpu", "--no-progress", "--output-dir", str(root / "sdpo")],
    ]
    done = launch(plan, private_cache, root)
    assert done.returncode == 0, done.stderr[-4000:]
    return {**folders, "sft": (root / "sft", sft_data), "sdpo": root / "sdpo", "stderr": done.stderr}


#: SFT answers of very different lengths: a mean over each process's tokens, averaged, would weigh a short answer's tokens more
SFT_ANSWERS = ["yes", "the sky is blue and the sea is green and the grass is green too .", "apple", "a dog , a cat , a bird and a fish ."] * 2


def sft_args(model, data) -> list[str]:
    return ["--objective", "sft", "--model", model, "--dataset", str(data), "--steps", "2", "--lr", "1e-2", "--bucket-window", "0",
            "--seed", "3", "--device", "cpu", "--no-progress"]


@pytest.mark.slow
def test_two_processes_train_as_one_job(jobs, tiny_model_dir, shared_prefs_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, report_dir = jobs["train"]

    # both processes hold the same trained weights, which final/ holds too, and training changed them
    hashes = [(report_dir / f"weights-rank{rank}.txt").read_text() for rank in (0, 1)]
    assert hashes[0] == hashes[1]
    assert weights_hash(AutoModelForCausalLM.from_pretrained(run_dir / "final")) == hashes[0]
    assert weights_hash(AutoModelForCausalLM.from_pretrained(tiny_model_dir)) != hashes[0]

    # each process trained on its own half of the global batch a one-process run would see
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def as_decoded(example: PreferenceExample) -> str:
        ids = tokenizer(example.chosen, add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    seen = [json.loads((report_dir / f"seen-rank{rank}.json").read_text()) for rank in (0, 1)]
    examples = load_preferences(shared_prefs_file)
    lengths = [example_length(tokenizer, e) for e in examples]  # offline batches are length-bucketed by default
    order = LengthBucketedBatches(examples, lengths, batch_size=2 * BATCH_SIZE, seed=0, window=DEFAULT_WINDOW)
    for step in range(STEPS):
        expected = [as_decoded(e) for e in order.next()]
        assert seen[0][step]["chosen"] == expected[:BATCH_SIZE]
        assert seen[1][step]["chosen"] == expected[BATCH_SIZE:]
    assert [s["chosen"] for s in seen[0]] != [s["chosen"] for s in seen[1]]

    # the logged metrics are the mean over the two processes
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    for step, line in enumerate(lines):
        assert line["loss"] == pytest.approx((seen[0][step]["loss"] + seen[1][step]["loss"]) / 2, rel=1e-5)
    # TRL's num_tokens: the tokens of both processes' batches, summed over the run
    assert [line["num_tokens"] for line in lines] == list(itertools.accumulate(a["tokens"] + b["tokens"] for a, b in zip(*seen)))

    # a checkpoint keeps the random state of every process
    checkpoint = run_dir / f"checkpoint-{SAVE_EVERY:06d}"
    state = json.loads((checkpoint / "state.json").read_text())
    assert (state["step"], state["world"]) == (SAVE_EVERY, 2)
    rngs = [torch.load(checkpoint / f"rng-{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert not torch.equal(rngs[0]["torch"], rngs[1]["torch"])  # seeded per process, so their own states


@pytest.mark.slow
def test_d2po_trains_its_discriminator_in_two_processes(jobs):
    """The loop trains D2PO's discriminator: both processes end with the same policy and discriminator,
    trained on the gold pairs of both, and the checkpoint keeps the discriminator and its optimizer."""
    from transformers import AutoModelForSequenceClassification

    run_dir, report_dir = jobs["d2po"]

    reports = [json.loads((report_dir / f"weights-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert reports[0]["policy"] == reports[1]["policy"]
    assert reports[0]["discriminator"] == reports[1]["discriminator"]
    # every process trains on the gold pairs both labelled
    assert reports[0]["gold_pairs"] == reports[1]["gold_pairs"] == reports[0]["own_gold_pairs"] + reports[1]["own_gold_pairs"] > 0
    saved = AutoModelForSequenceClassification.from_pretrained(run_dir / "discriminator")
    assert weights_hash(saved) == reports[0]["discriminator"]
    extra = torch.load(run_dir / "checkpoint-000002" / "extra.pt", weights_only=True)
    assert extra["second_model"] is not None and len(extra["objective"]) == 2  # each process's own objective state


@pytest.mark.slow
def test_a_run_that_stops_early_is_evaluated_by_both_processes(jobs):
    """Both processes evaluate the model the run ends with, together: best/ holds it, and step 1 gets its figures."""
    from transformers import AutoModelForCausalLM

    run_dir, report_dir = jobs["early_stop"]
    assert "Stopped after step 1 of 3" in jobs["stderr"]  # the only one of the three jobs that stops early

    hashes = {(report_dir / f"weights-rank{rank}.txt").read_text() for rank in (0, 1)}
    assert hashes == {weights_hash(AutoModelForCausalLM.from_pretrained(run_dir / folder)) for folder in ("final", "best")}
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], "validation/loss" in line) for line in lines] == [(1, False), (1, True)]
    assert json.loads((run_dir / "best.json").read_text())["step"] == 1
    assert [json.loads(line)["step"] for line in (run_dir / "generations.jsonl").read_text().splitlines()] == [1]


@pytest.mark.slow
def test_sft_in_two_processes_averages_over_every_token_of_the_step(jobs, tiny_model_dir, tmp_path):
    """2 processes x batch 1 x 2 micro-batches train as one process's batch of 4 (TRL's num_items_in_batch across processes)."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from pref.cli.main import cli

    run_dir, data = jobs["sft"]
    result = CliRunner().invoke(cli, ["run", *sft_args(tiny_model_dir, data), "--batch-size", "4", "--output-dir", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    # each step's gradient is the batch of 4's: its norm, at both steps, within float error
    norms = [[json.loads(line)["grad_norm"] for line in (folder / "metrics.jsonl").read_text().splitlines()] for folder in (run_dir, tmp_path / "one")]
    assert len(norms[0]) == 2 and norms[0] == pytest.approx(norms[1], rel=1e-5)
    two, one = load_file(run_dir / "final" / "model.safetensors"), load_file(tmp_path / "one" / "final" / "model.safetensors")
    assert_trained_alike(two, one, atol=1e-4)


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_after_the_same_step_and_the_run_goes_on_exactly(jobs):
    run_dir, report_dir = jobs["stop"]
    reports = [json.loads((report_dir / f"stop-rank{rank}.json").read_text()) for rank in (0, 1)]
    # process 1 alone was sent SIGTERM, during step 1: both stopped after it, with one checkpoint (--save-every is 2)
    for report in reports:
        assert report["message"] == f"stopped by SIGTERM after step 1 of {STEPS}, saved as checkpoint-000001; go on with: pref run --resume {run_dir}"
        assert report["exit_code"] == 143
    # resumed, the two processes end where the uninterrupted run ended
    uninterrupted = (jobs["train"][1] / "weights-rank0.txt").read_text()
    assert reports[0]["weights"] == reports[1]["weights"] == uninterrupted


def test_sdpo_trains_in_two_processes_where_only_one_has_a_teacher(jobs):
    """At each step one process's samples have a teacher (their row's feedback) and the other's none: the second's loss is a zero
    joined to the whole model's graph, so DDP's gradient averaging runs on both, and the run ends (the shares are the mean of both)."""
    lines = [json.loads(line) for line in (jobs["sdpo"] / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(line["self_distillation/feedback_used_fraction"] == 0.5 and line["self_distillation/reprompt_sample_fraction"] == 0.5
               for line in lines)
    assert all(line["self_distillation/distillation_loss"] != 0 for line in lines)  # the taught process's term, averaged
    assert (jobs["sdpo"] / "final" / "model.safetensors").exists()
