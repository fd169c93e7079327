"""sdpo: the teacher's prompts against TRL 1.16's `SuccessfulRolloutTeacherContextBuilder`, the whole loss on a model against
`SDPOTrainer`'s own policy and distillation losses in its layout, and runs."""

import copy
import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from trl.experimental.sdpo.sdpo_trainer import DistillationLogits, SDPOTrainer, SuccessfulRolloutTeacherContextBuilder

from pref.cli.main import cli
from pref.errors import PrefError
from pref.interfaces import Minibatch, Rollout, ScoredBatch
from pref.models import prompt_token_ids
from pref.plugins.sdpo import FEEDBACK, REPROMPT, SDPO, SOLUTION, Reprompting
from pref.policy import HFPolicy
from pref.reference import FrozenReference
from test_sdft import trl_logits, trl_rows  # tests/ is on sys.path

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
PROMPTS = ["Name an animal."] * 3 + [CHAT] * 3
ANSWERS = ["a cat", "<think>hm</think>the dog", "cow", "a green apple", "pear", "I think a banana"]


def trl_teacher_prompts(options: dict, rewards: list[float], feedback: list, k: int = 3):
    """TRL's builder on these samples: the messages it would tokenize for the teacher, and its mask and metrics."""
    args = SimpleNamespace(success_reward_threshold=1.0, dont_reprompt_on_self_success=True, environment_feedback_only_without_solution=False,
                           use_successful_as_teacher=True, include_environment_feedback=False, remove_thinking_from_demonstration=False,
                           reprompt_template=REPROMPT, solution_template=SOLUTION, feedback_template=FEEDBACK, max_reprompt_len=10240)
    vars(args).update(options)
    trainer = SimpleNamespace(
        args=args, num_generations=k, model=SimpleNamespace(training=True), _tokenizer=SimpleNamespace(pad_token_id=0),
        accelerator=SimpleNamespace(device="cpu", process_index=0, gather=lambda t: t, pad_across_processes=lambda t, **_: t),
        processing_class=SimpleNamespace(decode=lambda ids, skip_special_tokens: ANSWERS[int(ids[0]) - 1]))
    builder, seen = SuccessfulRolloutTeacherContextBuilder(trainer), []

    def tokenize(messages):
        seen.extend(messages)
        return {"prompt_ids": torch.zeros(len(messages), 1, dtype=torch.long), "prompt_mask": torch.ones(len(messages), 1, dtype=torch.long)}

    builder._tokenize_teacher_messages = tokenize
    ids = torch.arange(1, len(ANSWERS) + 1)[:, None]
    out = builder.build({"completion_ids": ids, "completion_mask": torch.ones_like(ids)}, PROMPTS, torch.tensor(rewards), feedback)
    return seen, out["self_distillation_mask"], builder.last_metrics


@pytest.mark.parametrize("options", [
    {},
    {"dont_reprompt_on_self_success": False},
    {"remove_thinking_from_demonstration": True, "success_reward_threshold": 0.5},
    {"include_environment_feedback": True},
    {"include_environment_feedback": True, "environment_feedback_only_without_solution": True},
    {"use_successful_as_teacher": False, "include_environment_feedback": True},
    {"reprompt_template": "Q: {prompt}\n{feedback}{solution}Again.", "solution_template": "[{successful_previous_attempt}]"},
])
def test_teacher_prompts_are_trls(options):
    rewards = [0.0, 1.0, 0.5, 1.0, 1.0, 0.0]
    feedback = ["too short", None, "  ", "wrong fruit", "", "close"]
    seen, mask, metrics = trl_teacher_prompts(options, rewards, feedback)
    names = {"success_reward_threshold": "threshold", "use_successful_as_teacher": "use_successful",
             "dont_reprompt_on_self_success": "not_own_success", "include_environment_feedback": "include_feedback",
             "environment_feedback_only_without_solution": "feedback_only_without_solution",
             "remove_thinking_from_demonstration": "remove_thinking"}
    ours, our_metrics = Reprompting(**{names.get(k, k): v for k, v in options.items()}).teacher_prompts(PROMPTS, ANSWERS, rewards, feedback, 3)
    assert [p is not None for p in ours] == mask.bool().tolist() and any(p is not None for p in ours)
    assert [p for p in ours if p is not None] == [m for m, on in zip(seen, mask.bool().tolist()) if on]
    assert our_metrics == pytest.approx(metrics)


