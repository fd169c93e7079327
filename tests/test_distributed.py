"""Two CPU processes under `accelerate launch` train as one job.

`distributed_train.py` runs a short DPO job in each process and reports the
weights it ends with and the rows it trained on.
"""

import itertools
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from distributed_train import BATCH_SIZE, SAVE_EVERY, STEPS, weights_hash  # tests/ is on sys.path
from pref.plugins.length_buckets import DEFAULT_WINDOW, LengthBucketedBatches, example_length
from pref.examples import PreferenceExample
from pref.plugins.preference_data import load_preferences

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_train.py")
D2PO_SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_d2po.py")
EARLY_STOP_SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_early_stop.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], cache: str, home: str, script: str = SCRIPT) -> subprocess.CompletedProcess:
    """`accelerate launch` two CPU processes of `script ARGS` (`distributed_train.py`), no config file needed."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        script, *args,
    ]
    # a fresh HF_HOME: no accelerate config file of the user's is read
    env = {**os.environ, "PREF_CACHE": cache, "HF_HOME": home, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_train_as_one_job(tiny_model_dir, prefs_file, private_cache, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # "auto" on a machine without a GPU must still join the two processes into one job
    device = "cpu" if torch.cuda.is_available() or torch.backends.mps.is_available() else "auto"
    run_dir, report_dir = tmp_path / "run", tmp_path / "report"
    args = [tiny_model_dir, prefs_file, device, str(run_dir), str(report_dir)]
    done = launch(args, str(private_cache), str(tmp_path / "hf-home"))
    assert done.returncode == 0, done.stderr[-4000:]

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
    examples = load_preferences(prefs_file)
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
def test_d2po_trains_its_discriminator_in_two_processes(tiny_model_dir, private_cache, tmp_path):
    """The loop trains D2PO's discriminator: both processes end with the same policy and discriminator,
    trained on the gold pairs of both, and the checkpoint keeps the discriminator and its optimizer."""
    from transformers import AutoModelForSequenceClassification

    device = "cpu" if torch.cuda.is_available() or torch.backends.mps.is_available() else "auto"
    run_dir, report_dir = tmp_path / "run", tmp_path / "report"
    done = launch([tiny_model_dir, device, str(run_dir), str(report_dir)], str(private_cache), str(tmp_path / "hf-home"), D2PO_SCRIPT)
    assert done.returncode == 0, done.stderr[-4000:]

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
def test_a_run_that_stops_early_is_evaluated_by_both_processes(tiny_model_dir, private_cache, tmp_path):
    """Both processes evaluate the model the run ends with, together: best/ holds it, and step 1 gets its figures."""
    from transformers import AutoModelForCausalLM

    device = "cpu" if torch.cuda.is_available() or torch.backends.mps.is_available() else "auto"
    held, run_dir, report_dir = tmp_path / "held.txt", tmp_path / "run", tmp_path / "report"
    held.write_text("the sky is blue and the sea is green .\n")
    done = launch([tiny_model_dir, str(held), device, str(run_dir), str(report_dir)], str(private_cache), str(tmp_path / "hf-home"),
                  EARLY_STOP_SCRIPT)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Stopped after step 1 of 3" in done.stderr

    hashes = {(report_dir / f"weights-rank{rank}.txt").read_text() for rank in (0, 1)}
    assert hashes == {weights_hash(AutoModelForCausalLM.from_pretrained(run_dir / folder)) for folder in ("final", "best")}
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], "validation/loss" in line) for line in lines] == [(1, False), (1, True)]
    assert json.loads((run_dir / "best.json").read_text())["step"] == 1
    assert [json.loads(line)["step"] for line in (run_dir / "generations.jsonl").read_text().splitlines()] == [1]
