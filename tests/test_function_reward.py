"""`--reward FILE.py:FUNCTION`: a reward function of the user's, given the columns of each prompt's row it names (TRL's reward functions)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from pref.cli.main import cli
from pref.errors import PrefError
from pref.plugins.function_reward import FunctionReward
from pref.registry import load_registry

QA = [{"prompt": "Name a fruit.", "answer": "apple"}, {"question": "What color is the sky?", "answer": "blue"},
      {"prompt": [{"role": "user", "content": "Name an animal."}], "answer": "dog"}]


def write(path, text):
    path.write_text(text)
    return str(path)


def test_the_function_gets_the_columns_it_names_and_the_prompts_if_it_asks(tmp_path):
    file = write(tmp_path / "rewards.py", "def length(completions):\n    return [len(c) for c in completions]\n\n"
                                          "def exact(prompts, completions, answer, hint=None, **kwargs):\n"
                                          "    return torch.tensor([float(c == a) for c, a in zip(completions, answer)])\n\n"
                                          "import torch\n")
    length = FunctionReward(f"{file}:length")
    assert length.columns == () and length.score(["p", "q"], ["ab", "abc"])["reward"].tolist() == [2.0, 3.0]
    exact = load_registry().create("reward", f"{file}:exact")  # the registry knows FILE.py:FUNCTION as this reward
    assert isinstance(exact, FunctionReward) and exact.columns == ("answer",)  # a parameter with a default is no column
    assert exact.score(["p", "q"], ["4", "5"], answer=["4", "4"])["reward"].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("source, path, message", [
    ("def f(completions):\n    return [1.0]\n", "{file}", r"path must be FILE.py:FUNCTION"),
    ("def f(completions):\n    return [1.0]\n", "{file}x:f", r"path must be FILE.py:FUNCTION"),
    ("def f(completions):\n    return [1.0]\n", "{dir}/missing.py:f", r"no such file .*missing.py"),
    ("def f(completions):\n    return [1.0]\n", "{file}:g", r"defines no function 'g'"),
    ("import not_a_module\n", "{file}:f", r"importing .*rewards.py failed: ModuleNotFoundError: No module named 'not_a_module'"),
    ("def f(texts):\n    return [1.0]\n", "{file}:f", r"f in .* must take a `completions` parameter"),
])
def test_a_bad_function_is_a_one_line_error(tmp_path, source, path, message):
    file = write(tmp_path / "rewards.py", source)
    with pytest.raises(PrefError, match=message):
        FunctionReward(path.format(file=file, dir=tmp_path))


@pytest.mark.parametrize("returned, what", [("[1.0]", r"a tensor of shape \[1\]"), ("'good'", r"str good"), ("['x', 1.0]", r"list \['x', 1.0\]")])
def test_what_it_returns_must_be_one_number_per_completion(tmp_path, returned, what):
    file = write(tmp_path / f"r{abs(hash(returned))}.py", f"def f(completions):\n    return {returned}\n")
    with pytest.raises(PrefError, match=rf"the reward function f in .* gave {what}; it must return one number per completion \(2\)"):
        FunctionReward(f"{file}:f").score(["p", "q"], ["a", "b"])


def test_an_error_in_the_function_is_one_line_naming_where(tmp_path):
    file = write(tmp_path / "rewards.py", "def f(completions):\n    return [c[0]['content'] for c in completions]\n")  # TRL's chat completions
    with pytest.raises(PrefError, match=r"^the reward function f in .*rewards.py raised TypeError: string indices must be integers.* at line 2 of "
                                        r".*rewards.py; it gets each completion as a text, or as \[\{'role': 'assistant', 'content': text\}\] "
                                        r"where its prompt is chat messages$"):
        FunctionReward(f"{file}:f").score(["p"], ["an answer"])


def test_a_chat_prompts_completions_come_as_messages_and_an_async_function_is_awaited(tmp_path):
    """TRL's conversational reward functions run unchanged: a completion of a prompt that is chat messages comes as
    [{"role": "assistant", "content": text}], one of a text prompt as its text; an `async def` function is awaited."""
    file = write(tmp_path / "rewards.py", "import asyncio\n\n"
                                          "def shape(completions):\n"
                                          "    return [float(len(c[0]['content'])) if isinstance(c, list) else -float(len(c)) for c in completions]\n\n"
                                          "async def later(completions):\n"
                                          "    await asyncio.sleep(0)\n"
                                          "    return [1.0, None]\n")
    chat = [{"role": "user", "content": "Name a fruit."}]
    assert FunctionReward(f"{file}:shape").score([chat, "Name a tool."], ["pear", "hammer"])["reward"].tolist() == [4.0, -6.0]
    later = FunctionReward(f"{file}:later").score(["p", "q"], ["a", "b"])["reward"]
    assert later[0].item() == 1.0 and later[1].isnan()


def test_a_function_that_needs_what_only_trl_passes_is_refused_naming_it(tmp_path):
    file = write(tmp_path / "rewards.py", "def f(completions, environments):\n    return [1.0]\n\ndef g(completions, environments=None, **kw):\n"
                                          "    return [1.0]\n")
    with pytest.raises(PrefError, match=r"^function: f in .*rewards.py needs `environments`, which TRL's trainers pass and pref does not .*; "
                                        r"give that parameter a default, or take \*\*kwargs$"):
        FunctionReward(f"{file}:f")
    assert FunctionReward(f"{file}:g").columns == ()


def test_trainer_state_log_metric_and_log_extra_as_trl_passes_them(tmp_path):
    """A function naming them, or taking **kwargs, gets TRL's `trainer_state` (the steps the loop told the reward), `log_metric` (the
    figures' mean since the host last asked) and `log_extra` (one value per completion of the call); one that names none gets none."""
    file = write(tmp_path / "rewards.py", "def shaped(completions, trainer_state, log_metric, log_extra):\n"
                                          "    progress = trainer_state.global_step / trainer_state.max_steps\n"
                                          "    log_metric('progress', progress)\n"
                                          "    log_extra('length', [len(c) for c in completions])\n"
                                          "    return [progress] * len(completions)\n\n"
                                          "def loose(completions, **kwargs):\n"
                                          "    kwargs['log_metric']('given', float(sorted(kwargs) == ['log_extra', 'log_metric', 'prompts', 'trainer_state']))\n"
                                          "    return [0.0 if kwargs['trainer_state'] is None else 1.0] * len(completions)\n\n"
                                          "def plain(completions):\n"
                                          "    return [1.0] * len(completions)\n")
    shaped = FunctionReward(f"{file}:shaped")
    assert shaped.columns == ()
    shaped.at_step(3, 12)
    assert shaped.score(["p", "q"], ["a", "bcd"])["reward"].tolist() == [0.25, 0.25]
    shaped.at_step(6, 12)
    shaped.score(["p"], ["ab"])
    assert shaped.logged() == ({"progress": 0.375}, {"length": [2]})  # the mean of 0.25 and 0.5; the last call's column
    assert shaped.logged() == ({}, {})  # forgotten once asked
    with pytest.raises(PrefError, match=r"raised AttributeError: 'NoneType' object has no attribute 'global_step' at line 2 of .*rewards.py; "
                                        r"outside training \(pref eval\) its trainer_state is None: let it score without one$"):
        FunctionReward(f"{file}:shaped").score(["p"], ["a"])  # never told a step
    loose = FunctionReward(f"{file}:loose")
    assert loose.score(["p"], ["a"])["reward"].tolist() == [0.0]  # outside training, no trainer_state
    loose.at_step(0, 5)
    assert loose.score(["p"], ["a"])["reward"].tolist() == [1.0] and loose.logged() == ({"given": 1.0}, {})
    assert loose.report(["p"], ["a"])["reward/given"] == 1.0  # pref eval's figures hold what it logged
    both = load_registry().create("reward", "weighted", {"rewards": {f"{file}:shaped": 1.0, f"{file}:plain": 1.0}})
    both.at_step(1, 4)  # told to every part
    assert both.score(["p"], ["abc"])["reward"].tolist() == [1.25] and both.logged() == ({"progress": 0.25}, {"length": [3]})