def test_teacher_prompts_by_hand():
    """Group [0, 1, 0.5]: only sample 1 succeeded; it teaches 0 and 2, and nobody teaches it (not its own teacher)."""
    prompts, metrics = Reprompting(reprompt_template="{prompt}|{solution}", solution_template="<{successful_previous_attempt}>") \
        .teacher_prompts(["Q"] * 3, ["x", "y", "z"], [0.0, 1.0, 0.5], None, 3)
    assert prompts == ["Q|<y>", None, "Q|<y>"]
    assert metrics["self_distillation/success_group_fraction"] == 1.0 and metrics["self_distillation/reprompt_sample_fraction"] == pytest.approx(2 / 3)
    with pytest.raises(PrefError, match="must end with the user's turn"):
        Reprompting().reprompt([{"role": "assistant", "content": "a"}], "s", "")


@pytest.mark.parametrize("options,reused", [
    ({}, False),  # TRL's defaults: sampled_token, reverse KL, distillation only
    ({"distillation_mode": "topk_logits", "distillation_topk": 50, "distillation_alpha": 0.3, "distillation_weight": 0.5,
      "loss_type": "grpo"}, True),
    ({"distillation_mode": "full_logits", "distillation_alpha": 0.6, "distillation_weight": 0.3, "loss_type": "dr_grpo",
      "importance_sampling_level": "sequence", "scale_rewards": "none", "epsilon_high": 0.28}, True),
])
def test_sdpo_loss_on_a_model_is_trls(tiny_model_dir, options, reused):
    """The whole loss (advantages, the re-prompted teacher's rows, alignment, chunked heads, the policy term at the temperature,
    the clipped ratios of a rollout trained on again) and the student's gradients are TRL's `SDPOTrainer._compute_policy_loss`
    and `_compute_self_distillation_loss`, run on full logits in TRL's layout and mixed as its `compute_loss` does."""
    student = HFPolicy.load(tiny_model_dir)
    teacher = FrozenReference(copy.deepcopy(student.model).eval().requires_grad_(False))  # `base`: the starting policy
    sequences = student.encode(PROMPTS, ANSWERS)
    rewards = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.25, 0.0])
    batch = ScoredBatch(PROMPTS, ANSWERS, sequences, {"reward": rewards}, 3, max_new_tokens=16)
    objective = SDPO(teacher_model_kind="base", temperature=0.8, distillation_is_clip=1.5, num_iterations=2 if reused else 1, **options)
    student.model.eval()  # no dropout in either computation
    rollout = Rollout(batch)
    rows = rollout.prepared(objective, student, teacher)
    assert (rows.old_logps is not None) == reused and rows.teacher_of.tolist() == [0, -1, 1, -1, 2, 3]
    if reused:  # as if the policy had moved since it sampled
        torch.manual_seed(3)
        rows.old_logps = rows.old_logps + 0.3 * torch.randn_like(rows.old_logps) * rows.old_logps.ne(0)
    loss, metrics = objective.loss(student, teacher, Minibatch(rollout, torch.arange(6)))
    loss.backward()
    ours = [p.grad.clone() for p in student.model.parameters()]
    student.model.zero_grad()

    tokenizer = student.tokenizer
    answer_ids = [row[mask == 1].tolist() for row, mask in zip(sequences.input_ids, sequences.completion_mask)]
    ids, attention, mask = trl_rows([prompt_token_ids(tokenizer, p) for p in PROMPTS], answer_ids)
    taught, _ = objective.reprompting.teacher_prompts(PROMPTS, ANSWERS, rewards.tolist(), None, 3)
    teacher_ids, teacher_attention, _ = trl_rows([prompt_token_ids(tokenizer, t if t is not None else p) for t, p in zip(taught, PROMPTS)],
                                                 answer_ids)
    keep = mask.shape[1]
    student_logits = trl_logits(student.model, ids, attention, keep, 0.8)
    with torch.no_grad():
        teacher_logits = trl_logits(teacher.model, teacher_ids, teacher_attention, keep, 0.8)
    grouped = rewards.view(-1, 3)  # TRL's advantages
    scale = torch.ones(6) if options.get("scale_rewards") == "none" else grouped.std(dim=1).repeat_interleave(3)
    advantages = (rewards - grouped.mean(dim=1).repeat_interleave(3)) / (scale + 1e-4)
    inputs = {"completion_ids": ids[:, -keep:], "completion_mask": mask, "advantages": advantages,
              "self_distillation_mask": torch.tensor([p is not None for p in taught], dtype=torch.float)}
    if reused:
        inputs["old_per_token_logps"] = torch.stack([torch.nn.functional.pad(row[m == 1], (0, keep - int(m.sum())))
                                                     for row, m in zip(rows.old_logps, sequences.completion_mask)])
    args = SimpleNamespace(distillation_mode="sampled_token", distillation_topk=None, distillation_alpha=1.0, distillation_add_tail=False,
                           distillation_is_clip=1.5, distillation_weight=1.0)
    vars(args).update({k: v for k, v in options.items() if k.startswith("distillation_")})
    logged = defaultdict(list)
    trainer = SimpleNamespace(args=args, model=student.model, accelerator=SimpleNamespace(gather=lambda t: t), _metrics={"eval": logged},
                              importance_sampling_level=options.get("importance_sampling_level", "token"), epsilon_low=0.2,
                              epsilon_high=options.get("epsilon_high", 0.2), loss_type=options.get("loss_type", "dapo"), max_completion_length=16,
                              _log_self_distillation_metric=lambda mode, value: logged["distillation_loss"].append(value))
    distillation = DistillationLogits(inputs["completion_ids"], mask, mask * inputs["self_distillation_mask"][:, None], student_logits, teacher_logits)
    weight = args.distillation_weight
    theirs = weight * SDPOTrainer._compute_self_distillation_loss(trainer, student.model, inputs, distillation)
    if weight < 1:
        theirs = theirs + (1 - weight) * SDPOTrainer._compute_policy_loss(trainer, inputs, student_logits)
    theirs.backward()
    # the two layouts' log-probs differ by ~1e-5 (float32, left padding); the policy term's sum of advantages cancels much of itself
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-4, abs=2e-5) and abs(loss.item()) > 1e-3
    assert metrics["self_distillation/distillation_loss"] == pytest.approx(logged["distillation_loss"][0], rel=1e-4, abs=1e-6)
    if weight < 1:
        assert metrics["self_distillation/policy_loss"] == pytest.approx(logged["self_distillation/policy_loss"][0], rel=1e-4, abs=2e-5)
    for mine, trl in zip(ours, [p.grad for p in student.model.parameters()]):
        torch.testing.assert_close(mine, trl, rtol=2e-3, atol=5e-6)


