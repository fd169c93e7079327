"""distill: the generalized JSD by hand, its chunked form and a whole loss against TRL 1.16's DistillationTrainer, and runs."""

import json
import math
import os

import pytest
import torch
from click.testing import CliRunner
from trl.trainer.distillation_trainer import _chunked_divergence_loss

import pref.plugins.distill as distill
from pref.cli.main import cli
from pref.interfaces import Minibatch, Rollout, ScoredBatch
from pref.plugins.distill import Distill, chunked_divergence, generalized_jsd
from pref.policy import HFPolicy
from pref.reference import FrozenReference
from pref.sequences import OutputHead


def test_generalized_jsd_by_hand():
    """Student (1/4, 3/4), teacher (1/2, 1/2): the three divergences written out."""
    student, teacher = torch.tensor([[0.25, 0.75]]).log(), torch.tensor([[0.5, 0.5]]).log()
    forward_kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(teacher || student) = 0.5 ln(4/3)
    reverse_kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL(student || teacher)
    m = (0.375, 0.625)  # beta 0.5: the mixture (1 - beta) p_s + beta p_t
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))
    assert forward_kl == pytest.approx(0.143841, abs=1e-6) and reverse_kl == pytest.approx(0.130812, abs=1e-6)
    assert generalized_jsd(student, teacher, 0.0).item() == pytest.approx(forward_kl, abs=1e-6)
    assert generalized_jsd(student, teacher, 1.0).item() == pytest.approx(reverse_kl, abs=1e-6)
    assert generalized_jsd(student, teacher, 0.5).item() == pytest.approx(jsd, abs=1e-6)
    # temperature 2 compares the distributions of the halved logits
    assert generalized_jsd(student, teacher, 1.0, temperature=2.0).item() == pytest.approx(generalized_jsd(student / 2, teacher / 2, 1.0).item())
    same = generalized_jsd(teacher, teacher, 0.3)
    assert same.item() == pytest.approx(0.0, abs=1e-7)


def heads(vocab, width, teacher_width, seed=0):
    """A student and a teacher output layer (with a bias, a logit scale and Gemma's soft-capping on the teacher)."""
    torch.manual_seed(seed)
    student = torch.nn.Linear(width, vocab, bias=True)
    teacher = torch.nn.Linear(teacher_width, vocab, bias=False).requires_grad_(False)
    return OutputHead(student), OutputHead(teacher, scale=1.5, softcap=30.0)


@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.3, 0.7), (1.0, 1.0), (0.5, 2.0)])
def test_chunked_divergence_matches_trl(monkeypatch, beta, temperature):
    """At a 16k vocabulary, over several chunks: the loss, the entropy and the student's gradients are TRL's kernel's."""
    monkeypatch.setattr(distill, "LOGIT_CHUNK_ELEMENTS", 16384 * 24)  # 24 rows a chunk: 5 chunks for 100 positions
    student_head, teacher_head = heads(16384, 48, 80)
    torch.manual_seed(1)
    hidden_s = torch.randn(4, 25, 48, requires_grad=True)
    hidden_t = torch.randn(4, 25, 80)
    mask = torch.ones(4, 25, dtype=torch.long)
    mask[1, 20:] = 0  # uneven lengths
    mask[3, 5:] = 0
    where = mask.bool()

    ours, entropy = chunked_divergence(hidden_s[where], student_head, hidden_t[where], teacher_head, beta, temperature)
    (ours.sum() / where.sum()).backward()
    ours_grads = [hidden_s.grad.clone(), student_head.module.weight.grad.clone(), student_head.module.bias.grad.clone()]
    hidden_s.grad = None
    student_head.module.zero_grad()

    theirs, entropy_sum, count = _chunked_divergence_loss(
        hidden_s, hidden_t, student_head.module.weight, teacher_head.module.weight, mask, beta, student_lm_head_bias=student_head.module.bias,
        teacher_logit_scale=1.5, teacher_final_logit_softcapping=30.0, temperature=temperature)
    theirs.backward()
    assert int(count) == int(where.sum()) == 75
    assert (ours.sum() / where.sum()).item() == pytest.approx(theirs.item(), rel=1e-4, abs=1e-6)
    assert entropy.sum().item() == pytest.approx(entropy_sum.item(), rel=1e-4)
    for mine, trl in zip(ours_grads, [hidden_s.grad, student_head.module.weight.grad, student_head.module.bias.grad]):
        torch.testing.assert_close(mine, trl, rtol=1e-3, atol=1e-7)