def test_a_grpo_run_tells_the_steps_and_logs_what_the_function_logs(tmp_path, tiny_model_dir):
    """Two GRPO steps: the function sees global_step 0 then 1 of max_steps 2 (A*-PO's starting samples: 0), its figure is the step's
    `reward/progress` and its column is in each sample's --log-completions row; a figure named as pref's own, or a column of the wrong
    length, is a one-line error."""
    data = write(tmp_path / "qa.jsonl", "".join(json.dumps(row) + "\n" for row in QA))
    write(tmp_path / "rewards.py", "def shaped(completions, trainer_state, log_metric, log_extra, **kwargs):\n"
                                   "    log_metric('progress', trainer_state.global_step / trainer_state.max_steps)\n"
                                   "    log_extra('step_seen', [trainer_state.global_step] * len(completions))\n"
                                   "    return [float(len(c)) for c in completions]\n\n"
                                   "def clash(completions, log_metric):\n"
                                   "    log_metric('mean', 1.0)\n"
                                   "    return [1.0] * len(completions)\n\n"
                                   "def short(completions, log_extra):\n"
                                   "    log_extra('note', ['x'])\n"
                                   "    return [1.0] * len(completions)\n\n"
                                   "def over(completions, log_extra):\n"
                                   "    log_extra('prompt', ['x'] * len(completions))\n"
                                   "    return [1.0] * len(completions)\n")
    flags = ["--dataset", data, "--model", tiny_model_dir, "-k", "2", "--batch-size", "3", "--max-new-tokens", "4", "--device", "cpu",
             "--no-progress"]
    out = tmp_path / "grpo"
    result = CliRunner().invoke(cli, ["run", "--objective", "grpo", "--reward", f"{tmp_path}/rewards.py:shaped", *flags, "--steps", "2",
                                      "--log-completions", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert [m["reward/progress"] for m in map(json.loads, open(out / "metrics.jsonl"))] == [0.0, 0.5]
    assert [row["step_seen"] for row in map(json.loads, open(out / "completions.jsonl"))] == [0] * 6 + [1] * 6
    result = CliRunner().invoke(cli, ["run", "--objective", "a2po", "--reward", f"{tmp_path}/rewards.py:shaped", *flags, "--steps", "1",
                                      "-o", "num_value_samples=2", "--output-dir", str(tmp_path / "a2po")])  # samples before step 1 too
    assert result.exit_code == 0, result.output
    for name, message in [("clash", "logged a figure named 'mean', which pref logs itself as reward/mean: give it another name"),
                          ("short", "logged the column 'note' with 1 values; it needs one per completion of the call that logged it (6)"),
                          ("over", "logged a column named 'prompt', which each sample's logged row already holds (completion, prompt, "
                                   "reward, step): give it another name")]:
        result = CliRunner().invoke(cli, ["run", "--objective", "grpo", "--reward", f"{tmp_path}/rewards.py:{name}", *flags, "--steps", "1",
                                          "--output-dir", str(tmp_path / name)])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_online_runs_score_each_sample_with_its_own_rows_columns(tmp_path, tiny_model_dir, monkeypatch):
    """The function says 1.0 when the `answer` it got is the answer of the prompt it got: every sample, of every objective that samples
    (A*-PO's samples before training too), scores 1.0 only if the columns travel with their prompts."""
    data = write(tmp_path / "qa.jsonl", "".join(json.dumps(row) + "\n" for row in QA))
    answers = {json.dumps(row.get("prompt") or row.get("question")): row["answer"] for row in QA}
    seen = tmp_path / "seen.jsonl"
    write(tmp_path / "rewards.py", f"import json\nANSWERS = {answers!r}\n\n"
                                   "def matching(prompts, completions, answer):\n"
                                   f"    with open({str(seen)!r}, 'a') as f:\n"
                                   "        f.write(json.dumps(len(completions)) + '\\n')\n"
                                   "    return [float(ANSWERS[json.dumps(p)] == a) for p, a in zip(prompts, answer)]\n")
    monkeypatch.chdir(tmp_path)  # the reward is given by a relative path, recorded absolute for a resume from elsewhere
    for objective in ("grpo", "a2po"):
        out = tmp_path / objective
        result = CliRunner().invoke(cli, ["run", "--objective", objective, "--reward", "rewards.py:matching", "--dataset", data,
                                          "--model", tiny_model_dir, "-k", "2", "--batch-size", "3", "--steps", "1", "--max-new-tokens", "4",
                                          "--device", "cpu", "--log-completions", "--no-progress", "--output-dir", str(out)]
                                    + (["-o", "num_value_samples=2"] if objective == "a2po" else []))
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in open(out / "completions.jsonl")]
        assert {row["reward"] for row in rows} == {1.0}  # and --log-completions shows each sample's answer column
        assert all(row["answer"] == answers[json.dumps(row["prompt"])] for row in rows) and len(rows) == 6
        assert json.load(open(out / "run.json"))["config"]["reward"] == f"{tmp_path}/rewards.py:matching"
    assert [int(line) for line in open(seen)] == [6, 6, 6]  # grpo's step; a2po's 3 prompts x 2 before training, then its step


def test_rows_without_the_column_are_refused_before_the_model_loads(tmp_path, tiny_model_dir):
    reward = write(tmp_path / "rewards.py", "def exact(completions, answer):\n    return [float(c == a) for c, a in zip(completions, answer)]\n")
    data = write(tmp_path / "qa.jsonl", json.dumps(QA[0]) + "\n" + json.dumps({"prompt": "Name a tool."}) + "\n")
    flags = ["run", "--objective", "grpo", "--model", tiny_model_dir, "--steps", "1", "--output-dir", str(tmp_path / "run")]
    cases = [(["--reward", f"{reward}:exact", "--dataset", data], f"record 2 of --dataset {data} has no 'answer'"),
             (["--reward", f"{reward}:exact"], f"the reward {reward}:exact has no default prompts: pass --dataset with prompts"),
             (["--reward", f"{reward}:exact", "--reward", "repetition", "--dataset", data], "has no 'answer'")]  # a part of several
    for extra, message in cases:
        result = CliRunner().invoke(cli, [*flags, *extra])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    evaluated = CliRunner().invoke(cli, ["eval", "--reward", f"{reward}:exact", "--model", tiny_model_dir])
    assert evaluated.exit_code == 2 and "which --prompt texts do not have: pass --dataset with such rows" in evaluated.output


def test_a_reward_with_columns_and_default_prompts_still_needs_a_dataset():
    from pref.examples import PromptExample
    from pref.online import require_columns

    reward = SimpleNamespace(columns=("answer", "tests"))
    with pytest.raises(PrefError, match=r"^the reward r reads the column 'answer', 'tests' of each prompt's row: pass --dataset with such rows$"):
        require_columns(reward.columns, "the reward r", [], None)
    require_columns(reward.columns, "the reward r", [PromptExample("p", {"answer": 1, "tests": []})], "qa.jsonl")
    with pytest.raises(PrefError, match=r"record 2 of --dataset qa.jsonl has no 'tests'"):
        require_columns(reward.columns, "the reward r", [PromptExample("p", {"answer": 1, "tests": []}), PromptExample("q", {"answer": 2})], "qa.jsonl")


def test_several_rewards_give_each_part_its_own_columns(tmp_path):
    file = write(tmp_path / "rewards.py", "def exact(completions, answer):\n    return [float(c == a) for c, a in zip(completions, answer)]\n")
    reward = load_registry().create("reward", "weighted", {"rewards": {f"{file}:exact": 2.0, "repetition": 1.0}})
    assert reward.columns == ("answer",)
    scores = reward.score(["p", "q"], ["4", "the the the"], answer=["4", "4"])
    assert scores[f"{file}:exact/reward"].tolist() == [1.0, 0.0]
    assert torch.allclose(scores["reward"], 2 * scores[f"{file}:exact/reward"] + scores["repetition/reward"])


def test_the_readme_example_scores_gsm8k_rows(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    source = readme.split("```python\n# rewards.py\n", 1)[1].split("```", 1)[0]
    file = write(tmp_path / "rewards.py", source)
    reward = FunctionReward(f"{file}:accuracy")
    assert reward.columns == ("answer",)
    answer = "Natalia sold 48/2 = 24 clips in May.\n#### 72"
    assert reward.score(["q", "q"], ["She sold 72 clips.", "She sold 48."], answer=[answer, answer])["reward"].tolist() == [1.0, 0.0]


def test_eval_and_compare_answer_a_datasets_prompts_and_give_the_reward_their_columns(tmp_path, tiny_model_dir):
    data = write(tmp_path / "qa.jsonl", "".join(json.dumps(row) + "\n" for row in QA))
    answers = {json.dumps(row.get("prompt") or row.get("question")): row["answer"] for row in QA}
    reward = write(tmp_path / "rewards.py", f"import json\nANSWERS = {answers!r}\n\n"
                                            "def matching(prompts, completions, answer):\n"
                                            "    return [float(ANSWERS[json.dumps(p)] == a) for p, a in zip(prompts, answer)]\n")
    flags = ["--reward", f"{reward}:matching", "--dataset", data, "--max-new-tokens", "3", "--device", "cpu", "--json"]
    result = CliRunner().invoke(cli, ["eval", "--model", tiny_model_dir, *flags])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) | {"distinct_ratio": 0, "entropy_bits": 0} == {"samples": 3.0, "reward/mean": 1.0, "distinct_ratio": 0,
                                                                                    "entropy_bits": 0}  # one answer per row
    result = CliRunner().invoke(cli, ["compare", "--before", tiny_model_dir, "--after", tiny_model_dir, "-n", "7", *flags])
    assert result.exit_code == 0, result.output
    reports = json.loads(result.output)
    assert [(reports[side]["samples"], reports[side]["reward/mean"]) for side in ("before", "after")] == [(7.0, 1.0), (7.0, 1.0)]
    both = CliRunner().invoke(cli, ["eval", "--model", tiny_model_dir, *flags, "--prompt", "Hi."])
    assert both.exit_code == 2 and "--prompt and --dataset both give the prompts to answer: pass one of them" in both.output
    answers_only = CliRunner().invoke(cli, ["compare", "--before", "a", "--after", "b", "--dataset", data])
    assert answers_only.exit_code == 2 and "--dataset gives the prompts whose answers --reward NAME scores" in answers_only.output


def test_none_leaves_a_completion_unscored_and_several_rewards_sum_the_rest(tmp_path):
    """TRL's multi-task rewards: `math` scores the rows of kind "math" and gives None for the others, `code` the reverse. Weighted 2
    and 1: [2 x 1, 1 x 0.5, unscored by both -> NaN, 2 x 0]."""
    file = write(tmp_path / "rewards.py", "def math(completions, kind):\n    return [float(c == '4') if k == 'math' else None for c, k in zip(completions, kind)]\n\n"
                                          "def code(completions, kind):\n    return [0.5 if k == 'code' else None for k in kind]\n")
    kinds = ["math", "code", "poem", "math"]
    alone = FunctionReward(f"{file}:math").score(["p"] * 4, ["4", "4", "4", "5"], kind=kinds)["reward"]
    assert alone[[0, 3]].tolist() == [1.0, 0.0] and alone[[1, 2]].isnan().all()
    scores = load_registry().create("reward", "weighted", {"rewards": {f"{file}:math": 2.0, f"{file}:code": 1.0}}).score(
        ["p"] * 4, ["4", "4", "4", "5"], kind=kinds)
    assert scores["reward"][[0, 1, 3]].tolist() == [2.0, 0.5, 0.0] and scores["reward"][2].isnan()


def test_grpo_trains_past_unscored_samples_and_the_others_refuse_them(tmp_path, tiny_model_dir, caplog):
    """The function scores only the fruit prompt: grpo gives the other samples no advantage, logs them as null and warns once;
    online DPO (its selector compares every sample) and A*-PO (V* of every prompt, before training) stop with a one-line error."""
    data = write(tmp_path / "qa.jsonl", "".join(json.dumps(row) + "\n" for row in QA))
    reward = write(tmp_path / "rewards.py", "def fruit(completions, answer):\n    return [1.0 if a == 'apple' else None for a in answer]\n")
    flags = ["--reward", f"{reward}:fruit", "--dataset", data, "--model", tiny_model_dir, "-k", "2", "--batch-size", "3", "--steps", "1",
             "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]
    out = tmp_path / "grpo"
    result = CliRunner().invoke(cli, ["run", "--objective", "grpo", *flags, "--log-completions", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in open(out / "completions.jsonl")]
    assert sorted((row["answer"], row["reward"]) for row in rows if row["reward"] is not None) == [("apple", 1.0)] * 2
    assert sum(row["reward"] is None for row in rows) == 4
    assert [r.getMessage()[:48] for r in caplog.records if "unscored" in r.getMessage()] == ["the reward left 4 of 6 samples unscored (the fir"]
    assert json.loads(open(out / "metrics.jsonl").readline())["reward/mean"] == 1.0  # of the scored samples
    for objective, extra in [("online-dpo", []), ("a2po", ["-o", "num_value_samples=2"])]:
        result = CliRunner().invoke(cli, ["run", "--objective", objective, *flags, *extra, "--output-dir", str(tmp_path / objective)])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert "the reward left 4 of 6 samples unscored (a reward function's None, or NaN; the first: " in result.output
        assert f"and {'this objective' if objective == 'online-dpo' else 'objective a2po'} learns from every sample's reward" in result.output


def test_a_function_naming_completion_ids_gets_the_sampled_tokens_and_trls_overlong_reward_runs_as_is(tmp_path, tiny_model_dir):
    """TRL's DAPO soft overlong punishment (`trl.rewards.get_soft_overlong_punishment`, 4 tokens at most, the last 2 punished) reads
    `completion_ids` only: by hand, 3 tokens give (2 - 3) / 2 = -0.5 and 5 give -1. In a GRPO run each sample's ids are the
    tokens sampled (the text is their decoding) and its logged reward is TRL's of them; a weighted sum hands its part the ids,
    and `pref eval` tokenizes its answers again for it."""
    from transformers import AutoTokenizer

    pytest.importorskip("trl")
    seen = tmp_path / "ids.jsonl"
    write(tmp_path / "rewards.py", "import json\nfrom trl.rewards import get_soft_overlong_punishment\n\n"
                                   "overlong = get_soft_overlong_punishment(max_completion_len=4, soft_punish_cache=2)\n\n"
                                   "def recorded(completions, completion_ids):\n"
                                   f"    with open({str(seen)!r}, 'a') as f:\n"
                                   "        f.write(json.dumps([completions, completion_ids]) + '\\n')\n"
                                   "    return overlong(completion_ids)\n")
    trl_reward = FunctionReward(f"{tmp_path}/rewards.py:overlong")
    assert trl_reward.reads_completion_ids and trl_reward.columns == ()
    assert trl_reward.score(["p", "q", "r"], ["a", "b", "c"], completion_ids=[[7] * 3, [7] * 5, [7, 7]])["reward"].tolist() == [-0.5, -1.0, 0.0]
    both = load_registry().create("reward", "weighted", {"rewards": {f"{tmp_path}/rewards.py:overlong": 1.0, "repetition": 1.0}})
    assert both.reads_completion_ids
    assert both.score(["p"], ["a b"], completion_ids=[[7] * 3])[f"{tmp_path}/rewards.py:overlong/reward"].tolist() == [-0.5]

    data = write(tmp_path / "qa.jsonl", "".join(json.dumps(row) + "\n" for row in QA))
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", "--objective", "grpo", "--reward", f"{tmp_path}/rewards.py:recorded", "--dataset", data,
                                      "--model", tiny_model_dir, "-k", "2", "--batch-size", "3", "--steps", "1", "--max-new-tokens", "6",
                                      "--device", "cpu", "--log-completions", "--no-progress", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    given, ids = json.loads(seen.read_text())
    texts = [c[0]["content"] if isinstance(c, list) else c for c in given]  # a chat prompt's completions come as messages
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(ids) == 6 and all(1 <= len(row) <= 6 for row in ids)
    assert [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids] == [text.strip() for text in texts]
    logged = sorted((row["completion"], row["reward"]) for row in map(json.loads, open(out / "completions.jsonl")))
    assert logged == sorted(zip(texts, FunctionReward(f"{tmp_path}/rewards.py:overlong").score([""] * 6, texts, completion_ids=ids)["reward"].tolist()))
    evaluated = CliRunner().invoke(cli, ["eval", "--model", tiny_model_dir, "--reward", f"{tmp_path}/rewards.py:overlong", "--prompt", "Hi",
                                         "--samples", "2", "--max-new-tokens", "6", "--device", "cpu"])
    assert evaluated.exit_code == 0 and "reward/mean" in evaluated.output, evaluated.output
