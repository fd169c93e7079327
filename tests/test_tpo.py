"""TPO: parity with TRL 1.16's TPOTrainer, by hand, its data, and a short run."""

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from pref.cli.main import cli
from pref.errors import PrefError
from pref.interfaces import PairBatch
from pref.plugins.preference_data import load_preferences
from pref.plugins.tpo import TPO, tpo_loss
from pref.sequences import Sequences, logps_from_logits

B, T, V = 3, 9, 11


def rows(seed):
    """B right-padded rows of T tokens: a prompt of 2-3 tokens, an answer of 2-5, then padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=generator)
    attention, completion = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    for row in range(B):
        prompt, answer = 2 + row % 2, 2 + (seed + row) % 4
        attention[row, : prompt + answer] = 1
        completion[row, prompt : prompt + answer] = 1
    return Sequences(ids * attention, attention, completion)


class Logits(torch.nn.Module):
    """A model that answers any rows with the first rows of fixed logits."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.logits[: len(input_ids)])


@pytest.mark.parametrize("options", [
    {"loss_type": "sigmoid", "beta": 0.01},
    {"loss_type": "sigmoid", "beta": 0.5, "label_smoothing": 0.1, "tpo_alpha": 0.5},
    {"loss_type": "hinge", "beta": 0.2},
    {"loss_type": "ipo", "beta": 0.3},
    {"loss_type": "tpo-l", "beta": 2.0, "tpo_l_gamma": 0.8},
    {"loss_type": "tpo-l", "beta": 1.0, "tpo_alpha": 0.0},
])
def test_tpo_matches_trl(options):
    tpo = pytest.importorskip("trl.experimental.tpo")
    chosen, rejected, gold = rows(1), rows(2), rows(3)
    logits = torch.randn(3 * B, T, V, generator=torch.Generator().manual_seed(4))
    model = Logits(logits).train()

    settings = {"loss_type": "sigmoid", "beta": 0.01, "label_smoothing": 0.0, "tpo_alpha": 1.0, "tpo_l_gamma": 0.5, **options}
    trainer = object.__new__(tpo.TPOTrainer)
    for name, value in settings.items():
        setattr(trainer, name, value)
    trainer.model, trainer._metrics, trainer._total_train_tokens, trainer._tp_size = model, {"train": defaultdict(list)}, 0, 1
    trainer.accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    branches = [chosen, rejected, gold] if settings["tpo_alpha"] else [chosen, rejected]
    inputs = {name: torch.cat([getattr(s, name) for s in branches]) for name in ("input_ids", "attention_mask", "completion_mask")}
    theirs = trainer._compute_loss(model, inputs, return_outputs=False)

    policy = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0), logps=lambda sequences: logps_from_logits(model(sequences.input_ids).logits, sequences))
    ours, metrics = TPO(**options).loss(policy, None, PairBatch(chosen, rejected, gold))
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    for name in ("rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/rejected"):
        assert metrics[name] == pytest.approx(trainer._metrics["train"][name][0], abs=1e-5), name


def test_tpo_by_hand():
    """Summed log-probs chosen -2, rejected -6, beta 0.25: margin 4, loss -log sigmoid(1) = 0.31326; rewards -0.5 and -1.5.

    TPO-L on averages chosen -1, rejected -2 with beta 2 and gamma 1: -log sigmoid(2 (1 - 1/2)) = log(1 + e^-1) as well.
    """
    losses, chosen, rejected = tpo_loss(torch.tensor([-2.0]), torch.tensor([-6.0]), beta=0.25)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    assert (chosen.item(), rejected.item()) == (-0.5, -1.5)
    losses, _, _ = tpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, loss_type="tpo-l", tpo_l_gamma=1.0)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)


@pytest.mark.parametrize("options, message", [
    ({"loss_type": "dpo"}, "unknown TPO loss_type 'dpo': choose one of sigmoid, hinge, ipo, tpo-l"),
    ({"beta": 0}, "tpo: beta must be positive, got 0"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "tpo: label_smoothing only applies to loss_type sigmoid or tpo-l, not 'hinge'; set it to 0"),
    ({"tpo_alpha": -1}, "tpo: tpo_alpha (the gold answers' NLL weight) must not be negative, got -1"),
])
def test_tpo_bad_options(options, message):
    with pytest.raises(PrefError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
        TPO(**options)


def test_triple_data_in_each_format(tmp_path):
    path = tmp_path / "triples.jsonl"
    chat = [{"role": "user", "content": "Name a colour."}]
    records = [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No.", "reference": "Deep blue."},
        {"prompt": chat, "chosen": [{"role": "assistant", "content": "Red."}], "rejected": [{"role": "assistant", "content": "No."}],
         "reference": [{"role": "assistant", "content": "Crimson red."}]},
        {"chosen": "Q: a fruit? A: apple", "rejected": "Q: a fruit? A: rock", "reference": "Q: a fruit? A: a pear"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    examples = load_preferences(str(path), gold=True)
    assert [(e.prompt, e.chosen, e.gold) for e in examples] == [
        ("Name a colour.", "Blue.", "Deep blue."), (chat, "Red.", "Crimson red."), ("Q: a fruit? A:", " apple", " a pear")]
    assert load_preferences(str(path))[0].gold is None  # the preferences builder leaves it out

    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(PrefError, match="row 1: missing field 'reference' \\(the gold answer TPO learns from besides the pair\\)"):
        load_preferences(str(path), gold=True)
    path.write_text(json.dumps({"chosen": "Q: x? A: a", "rejected": "Q: x? A: b", "reference": "Other: c"}) + "\n")
    with pytest.raises(PrefError, match="'reference' does not start with the prompt 'chosen' and 'rejected' share; add a 'prompt' field"):
        load_preferences(str(path), gold=True)


@pytest.mark.slow
def test_pref_run_tpo_trains_on_triples(tmp_path, tiny_model_dir):
    data = tmp_path / "triples.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say a word {i}.", "chosen": "the sky is blue .", "rejected": "no .",
                                        "reference": "the sea is blue too ."}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", "--objective", "tpo", "--model", tiny_model_dir, "--dataset", str(data), "--steps", "4",
                                      "--batch-size", "2", "--lr", "1e-3", "--device", "cpu", "--no-progress", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert lines[-1]["nll_loss"] < lines[0]["nll_loss"]  # the gold answers grow likelier
    assert lines[-1]["rewards/margins"] > lines[0]["rewards/margins"]
    # a pairs file without gold answers is refused before the model loads
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a b", "rejected": "c d"}) + "\n")
    result = CliRunner().invoke(cli, ["run", "--objective", "tpo", "--model", tiny_model_dir, "--dataset", str(pairs), "--output-dir", str(tmp_path / "r2")])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"Error: {pairs} row 1: missing field 'reference' (the gold answer TPO learns from besides the pair)"