def test_heads_of_different_widths_compare_the_rows_both_have():
    """A teacher with more output rows (padding rows, the same tokenizer) is compared on the student's rows."""
    student_head, _ = heads(40, 8, 8)
    torch.manual_seed(2)
    wider = OutputHead(torch.nn.Linear(8, 48, bias=False).requires_grad_(False))
    hidden = torch.randn(5, 8)
    ours, _ = chunked_divergence(hidden, student_head, hidden, wider, 0.5)
    expected = generalized_jsd(student_head.logits(hidden), wider.logits(hidden)[:, :40], 0.5)
    torch.testing.assert_close(ours, expected)


def trl_layout(sequences):
    """pref's right-padded prompt+completion rows as TRL lays them out: left-padded prompts, then right-padded completions."""
    prompts = [row[(att == 1) & (comp == 0)] for row, att, comp in zip(sequences.input_ids, sequences.attention_mask, sequences.completion_mask)]
    answers = [row[comp == 1] for row, comp in zip(sequences.input_ids, sequences.completion_mask)]
    width_p, width_c = max(len(p) for p in prompts), max(len(a) for a in answers)
    ids = torch.stack([torch.cat([p.new_zeros(width_p - len(p)), p, a, a.new_zeros(width_c - len(a))]) for p, a in zip(prompts, answers)])
    attention = torch.stack([torch.cat([torch.zeros(width_p - len(p)), torch.ones(len(p) + len(a)), torch.zeros(width_c - len(a))])
                             for p, a in zip(prompts, answers)]).long()
    completion = torch.stack([torch.cat([torch.ones(len(a)), torch.zeros(width_c - len(a))]) for a in answers]).long()
    return ids, attention, completion


def student_and_teacher(tiny_model_dir):
    """The tiny model as the student, the default model as its teacher, and three answers of uneven lengths as one step's rows."""
    student = HFPolicy.load(tiny_model_dir)
    student.model.eval()  # no dropout in either computation
    teacher = FrozenReference(HFPolicy.load("pref-default").model.eval().requires_grad_(False))
    prompts = ["Name a fruit.", "What is your name?", "Name one random common English noun."]
    answers = ["apple", "I am Pref, a helpful assistant.", "table"]
    sequences = student.encode(prompts, answers)
    return student, teacher, sequences, Minibatch(Rollout(ScoredBatch(prompts, answers, sequences, {}, 1)), torch.arange(3))


def loss_and_gradients(objective, student, teacher, batch):
    """The objective's loss and metrics on the batch, and the student's gradients of it (cleared after)."""
    loss, metrics = objective.loss(student, teacher, batch)
    loss.backward()
    gradients = [p.grad.clone() for p in student.model.parameters()]
    student.model.zero_grad()
    return loss, metrics, gradients


def test_distill_loss_on_two_models_is_trls(tiny_model_dir):
    """The whole loss (hidden states, alignment, masks, heads) of a student and another teacher, and the student's gradients,
    are TRL's `_compute_loss` path: each model's backbone on TRL's layout, then `_chunked_divergence_loss`."""
    student, teacher, sequences, batch = student_and_teacher(tiny_model_dir)
    objective = Distill(beta=0.4, temperature=0.9, reference_model="pref-default")
    loss, metrics, ours = loss_and_gradients(objective, student, teacher, batch)

    ids, attention, completion = trl_layout(sequences)
    keep = completion.shape[1]

    def last_hidden(model):
        return model.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, :-1][:, -keep:]

    with torch.no_grad():
        teacher_hidden = last_hidden(teacher.model)
    theirs, entropy_sum, count = _chunked_divergence_loss(last_hidden(student.model), teacher_hidden, student.model.lm_head.weight,
                                                          teacher.model.lm_head.weight, completion, 0.4, temperature=0.9)
    theirs.backward()
    assert objective.loss_items(batch) == int(count) == int(completion.sum())
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-4) and loss.item() > 0.01
    assert metrics["entropy"] == pytest.approx((entropy_sum / count).item(), rel=1e-4)
    for mine, trl in zip(ours, [p.grad for p in student.model.parameters()]):
        torch.testing.assert_close(mine, trl, rtol=2e-3, atol=1e-6)


