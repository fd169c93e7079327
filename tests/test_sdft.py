"""sdft: its per-token losses by hand and against TRL 1.16's `trl.experimental.sdft`, the teacher's prompt, a whole loss on a model
against TRL's layout, and runs."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from trl.experimental.sdft.loss_utils import (
    apply_importance_sampling_clipping, compute_full_logit_self_distillation_loss, compute_sampled_token_self_distillation_loss,
    compute_topk_self_distillation_loss,
)
from trl.experimental.sdft.sdft_trainer import DemonstrationTeacherContextBuilder

import pref.plugins.distill as distill
from pref.cli.main import cli
from pref.errors import PrefError
from pref.interfaces import SAMPLES, SETS, Minibatch, ObjectiveNeeds, Rollout, ScoredBatch
from pref.models import prompt_token_ids
from pref.plugins.distill import over_chunks
from pref.plugins.sdft import SDFT, TeacherRows, teacher_prompt, token_losses, topk_divergence
from pref.plugins.sdft import token_logps as sdft_token_logps
from pref.policy import HFPolicy
from pref.reference import FrozenReference
from pref.sequences import OutputHead


def test_topk_divergence_by_hand():
    """Student (1/2, 1/4, 1/4), teacher (1/4, 1/4, 1/2), k = 1... 2: the student's top two tokens are 0 and 1 (its first two)."""
    student, teacher = torch.tensor([[0.5, 0.25, 0.25]]).log(), torch.tensor([[0.25, 0.25, 0.5]]).log()
    # renormalised on tokens 0 and 1: student (2/3, 1/3), teacher (1/2, 1/2); forward KL(teacher || student)
    forward = 0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))
    assert topk_divergence(student, teacher, 2, 0.0, add_tail=False).item() == pytest.approx(forward, abs=1e-6)
    # with the tail: student (1/2, 1/4 | 1/4), teacher (1/4, 1/4 | 1/2); reverse KL(student || teacher)
    reverse = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.25) + 0.25 * math.log(0.25 / 0.5)
    assert topk_divergence(student, teacher, 2, 1.0, add_tail=True).item() == pytest.approx(reverse, abs=1e-6)
    # k as large as the vocabulary: the whole distributions
    whole = 0.25 * math.log(0.25 / 0.5) + 0.25 * math.log(0.25 / 0.25) + 0.5 * math.log(0.5 / 0.25)
    assert topk_divergence(student, teacher, 10, 0.0, add_tail=False).item() == pytest.approx(whole, abs=1e-6)


def test_sampled_token_loss_by_hand():
    """Sampled token 2: student 1/4, teacher 1/2; the loss is (ln 1/4 - ln 1/2) ln 1/4, its gradient that of ln 1/4 times ln 1/2."""
    student = torch.tensor([[0.5, 0.25, 0.25]]).log().requires_grad_(True)
    teacher = torch.tensor([[0.25, 0.25, 0.5]]).log()
    loss, sampled = token_losses(student, teacher, torch.tensor([2]), "sampled_token", 1.0, 100, False, 1.0)
    assert loss.item() == pytest.approx(math.log(0.5) * math.log(0.25), abs=1e-6)
    assert sampled.item() == pytest.approx(math.log(0.25), abs=1e-6)
    loss.sum().backward()
    # d ln p_2 / d logits = onehot(2) - p
    expected = math.log(0.5) * (torch.tensor([0.0, 0.0, 1.0]) - torch.tensor([0.5, 0.25, 0.25]))
    torch.testing.assert_close(student.grad[0], expected)


def heads(vocab, width, seed=0):
    torch.manual_seed(seed)
    return OutputHead(torch.nn.Linear(width, vocab, bias=False)), OutputHead(torch.nn.Linear(width, vocab, bias=False).requires_grad_(False))


