"""Checkpoints load without unpickling arbitrary objects: a tampered file is refused, naming it, and runs no code."""

import os

import pytest
import torch
from click.testing import CliRunner

from pref import checkpoint
from pref.cli.main import cli
from pref.errors import PrefError


class Payload:
    """Unpickling this creates `marker`: the proof that a load ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def saved(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    trained = checkpoint.Trained(model, optimizer, scheduler)
    path = checkpoint.save_checkpoint(str(tmp_path / "run"), 1, trained, {"seed": 0}, [checkpoint.rng_state()], [{"kl_coef": 0.1}])
    return path, trained


def test_a_checkpoint_round_trips_with_weights_only(tmp_path):
    import random

    import numpy as np

    path, trained = saved(tmp_path)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    state, objective_state = checkpoint.load_checkpoint(path, trained)  # restores the saved random state
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert state == {"seed": 0, "step": 1} and objective_state == {"kl_coef": 0.1}


@pytest.mark.parametrize("name", [checkpoint.EXTRA_FILE, checkpoint.OPTIMIZER_FILE, checkpoint.SCHEDULER_FILE, "rng-0.pt"])
def test_a_pickle_payload_is_refused_and_never_runs(tmp_path, name):
    path, trained = saved(tmp_path)
    marker = tmp_path / "payload-ran"
    torch.save({"objective": Payload(marker)}, os.path.join(path, name))
    with pytest.raises(PrefError) as error:
        checkpoint.load_checkpoint(path, trained)
    assert str(error.value).startswith(f"cannot load checkpoint file {os.path.join(path, name)} safely "
                                       "(it holds Python objects other than tensors and plain data)")
    assert not marker.exists()


def test_damaged_model_or_state_files_are_named(tmp_path):
    path, trained = saved(tmp_path)
    with open(os.path.join(path, checkpoint.MODEL_FILE), "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(PrefError, match=f"^cannot load checkpoint file {os.path.join(path, checkpoint.MODEL_FILE)} safely"):
        checkpoint.load_checkpoint(path, trained)
    path, trained = saved(tmp_path / "again")
    open(os.path.join(path, checkpoint.STATE_FILE), "w").write("{not json")
    with pytest.raises(PrefError, match=f"^cannot load checkpoint file {os.path.join(path, checkpoint.STATE_FILE)} safely"):
        checkpoint.load_checkpoint(path, trained)


def test_resuming_a_run_with_a_tampered_checkpoint_is_a_one_line_error(tmp_path, tiny_model_dir, prefs_file):
    out = tmp_path / "run"
    args = ["run", "--objective", "dpo", "--dataset", prefs_file, "--model", tiny_model_dir, "--steps", "3", "--save-every", "2",
            "--batch-size", "2", "--device", "cpu", "--output-dir", str(out)]
    assert CliRunner().invoke(cli, args).exit_code == 0
    marker = tmp_path / "payload-ran"
    torch.save(Payload(marker), out / "checkpoint-000002" / checkpoint.EXTRA_FILE)
    result = CliRunner().invoke(cli, ["run", "--resume", str(out), "--steps", "4"])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1].startswith(f"Error: cannot load checkpoint file {out / 'checkpoint-000002' / 'extra.pt'} safely")
    assert "Traceback" not in result.output and not marker.exists()