@pytest.mark.parametrize("max_reprompt_len", [10240, 12])
def test_the_teachers_prompt_is_cut_by_max_reprompt_len_not_the_students_limit(tiny_model_dir, max_reprompt_len):
    """A re-prompt (the question, a solution, the instruction) is longer than the student's prompt limit (--max-prompt-length 8
    here): it keeps its last max_reprompt_len tokens, all of them by default, so the question stays in it, as TRL's SDPO."""
    policy = HFPolicy.load(tiny_model_dir, max_prompt_length=8)
    prompts, answers = ["Name a fruit, please."] * 2, ["a green apple", "pear"]
    batch = ScoredBatch(prompts, answers, policy.encode(prompts, answers), {"reward": torch.tensor([1.0, 0.0])}, 2)
    rows = SDPO(teacher_model_kind="live", max_reprompt_len=max_reprompt_len).prepare(policy, None, batch)
    reprompt = prompt_token_ids(policy.tokenizer, REPROMPT.format(prompt=prompts[1], solution=SOLUTION.format(
        successful_previous_attempt="a green apple"), feedback=""))
    assert len(reprompt) > 8 + 12
    teacher = rows.teacher.input_ids[0][(rows.teacher.attention_mask[0] == 1) & (rows.teacher.completion_mask[0] == 0)].tolist()
    assert teacher == reprompt[-max_reprompt_len:]


def test_a_mini_batch_keeps_each_rows_own_teacher_row(tiny_model_dir):
    """steps_per_generation cuts a rollout into mini-batches: each selected row keeps its teacher row (renumbered), an untaught
    one none, and a mini-batch's loss is the mean over its rows of theirs."""
    policy = HFPolicy.load(tiny_model_dir)
    policy.model.eval()
    batch = ScoredBatch(PROMPTS, ANSWERS, policy.encode(PROMPTS, ANSWERS), {"reward": torch.tensor([0.0, 1.0, 0.5, 1.0, 0.25, 0.0])}, 3)
    objective = SDPO(teacher_model_kind="live", steps_per_generation=2)
    rollout = Rollout(batch)
    rows = rollout.prepared(objective, policy, None)
    assert rows.teacher_of.tolist() == [0, -1, 1, -1, 2, 3]
    part = rows.select(torch.tensor([4, 1, 2]))
    assert part.teacher_of.tolist() == [0, -1, 1]
    assert torch.equal(part.teacher.input_ids, rows.teacher.select(torch.tensor([2, 1])).input_ids)
    with torch.no_grad():
        alone = [objective.loss(policy, None, Minibatch(rollout, torch.tensor([r])))[0].item() for r in (4, 1, 2)]
        together = objective.loss(policy, None, Minibatch(rollout, torch.tensor([4, 1, 2])))[0].item()
    assert alone[1] == 0.0 and together == pytest.approx(sum(alone) / 3, rel=1e-5) and together != 0