@pytest.mark.parametrize("mode,alpha,add_tail,temperature", [
    ("topk_logits", 0.5, False, 1.0), ("topk_logits", 0.2, True, 0.7), ("full_logits", 0.0, False, 1.0), ("full_logits", 0.6, False, 1.3),
    ("sampled_token", 1.0, False, 1.0),
])
def test_token_losses_match_trl(monkeypatch, mode, alpha, add_tail, temperature):
    """At a 16k vocabulary, over several chunks: the per-token losses and the student's gradients are TRL's functions' on full logits."""
    monkeypatch.setattr(distill, "LOGIT_CHUNK_ELEMENTS", 16384 * 16)  # 16 rows a chunk: 4 chunks for 60 positions
    student_head, teacher_head = heads(16384, 32)
    torch.manual_seed(1)
    hidden_s, hidden_t = torch.randn(60, 32, requires_grad=True), torch.randn(60, 32)
    targets = torch.randint(0, 16384, (60,))

    ours, _ = over_chunks(lambda s, t, y: token_losses(s, t, y, mode, alpha, 100, add_tail, temperature),
                          hidden_s, student_head, hidden_t, teacher_head, targets)
    ours.sum().backward()
    ours_grads = [hidden_s.grad.clone(), student_head.module.weight.grad.clone()]
    hidden_s.grad = None
    student_head.module.zero_grad()

    student_logits = student_head.logits(hidden_s)[None] / temperature  # TRL's [B, T, V], divided by its temperature first
    with torch.no_grad():
        teacher_logits = teacher_head.logits(hidden_t)[None] / temperature
    if mode == "topk_logits":
        theirs = compute_topk_self_distillation_loss(student_logits, teacher_logits, distillation_topk=100, distillation_alpha=alpha,
                                                     distillation_add_tail=add_tail)
    elif mode == "full_logits":
        theirs = compute_full_logit_self_distillation_loss(student_logits, teacher_logits, distillation_alpha=alpha)
    else:
        theirs = compute_sampled_token_self_distillation_loss(student_logits, teacher_logits, targets[None], distillation_alpha=alpha)
    theirs.sum().backward()
    torch.testing.assert_close(ours, theirs[0], rtol=1e-4, atol=1e-6)
    assert ours.abs().sum() > 0.1
    for mine, trl in zip(ours_grads, [hidden_s.grad, student_head.module.weight.grad]):
        torch.testing.assert_close(mine, trl, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("prompt,context", [
    ("Solve 2 + 3.", "Worked answer: 2 + 3 = 5."),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Solve 2 + 3."}],
     [{"role": "assistant", "content": "2 + 3 = 5."}, {"role": "assistant", "content": ""}, {"role": "user", "content": "Good."}]),
    ([{"role": "user", "content": [{"type": "text", "text": "Solve"}, {"type": "image"}, {"type": "text", "text": "this."}]}], 42),
])
def test_teacher_prompt_is_trls(prompt, context):
    template = "Question: {prompt}\nExample: {privileged_context}\nNow answer."
    builder = DemonstrationTeacherContextBuilder(SimpleNamespace(args=SimpleNamespace(teacher_prompt_template=template)))
    assert teacher_prompt(prompt, context, template) == builder._compose_teacher_prompt(prompt, context)


def test_teacher_prompt_mistakes_are_errors():
    with pytest.raises(PrefError, match="must end with the user's turn"):
        teacher_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "c", "{prompt}{privileged_context}")
    with pytest.raises(PrefError, match="privileged context is empty"):
        teacher_prompt("a", None, "{prompt}{privileged_context}")


def trl_rows(prompts, answers):
    """TRL's layout: left-padded prompt ids, then right-padded answer ids; and the answer mask."""
    width_p, width_a = max(len(p) for p in prompts), max(len(a) for a in answers)
    ids = torch.tensor([[0] * (width_p - len(p)) + p + a + [0] * (width_a - len(a)) for p, a in zip(prompts, answers)])
    attention = torch.tensor([[0] * (width_p - len(p)) + [1] * (len(p) + len(a)) + [0] * (width_a - len(a)) for p, a in zip(prompts, answers)])
    return ids, attention, torch.tensor([[1] * len(a) + [0] * (width_a - len(a)) for a in answers])


