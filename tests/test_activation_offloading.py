"""--activation-offloading: what a forward saves for its backward waits in CPU memory (TRL's activation_offloading).

On the CPU nothing moves, so these tests let CPU tensors be "offloaded" (copied to fresh CPU memory, and back), through the
same hooks a GPU run uses; the GPU's memory saved is measured by bench/gpu_check.py."""

import pytest
import torch
from click.testing import CliRunner

from pref import offload
from pref.cli.main import cli
from pref.config import build_config
from pref.errors import PrefError
from pref.registry import load_registry
from pref.train import train_policy


def test_the_activations_move_and_the_weights_stay_by_hand(monkeypatch):
    """relu(x W^T) summed: the backward keeps x [4, 256] for W's gradient and relu's output [4, 256], 4 x 256 x 4 bytes each:
    8,192 bytes moved; W (saved for x's gradient when x needs one) stays; a 4,097-byte floor moves nothing. The gradients are
    those of the plain backward."""
    monkeypatch.setattr(offload, "STAYS_ON", ())
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(256, 256, bias=False), torch.randn(4, 256, requires_grad=True)
    plain = torch.autograd.grad(layer(x).relu().sum(), [layer.weight, x])
    for min_bytes, moved in [(1024, 8192), (4097, 0)]:
        hooks = offload.OffloadedActivations(layer, min_bytes=min_bytes)
        with hooks:
            y = layer(x).relu().sum()
        assert hooks.offloaded == moved
        for ours, theirs in zip(torch.autograd.grad(y, [layer.weight, x]), plain):
            assert torch.equal(ours, theirs)


def test_cpu_memory_running_out_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(offload, "STAYS_ON", ())
    layer, x = torch.nn.Linear(256, 256, bias=False), torch.randn(4, 256)

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4096 bytes.")

    hooks = offload.OffloadedActivations(layer)
    message = r"^--activation-offloading: CPU memory could not take 4,096 bytes of activations \(DefaultCPUAllocator: .*\); add --gradient"
    with hooks, pytest.raises(PrefError, match=message):
        monkeypatch.setattr(torch, "empty", no_memory)
        layer(x).relu()
    assert hooks.offloaded == 0


def test_a_run_with_its_activations_offloaded_trains_the_same_weights(tmp_path, tiny_model_dir, prefs_file, monkeypatch):
    monkeypatch.setattr(offload, "STAYS_ON", ())
    made = []

    class Counted(offload.OffloadedActivations):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(offload, "OffloadedActivations", Counted)
    flags = {"objective": "dpo", "model": tiny_model_dir, "dataset": [prefs_file], "batch_size": 2, "steps": 2, "lr": 1e-2, "device": "cpu",
             "gradient_checkpointing": True}
    runs = [train_policy(build_config(flags={**flags, "activation_offloading": on, "output_dir": str(tmp_path / str(on))}), load_registry())[1]
            for on in (False, True)]
    assert len(made) == 1 and made[0].offloaded > 0  # the checkpointed layers' inputs, each step
    for (name, before), after in zip(runs[0].model.state_dict().items(), runs[1].model.state_dict().values()):
        assert torch.equal(before, after), name


def test_on_the_cpu_it_is_refused_in_one_line(tmp_path, prefs_file):
    result = CliRunner().invoke(cli, ["run", "--objective", "dpo", "--dataset", prefs_file, "--device", "cpu", "--activation-offloading",
                                      "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--activation-offloading moves activations from the accelerator's memory to the CPU's, and this run computes on the CPU: " \
           "drop it, or run on a GPU" in " ".join(result.output.split())