def test_iw_opd_weights_by_hand():
    """|advantages| 1, 2, 1, 0 (total 4): spent before each 0, 1, 3, 4, so weights 1 + 0.5 x (1 - 0, 1 - 1/4, 1 - 3/4, 1 - 1)."""
    weights = distill.iw_opd_weights(torch.tensor([[1.0, -2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]), gamma=0.5)
    assert weights.tolist() == [[1.5, 1.375, 1.125, 1.0], [1.5, 1.5, 1.5, 1.5]]


def test_iw_opd_loss_on_two_models_is_trls(tiny_model_dir):
    """distill's iw_opd loss, its metrics and the student's gradients are TRL's `IWOPDTrainer._compute_iw_opd_loss` on full logits
    in TRL's layout (a rollout used once: the sampling log-probs are the student's own)."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.experimental.iw_opd.iw_opd_trainer import IWOPDTrainer

    student, teacher, sequences, batch = student_and_teacher(tiny_model_dir)
    objective = Distill(distillation_objective="iw_opd", iw_opd_gamma=0.7, temperature=0.9, reference_model="pref-default")
    loss, metrics, ours = loss_and_gradients(objective, student, teacher, batch)

    ids, attention, completion = trl_layout(sequences)
    keep = completion.shape[1]
    tokens = ids[:, -keep:]
    student_logits = student.model(input_ids=ids, attention_mask=attention).logits[:, :-1][:, -keep:]
    with torch.no_grad():
        teacher_logps = torch.log_softmax(teacher.model(input_ids=ids, attention_mask=attention).logits[:, :-1][:, -keep:] / 0.9, -1)
    logged = defaultdict(list)
    trainer = SimpleNamespace(temperature=0.9, iw_opd_gamma=0.7, iw_opd_epsilon=1e-8, model=student.model, _metrics={"eval": logged})
    theirs = IWOPDTrainer._compute_iw_opd_loss(trainer, student_logits, tokens, tokens.masked_fill(completion == 0, -100),
                                               torch.gather(teacher_logps, -1, tokens[..., None])[..., 0])
    theirs.backward()
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-4, abs=1e-6) and abs(loss.item()) > 1e-3
    for name in ("mean_advantage", "mean_abs_advantage", "mean_weight", "min_weight", "max_weight"):
        assert metrics[f"iw_opd/{name}"] == pytest.approx(logged[f"iw_opd/{name}"][0], rel=1e-4, abs=1e-6), name
    for mine, trl in zip(ours, [p.grad for p in student.model.parameters()]):
        torch.testing.assert_close(mine, trl, rtol=2e-3, atol=1e-6)


def run(tmp_path, *args, out="run"):
    result = CliRunner().invoke(cli, ["run", "--device", "cpu", "--no-progress", "--output-dir", str(tmp_path / out), *args])
    return result


def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Name a fruit.", "What is your name?", "Name an animal."]))
    return str(path)


def metrics_of(tmp_path, out="run"):
    return [json.loads(line) for line in open(tmp_path / out / "metrics.jsonl")]


def test_distill_trains_from_the_cli(tmp_path, tiny_model_dir):
    """The tiny model learns the default model's distributions on its own samples; a teacher that is the student itself is at 0."""
    result = run(tmp_path, "--objective", "distill", "--model", tiny_model_dir, "--reference-model", "pref-default",
                 "--dataset", prompts_file(tmp_path), "--steps", "3", "--batch-size", "2", "-o", "beta=0.5")
    assert result.exit_code == 0, result.output + repr(result.exception)
    lines = metrics_of(tmp_path)
    assert [m["step"] for m in lines] == [1, 2, 3] and all(m["loss"] > 0 and m["entropy"] > 0 for m in lines)
    assert all(0 <= m["completions/clipped_ratio"] <= 1 and m["completions/min_length"] <= m["completions/mean_length"] for m in lines)
    assert not any(key.startswith("reward") for key in lines[0])  # no reward: none logged
    assert os.path.isdir(tmp_path / "run" / "final")
    assert json.load(open(tmp_path / "run" / "run.json"))["config"]["reference_model"] == "pref-default"

    result = run(tmp_path, "--objective", "distill", "--model", tiny_model_dir, "--reference-model", tiny_model_dir, "--steps", "1",
                 "--batch-size", "2", "--reward", "noun-diversity", out="self")
    assert result.exit_code == 0, result.output + repr(result.exception)
    first = metrics_of(tmp_path, "self")[0]
    assert first["loss"] == pytest.approx(0.0, abs=1e-6)  # the teacher is the student: nothing to learn (its dropout is 0)
    assert "reward/mean" in first  # a reward given is logged; without --dataset, its default prompts are sampled

    result = run(tmp_path, "--objective", "distill", "--model", tiny_model_dir, "--reference-model", "pref-default", "--dataset",
                 prompts_file(tmp_path), "--steps", "2", "--batch-size", "2", "-o", "distillation_objective=iw_opd", out="iw-opd")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert all(m["iw_opd/max_weight"] <= 1.5 and m["iw_opd/min_weight"] >= 1.0 for m in metrics_of(tmp_path, "iw-opd"))


def gkd_rows(tmp_path):
    path = tmp_path / "answers.jsonl"
    rows = [{"prompt": "Name a fruit.", "completion": "An apple."},
            {"messages": [{"role": "user", "content": "What is your name?"}, {"role": "assistant", "content": "I am Pref."}]},
            {"prompt": "Name an animal.", "completion": [{"role": "assistant", "content": "A cat."}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_gkd_lmbda_trains_some_steps_on_the_rows_own_answers(tmp_path, tiny_model_dir):
    """lmbda 0.5: each step samples or not by a seeded draw of its number, the same in a second run; a step that does not
    trains on its rows' answers (a `completion` text, chat messages ending in it, a conversation's last answer), as GKD's."""
    args = ["--objective", "distill", "--model", tiny_model_dir, "--reference-model", "pref-default", "--dataset", gkd_rows(tmp_path),
            "--steps", "6", "--batch-size", "2", "-o", "lmbda=0.5", "--log-completions"]
    runs = []
    for out in ("a", "b"):
        result = run(tmp_path, *args, out=out)
        assert result.exit_code == 0, result.output + repr(result.exception)
        runs.append([m["samples/on_policy"] for m in metrics_of(tmp_path, out)])
    assert runs[0] == runs[1] and set(runs[0]) == {0.0, 1.0}
    logged = [json.loads(line) for line in open(tmp_path / "a" / "completions.jsonl")]
    answers = {"An apple.", "I am Pref.", "A cat."}
    for step, on_policy in enumerate(runs[0], start=1):
        completions = {row["completion"] for row in logged if row["step"] == step}
        assert (completions <= answers) != bool(on_policy), (step, completions)
    assert {str(row["row/completion"]) for row in logged} >= {"An apple.", "I am Pref."}  # the column, beside the sample's own field


def test_gkd_lmbda_0_never_samples(tmp_path, tiny_model_dir, monkeypatch):
    from pref.policy import HFPolicy

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled with lmbda 0")

    monkeypatch.setattr(HFPolicy, "sample", no_sampling)
    result = run(tmp_path, "--objective", "distill", "--model", tiny_model_dir, "--reference-model", "pref-default", "--dataset",
                 gkd_rows(tmp_path), "--steps", "2", "--batch-size", "2", "-o", "lmbda=0")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert all(m["samples/on_policy"] == 0.0 and m["loss"] > 0 for m in metrics_of(tmp_path))


def test_off_policy_answers_are_a_column_of_samples():
    from pref.errors import PrefError
    from pref.interfaces import SAMPLES, ObjectiveNeeds

    assert ObjectiveNeeds(data=SAMPLES, online=True, columns=("completion",), on_policy_fraction=0.5, off_policy_answers="completion")
    with pytest.raises(PrefError, match="below 1 it is for data 'samples', with off_policy_answers naming one of its columns"):
        ObjectiveNeeds(data=SAMPLES, online=True, on_policy_fraction=0.5, off_policy_answers="completion")


@pytest.mark.parametrize("args,message", [
    (["--objective", "distill"], "pass --reference-model TEACHER"),
    (["--objective", "distill", "--reference-model", "pref-default"], "pass --dataset with prompts"),
    (["--objective", "distill", "--reference-model", "pref-default", "-o", "beta=1.5", "--dataset", "p.jsonl"], "beta must lie in [0, 1]"),
    (["--objective", "distill", "--reference-model", "pref-default", "--reference", "none", "--dataset", "p.jsonl"], "drop --reference none"),
    (["--objective", "distill", "--reference-model", "pref-default", "-o", "distillation_objective=iw_opd", "-o", "beta=0.5",
      "--dataset", "p.jsonl"], "beta is the jsd's; iw_opd trains on the sampled tokens' log-probs alone: drop beta"),
    (["--objective", "distill", "--reference-model", "pref-default", "-o", "distillation_objective=gkd", "--dataset", "p.jsonl"],
     "distillation_objective must be jsd or iw_opd, not 'gkd'"),
    (["--objective", "distill", "--reference-model", "pref-default", "-o", "lmbda=1.5", "--dataset", "p.jsonl"], "lmbda, the share of steps"),
    (["--objective", "distill", "--reference-model", "pref-default", "-o", "lmbda=0.5", "--dataset", "q.jsonl"],
     "has no 'completion'; give rows of a prompt and 'completion'"),
    (["--objective", "distill", "--reference-model", "pref-default", "-o", "lmbda=0.5", "--dataset", "r.jsonl"],
     "r.jsonl holds dict \"{'text': 'b'}\", not an answer's text (or chat messages ending in it)"),
    (["--objective", "dpo", "--reference-model", "pref-default", "--reference", "none", "--dataset", "p.jsonl"],
     "--reference none trains without a reference: drop --reference-model"),
    (["--objective", "sft", "--reference-model", "pref-default", "--dataset", "p.jsonl"], "'sft' with these options uses no reference"),
    (["--objective", "dpo", "--reference-model", "pref-default", "-o", "sync_ref_model=true", "--dataset", "p.jsonl"],
     "drop --reference-model or the option"),
])
def test_distill_and_reference_model_mistakes_are_one_line_errors(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c", "completion": "b"}) + "\n")
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n")
    (tmp_path / "r.jsonl").write_text(json.dumps({"prompt": "a", "completion": {"text": "b"}}) + "\n")
    result = CliRunner().invoke(cli, ["run", "--device", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_a_reference_model_of_another_vocabulary_is_refused(tmp_path, tiny_model_dir, prefs_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<extra-token>"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    result = run(tmp_path, "--objective", "dpo", "--model", tiny_model_dir, "--reference-model", str(other), "--dataset", prefs_file, "--steps", "1")
    assert result.exit_code == 2 and "has another vocabulary than the policy" in result.output, result.output


@pytest.mark.parametrize("reference", ["model", "cached"])
def test_dpo_against_another_reference_model(tmp_path, tiny_model_dir, prefs_file, reference):
    """DPO's log-ratios are taken against --reference-model, frozen or cached: against the starting policy itself they start at 0."""
    common = ["--objective", "dpo", "--model", tiny_model_dir, "--dataset", prefs_file, "--steps", "1", "--batch-size", "2",
              "--reference", reference]
    assert run(tmp_path, *common, "--reference-model", "pref-default", out="other").exit_code == 0
    assert run(tmp_path, *common, "--reference-model", tiny_model_dir, out="same").exit_code == 0
    other, same = metrics_of(tmp_path, "other")[0], metrics_of(tmp_path, "same")[0]
    assert same["rewards/margins"] == pytest.approx(0.0, abs=1e-5) and same["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(other["rewards/margins"]) > 1e-3 and other["loss"] != pytest.approx(math.log(2), abs=1e-4)
