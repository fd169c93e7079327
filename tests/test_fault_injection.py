"""Faults injected on purpose: SIGKILL at seeded moments of setup, training, checkpoint and final writes, then go on.

Each algorithm's run is killed once or twice (the second time while resuming),
at a seeded call of the phases it is given (together they cover all four), then
finished by resuming (or, when it died before writing run.json, by running
the same command again, as a user would). Its final weights must equal an
uninterrupted run's bit for bit, and its metrics must hold each step once.
Two runs started at once on one folder must not both write into it.
Every run is a process of its own, forked from one that has only imported pref and its libraries
(tests/warm_python.py): the imports, most of a tiny run's time, are paid once for the module.
"""

import json
import os
import random
from importlib.metadata import entry_points

import pytest
import torch
from safetensors.torch import load_file

from warm_python import WarmPython  # tests/ is on sys.path

pytestmark = pytest.mark.slow

# `python driver.py POINT N pref-args...`: run `pref` and SIGKILL it at the Nth call of POINT
DRIVER = r'''
import os, signal, sys
point, occurrence, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
import pref.checkpoint, pref.train
from pref.plugins.loggers import ProgressBar
from pref.policy import HFPolicy
calls = 0

def arm(owner, name, after):
    original = getattr(owner, name)
    def wrapped(*a, **k):
        global calls
        calls += 1
        if calls == occurrence and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*a, **k)
        if calls == occurrence and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(owner, name, wrapped)

points = {
    "setup": (HFPolicy, "load_model", False),                    # while the model loads
    "training": (ProgressBar, "show", True),                     # after a step
    "checkpoint": (pref.checkpoint.torch, "save", True),         # half way through writing a checkpoint
    "final": (HFPolicy, "save", True),                           # final/ written, not yet renamed into place
}
if point in points:
    arm(*points[point])
from pref.cli.main import cli
cli(["run", *args], prog_name="pref")
'''

LIMITS = {"setup": 1, "training": 5, "checkpoint": 8, "final": 1}  # the calls a run makes, about

ALGORITHMS = {
    "dpo": ["--objective", "dpo", "--dataset", "{prefs}", "--steps", "6", "--save-every", "2"],
    "divpo": ["--objective", "divpo", "--steps", "4", "--save-every", "1", "-k", "4"],
    "ppo": ["--objective", "ppo", "--reward", "repetition", "--steps", "6", "--save-every", "2", "-o", "ppo_epochs=2", "-k", "2"],
}


def pref_args(algorithm, out, model, prefs):
    args = [a.replace("{prefs}", prefs) for a in ALGORITHMS[algorithm]]
    return [*args, "--model", model, "--batch-size", "2", "--device", "cpu", "--threads", "1", "--output-dir", str(out)]


# what the runs import, imported once: the driver's modules, pref's plugins, the libraries the noun rewards import when they first score
PRELOAD = ["pref.cli.main", "pref.train", "pref.checkpoint", "pref.policy", "transformers.models.llama.modeling_llama",
           *sorted({entry.module for entry in entry_points(group="pref")}), "nltk.data", "wordfreq", "spacy.lang.en.stop_words"]


@pytest.fixture(scope="module")
def warm_python():
    """Where the runs start: each in a fresh process forked from one that has imported PRELOAD (see warm_python.py),
    so each kill still ends a process of its own, and each run after it starts anew, without paying the imports again."""
    warm = WarmPython(PRELOAD, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    yield warm
    warm.close()


def launch(warm_python, driver, point, occurrence, args):
    """`python DRIVER POINT OCCURRENCE ARGS` started, its output going to a log beside the driver."""
    log = driver.with_name(f"run-{len(list(driver.parent.glob('run-*.log')))}.log")
    log.touch()  # named: the next launch takes the next name
    return warm_python.start(str(driver), [point, str(occurrence), *map(str, args)], str(log))


def finish(process):
    """The exit status (-9: killed) and the output of a run `launch` started."""
    return process.finish(timeout=300)


@pytest.mark.parametrize("algorithm, phases, seed", [("dpo", ["setup", "final"], 1), ("divpo", ["checkpoint"], 2), ("ppo", ["training"], 7)])
def test_killed_runs_resume_to_the_same_weights(warm_python, tmp_path, tiny_model_dir, prefs_file, algorithm, phases, seed):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    reference = launch(warm_python, driver, "none", 0, pref_args(algorithm, whole, tiny_model_dir, prefs_file))  # alongside the others

    rng = random.Random(seed)
    kills = [(phase, rng.randint(1, LIMITS[phase])) for phase in phases]
    for phase, occurrence in [*kills, ("none", 0)]:
        if (broken / "run.json").exists():
            args = ["--resume", str(broken)]
        else:  # died before the run was recorded: the same command again
            args = pref_args(algorithm, broken, tiny_model_dir, prefs_file)
        code, output = finish(launch(warm_python, driver, phase, occurrence, args))
        assert "Traceback" not in output, output
        assert code in ((0, -9) if phase != "none" else (0,)), (phase, occurrence, output)

    code, output = finish(reference)
    assert code == 0, output
    expected = load_file(os.path.join(whole, "final", "model.safetensors"))
    got = load_file(os.path.join(broken, "final", "model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), (kills, key)
    steps = [json.loads(line)["step"] for line in open(broken / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] == int(ALGORITHMS[algorithm][ALGORITHMS[algorithm].index("--steps") + 1])
    assert not [p.name for p in broken.iterdir() if p.name.startswith(".")], "no lock or temporary copy left behind"


def test_two_runs_started_together_on_one_folder(warm_python, tmp_path, tiny_model_dir, prefs_file):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "shared"
    runs = [launch(warm_python, driver, "none", 0, [*pref_args("dpo", out, tiny_model_dir, prefs_file), "--seed", str(seed)]) for seed in (11, 12)]
    results = [finish(run) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    [(winner, _)] = [(seed, output) for seed, (code, output) in zip((11, 12), results) if code == 0]
    [refusal] = [output for code, output in results if code == 2]
    assert "Traceback" not in refusal
    assert "is in use by another pref run (pid " in refusal or "already holds a run" in refusal, refusal
    assert json.load(open(out / "run.json"))["config"]["seed"] == winner  # the record is the run that wrote the folder
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