def test_a_rollout_without_a_success_trains_nothing_by_distillation(tiny_model_dir):
    """No sample reached the threshold: no teacher runs, the loss is 0 and its gradients are zeros (backward still runs)."""
    policy = HFPolicy.load(tiny_model_dir)
    batch = ScoredBatch(PROMPTS, ANSWERS, policy.encode(PROMPTS, ANSWERS), {"reward": torch.zeros(6)}, 3)
    objective = SDPO(teacher_model_kind="live")
    rollout = Rollout(batch)
    loss, metrics = objective.loss(policy, None, Minibatch(rollout, torch.arange(6)))
    loss.backward()
    assert rollout.prepared(objective, policy, None).teacher is None
    assert loss.item() == 0.0 and metrics["self_distillation/distillation_loss"] == 0.0
    assert metrics["self_distillation/reprompt_sample_fraction"] == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in policy.model.parameters() if p.requires_grad)


def run(tmp_path, *args, out="run"):
    return CliRunner().invoke(cli, ["run", "--device", "cpu", "--no-progress", "--output-dir", str(tmp_path / out), *args])


def test_sdpo_trains_from_the_cli_with_each_teacher(tmp_path, tiny_model_dir):
    """Each teacher starts as the policy itself: the first step's loss is the same whichever it is; after an update the policy
    (live) and its average (ema, rate 0.5) are other teachers than the starting policy (base)."""
    first, second = {}, {}
    for kind in ("base", "live", "ema"):
        result = run(tmp_path, "--objective", "sdpo", "--model", tiny_model_dir, "--reward", "noun-diversity", "--steps", "2",
                     "--batch-size", "2", "--samples-per-prompt", "4", "--lr", "1e-3", "--seed", "1", "-o", f"teacher_model_kind={kind}",
                     "-o", "teacher_update_rate=0.5", "-o", "success_reward_threshold=0", "-o", "distillation_weight=0.5", out=kind)
        assert result.exit_code == 0, result.output + repr(result.exception)
        lines = [json.loads(line) for line in open(tmp_path / kind / "metrics.jsonl")]
        assert [m["step"] for m in lines] == [1, 2]
        assert all(m["self_distillation/reprompt_sample_fraction"] == 1.0 and m["self_distillation/distillation_loss"] != 0 for m in lines)
        first[kind], second[kind] = lines[0]["loss"], lines[1]["loss"]
    assert first["live"] == pytest.approx(first["base"], rel=1e-5) and first["ema"] == pytest.approx(first["base"], rel=1e-5)
    assert second["live"] != pytest.approx(second["base"], rel=1e-4) and second["ema"] != pytest.approx(second["base"], rel=1e-4)


def test_sdpo_reads_the_feedback_column(tmp_path, tiny_model_dir):
    path = tmp_path / "feedback.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": "Name a fruit.", "privileged_context": "Name a red one."},
                                                           {"prompt": "Name an animal.", "privileged_context": "Name a big one."}]))
    result = run(tmp_path, "--objective", "sdpo", "--model", tiny_model_dir, "--reward", "noun-diversity", "--dataset", str(path),
                 "--steps", "1", "--batch-size", "2", "--samples-per-prompt", "2", "-o", "include_environment_feedback=true",
                 "-o", "use_successful_as_teacher=false")
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert metrics["self_distillation/feedback_used_fraction"] == 1.0 and metrics["self_distillation/reprompt_sample_fraction"] == 1.0


@pytest.mark.parametrize("args,message", [
    ([], "needs a reward: pass --reward NAME"),
    (["--reward", "noun-diversity", "-o", "distillation_alpha=0.5"], "set distillation_alpha=1"),
    (["--reward", "noun-diversity", "-o", "distillation_mode=topk_logits"], "give both (-o distillation_mode=topk_logits -o distillation_topk=100)"),
    (["--reward", "noun-diversity", "-o", "distillation_weight=2"], "distillation_weight must lie in [0, 1]"),
    (["--reward", "noun-diversity", "-o", "use_successful_as_teacher=false"], "no sample gets a teacher"),
    (["--reward", "noun-diversity", "-o", 'reprompt_template="{prompt} {feedback}"'], "must hold {solution}"),
    (["--reward", "noun-diversity", "-o", 'solution_template="{answer}"'], "is not a template of {successful_previous_attempt}"),
    (["--reward", "noun-diversity", "-o", "loss_type=cispo"], "loss_type must be one of dapo, grpo, bnpo, dr_grpo"),
    (["--reward", "noun-diversity", "-o", "include_environment_feedback=true"], "reads the column 'privileged_context'"),
    (["--reward", "noun-diversity", "--reference", "none"], "drop --reference none"),
    (["--reward", "noun-diversity", "--lora"], "teacher_model_kind=ema), but an adapter run's"),
])
def test_sdpo_mistakes_are_one_line_errors(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["run", "--device", "cpu", "--objective", "sdpo", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