def trl_logits(model, ids, attention, keep, temperature):
    """TRL's `_forward_logits`: the logits predicting the last `keep` tokens, divided by the temperature."""
    return model(input_ids=ids, attention_mask=attention).logits[:, :-1][:, -keep:] / temperature


@pytest.mark.parametrize("reused", [False, True])
def test_sdft_loss_on_a_model_is_trls(tiny_model_dir, reused):
    """The whole loss (the teacher's prompt, both models' rows, alignment, skipped tokens, chunked heads, the clipped ratio of a
    rollout trained on again) and the student's gradients are TRL's `_compute_teacher_student_logits` and
    `_compute_self_distillation_loss`, computed here on full logits in TRL's layout."""
    student = HFPolicy.load(tiny_model_dir)
    teacher = FrozenReference(copy.deepcopy(student.model).eval().requires_grad_(False))  # `base`: the starting policy
    prompts = ["Name a fruit.", [{"role": "user", "content": "What is your name?"}], "Name one random common English noun."]
    contexts = ["Example: apple", [{"role": "assistant", "content": "I am Pref."}], "Example: table"]
    answers = ["a green apple", "I am Pref, a helpful assistant.", "table"]
    sequences = student.encode(prompts, answers)
    batch = ScoredBatch(prompts, answers, sequences, {}, 1, columns={"privileged_context": contexts})
    objective = SDFT(distillation_alpha=0.3, temperature=0.8, num_loss_tokens_to_skip=1, distillation_topk=50,
                     num_iterations=2 if reused else 1, distillation_is_clip=1.5)
    student.model.eval()  # no dropout in either computation
    rollout = Rollout(batch)
    rows = rollout.prepared(objective, student, teacher)
    assert (rows.old_logps is not None) == reused
    if reused:  # as if the policy had moved since it sampled: the ratio p_now / p_sampled varies around 1 and is clipped at 1.5
        torch.manual_seed(3)
        rows.old_logps = rows.old_logps + torch.randn_like(rows.old_logps) * rows.old_logps.ne(0)
    loss, metrics = objective.loss(student, teacher, Minibatch(rollout, torch.arange(3)))
    loss.backward()
    ours = [p.grad.clone() for p in student.model.parameters()]
    student.model.zero_grad()

    tokenizer, template = student.tokenizer, "{prompt}\n\n{privileged_context}"
    answer_ids = [row[mask == 1].tolist() for row, mask in zip(sequences.input_ids, sequences.completion_mask)]
    ids, attention, mask = trl_rows([prompt_token_ids(tokenizer, p) for p in prompts], answer_ids)
    teacher_ids, teacher_attention, _ = trl_rows([prompt_token_ids(tokenizer, teacher_prompt(p, c, template)) for p, c in zip(prompts, contexts)],
                                                 answer_ids)
    keep = mask.shape[1]
    student_logits = trl_logits(student.model, ids, attention, keep, 0.8)
    with torch.no_grad():
        teacher_logits = trl_logits(teacher.model, teacher_ids, teacher_attention, keep, 0.8)
    loss_mask = mask * (torch.arange(keep)[None] >= 1)  # num_loss_tokens_to_skip 1
    per_token = compute_topk_self_distillation_loss(student_logits, teacher_logits, distillation_topk=50, distillation_alpha=0.3,
                                                    distillation_add_tail=False)
    if reused:
        old = torch.stack([torch.nn.functional.pad(row[m == 1], (0, keep - int(m.sum()))) for row, m in zip(rows.old_logps, sequences.completion_mask)])
        now = torch.gather(torch.log_softmax(student_logits, -1), -1, torch.tensor([a + [0] * (keep - len(a)) for a in answer_ids])[..., None])[..., 0]
        per_token = apply_importance_sampling_clipping(per_token, now, old, 1.5)
    theirs = ((per_token * loss_mask).sum(-1) / loss_mask.sum(-1).clamp(min=1.0)).mean()
    theirs.backward()
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-4) and loss.item() > 1e-3
    assert metrics["self_distillation/distillation_loss"] == pytest.approx(((per_token * loss_mask).sum() / loss_mask.sum()).item(), rel=1e-4)
    for mine, trl in zip(ours, [p.grad for p in student.model.parameters()]):
        torch.testing.assert_close(mine, trl, rtol=2e-3, atol=1e-6)


def test_the_sampling_policys_logps_are_at_the_loss_temperature(tiny_model_dir):
    """A rollout trained on more than once keeps the sampling policy's log-probs at the temperature the loss compares at, so before
    any update the ratio is 1 and the first pass's loss is that of a rollout used once (it was at temperature 1 before 2026-12-02)."""
    policy = HFPolicy.load(tiny_model_dir)
    policy.model.eval()
    prompts, answers = ["Name a fruit.", "Name one random common English noun."], ["a green apple", "table"]
    sequences = policy.encode(prompts, answers)
    with torch.no_grad():
        kept = sdft_token_logps(policy, sequences, 0.7)
        full = torch.log_softmax(policy.model(input_ids=sequences.input_ids, attention_mask=sequences.attention_mask).logits / 0.7, -1)
    where = sequences.completion_mask.bool()
    where[:, 0] = False
    expected = torch.gather(full[:, :-1], -1, sequences.input_ids[:, 1:, None])[..., 0][where[:, 1:]]
    torch.testing.assert_close(kept[where], expected, rtol=1e-5, atol=1e-5)
    assert (kept[~where] == 0).all()
    batch = ScoredBatch(prompts, answers, sequences, {}, 1, columns={"privileged_context": ["Example: pear", "Example: chair"]})
    losses = []
    for iterations in (1, 2):
        objective = SDFT(teacher_model_kind="live", temperature=0.7, num_iterations=iterations, distillation_is_clip=1.5)
        rollout = Rollout(batch)
        assert (rollout.prepared(objective, policy, None).old_logps is not None) == (iterations == 2)
        losses.append(objective.loss(policy, None, Minibatch(rollout, torch.arange(2)))[0].item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[0] > 1e-4


def test_teacher_rows_hold_the_sampled_answer_tokens(tiny_model_dir):
    """The teacher's rows: its prompt as the policy encodes prompts, then the very answer tokens of the student's rows."""
    policy = HFPolicy.load(tiny_model_dir)
    sequences = policy.encode(["Hi.", "Name a fruit."], ["hello there", "apple"])
    batch = ScoredBatch(["Hi.", "Name a fruit."], ["hello there", "apple"], sequences, {}, 1, columns={"ctx": ["say hello", "apple"]})
    rows = SDFT(context_column="ctx").prepare(policy, None, batch)
    for i, (prompt, context) in enumerate([("Hi.", "say hello"), ("Name a fruit.", "apple")]):
        teacher = rows.teacher.input_ids[i][rows.teacher.attention_mask[i] == 1].tolist()
        expected_prompt = prompt_token_ids(policy.tokenizer, f"{prompt}\n\n{context}")
        answer = sequences.input_ids[i][sequences.completion_mask[i] == 1].tolist()
        assert teacher == expected_prompt + answer
        assert rows.teacher.completion_mask[i].sum() == len(answer)
    assert isinstance(rows.select(torch.tensor([1])), TeacherRows) and len(rows.select(torch.tensor([1])).teacher) == 1


def test_objective_columns_are_for_samples():
    assert ObjectiveNeeds(data=SAMPLES, online=True, columns=("a",)).columns == ("a",)
    with pytest.raises(PrefError, match="columns .* are for data 'samples'"):
        ObjectiveNeeds(data=SETS, online=True, columns=("a",))


def run(tmp_path, *args, out="run"):
    return CliRunner().invoke(cli, ["run", "--device", "cpu", "--no-progress", "--output-dir", str(tmp_path / out), *args])


def contexts_file(tmp_path):
    path = tmp_path / "sdft.jsonl"
    rows = [{"prompt": "Name a fruit.", "privileged_context": "For example: apple."},
            {"prompt": [{"role": "user", "content": "What is your name?"}], "privileged_context": "Say: I am Pref."},
            {"prompt": "Name an animal.", "privileged_context": "For example: cat."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sdft_trains_from_the_cli_with_each_teacher(tmp_path, tiny_model_dir):
    """Each teacher starts as the policy itself: the first step's loss is the same whichever it is; after an update, the policy
    (live) and its average (ema, rate 0.5) are other teachers than the starting policy (base)."""
    data, first, second = contexts_file(tmp_path), {}, {}
    for kind in ("base", "live", "ema"):
        result = run(tmp_path, "--objective", "sdft", "--model", tiny_model_dir, "--dataset", data, "--steps", "2", "--batch-size", "2",
                     "--samples-per-prompt", "2", "--lr", "1e-3", "-o", f"teacher_model_kind={kind}", "-o", "teacher_update_rate=0.5",
                     "--log-completions", out=kind)
        assert result.exit_code == 0, result.output + repr(result.exception)
        lines = [json.loads(line) for line in open(tmp_path / kind / "metrics.jsonl")]
        assert [m["step"] for m in lines] == [1, 2] and all(m["loss"] > 0 and m["self_distillation/distillation_loss"] > 0 for m in lines)
        first[kind], second[kind] = lines[0]["loss"], lines[1]["loss"]
    assert first["live"] == pytest.approx(first["base"], rel=1e-5) and first["ema"] == pytest.approx(first["base"], rel=1e-5)
    assert second["live"] != pytest.approx(second["base"], rel=1e-4) and second["ema"] != pytest.approx(second["base"], rel=1e-4)
    logged = [json.loads(line) for line in open(tmp_path / "base" / "completions.jsonl")]
    assert len(logged) == 8 and {row["privileged_context"] for row in logged} <= {"For example: apple.", "Say: I am Pref.", "For example: cat."}


@pytest.mark.parametrize("args,message", [
    ([], "objective 'sdft' reads the column 'privileged_context' of each prompt's row: pass --dataset with such rows"),
    (["--dataset", "plain.jsonl"], "plain.jsonl has no 'privileged_context'; give rows of a prompt and 'privileged_context'"),
    (["--dataset", "plain.jsonl", "-o", "context_column=hint"], "has no 'hint'"),
    (["--dataset", "rows.jsonl", "-o", "distillation_mode=sampled_token"], "set distillation_alpha=1"),
    (["--dataset", "rows.jsonl", "-o", "distillation_mode=top"], "distillation_mode must be one of topk_logits, full_logits, sampled_token"),
    (["--dataset", "rows.jsonl", "-o", "teacher_prompt_template={prompt}"], "quote a text: teacher_prompt_template="),
    (["--dataset", "rows.jsonl", "-o", 'teacher_prompt_template="Q: {prompt}"'], "must hold {privileged_context}"),
    (["--dataset", "rows.jsonl", "-o", "teacher_model_kind=live", "--reference-model", "pref-default"], "drop --reference-model"),
    (["--dataset", "rows.jsonl", "-o", "teacher_model_kind=ema", "--lora"], "teacher_model_kind=ema), but an adapter run's"),
    (["--dataset", "rows.jsonl", "--reference", "none"], "drop --reference none"),
])
def test_sdft_mistakes_are_one_line_errors(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "a", "privileged_context": "b"}) + "\n")
    result = CliRunner().invoke(cli, ["run", "--device", "cpu", "--objective", "sdft", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
