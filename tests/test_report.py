"""`pref report`: the figures of runs, checked through matplotlib's objects, the HTML file, and its errors;
`pref eval` and `pref compare`: a reward's report on a model's samples."""

import base64
import json
import math
import os
import re

import matplotlib
import pytest
from click.testing import CliRunner

matplotlib.use("Agg")

from pref.cli.main import cli  # noqa: E402
from pref.config import build_config  # noqa: E402
from pref.errors import PrefError  # noqa: E402
from pref.interfaces import SamplingConfig  # noqa: E402
from pref.registry import load_registry  # noqa: E402
from pref.reporting.evaluate import sample_answers  # noqa: E402
from pref.reporting.figures import answers_figure, smoothed  # noqa: E402
from pref.reporting.report import make_report, report_figures  # noqa: E402
from pref.reporting.runs import load_run, load_runs  # noqa: E402
from pref.train import train  # noqa: E402


def online_rows(steps, seed):
    """metrics.jsonl rows as an online DivPO run logs them (the keys pref's loop and plugins write)."""
    rows = []
    for step in range(1, steps + 1):
        rows.append({
            "step": step, "loss": 3.0 - 0.01 * step - 0.1 * seed, "loss/dpo": 0.69 - 0.001 * step, "nll_loss": 2.3,
            "rewards/chosen": 0.01 * step, "rewards/rejected": -0.005 * step, "rewards/accuracies": min(1.0, 0.5 + 0.02 * step),
            "rewards/margins": 0.015 * step, "reward/mean": 0.5 + 0.01 * step, "reward/std": 0.3, "reward/max": 1.0,
            "samples/distinct_ratio": 0.4 + 0.005 * step + 0.01 * seed, "samples/entropy": 3.0 + 0.02 * step,
            "time/sampling": 0.2, "time/scoring": 0.1, "time/update": 0.25, "pairs/usable_fraction": 1.0,
            "grad_norm": 2.0 - 0.01 * step, "lr": 5e-4 * (1 - step / steps),
        })
    return rows


def write_run(path, rows, config=None, best=None):
    os.makedirs(path)
    with open(os.path.join(path, "run.json"), "w") as f:
        json.dump({"config": {"objective": "divpo", "model": None, "steps": len(rows), "seed": 0, **(config or {})},
                   "versions": {"pref": "0.1.0"}, "plugins": []}, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    if best:
        with open(os.path.join(path, "best.json"), "w") as f:
            json.dump(best, f)
    return str(path)


def figures_by_name(runs, smooth=1):
    return {name: figure for name, _, figure in report_figures(runs, smooth)}


def axes_by_title(figure):
    return {axes.get_title(): axes for axes in figure.axes}


def test_one_online_run_draws_its_panels_and_no_others(tmp_path):
    run = load_run(write_run(tmp_path / "divpo", online_rows(20, seed=0)))
    figures = figures_by_name([run])
    assert list(figures) == ["loss", "rewards", "samples", "optimizer", "time"]  # no validation, curriculum, gold

    loss = axes_by_title(figures["loss"])["training loss"]
    assert [line.get_label() for line in loss.get_lines()] == ["loss", "loss/dpo", "nll_loss"]
    assert list(loss.get_lines()[0].get_xdata()) == list(range(1, 21))
    assert loss.get_lines()[0].get_ydata()[0] == pytest.approx(2.99)
    assert loss.get_xlabel() == "step" and loss.get_legend() is not None

    rewards = axes_by_title(figures["rewards"])
    assert set(rewards) == {"rewards/margins", "rewards/accuracies", "rewards/chosen and rewards/rejected"}
    assert [line.get_label() for line in rewards["rewards/chosen and rewards/rejected"].get_lines()] == ["chosen", "rejected"]
    assert rewards["rewards/accuracies"].get_ylim() == pytest.approx((-0.02, 1.02))

    samples = axes_by_title(figures["samples"])
    assert set(samples) == {"reward of the samples (mean +/- std)", "distinct answers / answers", "entropy of the answers"}
    sample = samples["reward of the samples (mean +/- std)"]
    (band,) = sample.collections  # the +/- std band around the mean
    lowest = band.get_paths()[0].vertices[:, 1].min()
    assert lowest == pytest.approx(0.51 - 0.3)

    time = axes_by_title(figures["time"])
    assert [line.get_label() for line in time["seconds per step (log scale)"].get_lines()] == ["sampling", "scoring", "update"]
    bars = time["median seconds per step"].patches
    assert [bar.get_height() for bar in bars] == pytest.approx([0.2, 0.1, 0.25])
    assert bars[2].get_y() == pytest.approx(0.3)  # stacked


def test_two_runs_share_the_axes_with_a_legend(tmp_path):
    runs = load_runs([write_run(tmp_path / "seed0", online_rows(10, 0)), write_run(tmp_path / "seed1", online_rows(14, 1))])
    figures = figures_by_name(runs)
    distinct = axes_by_title(figures["samples"])["distinct answers / answers"]
    lines = distinct.get_lines()
    assert [line.get_label() for line in lines] == ["seed0", "seed1"]
    assert [len(line.get_xdata()) for line in lines] == [10, 14]
    assert lines[0].get_color() != lines[1].get_color()
    assert [text.get_text() for text in distinct.get_legend().get_texts()] == ["seed0", "seed1"]
    loss = axes_by_title(figures["loss"])["training loss"]
    assert len(loss.get_lines()) == 6 and loss.get_lines()[1].get_label() == "seed0: loss/dpo"
    assert loss.get_lines()[0].get_linestyle() != loss.get_lines()[1].get_linestyle()  # colour per run, style per metric
    assert [tick.get_text() for tick in axes_by_title(figures["time"])["median seconds per step"].get_xticklabels()] == ["seed0", "seed1"]


def reward_model_rows(steps, old_names=False):
    """metrics.jsonl rows of a reward-model run; `old_names`: as pref logged its scores before they were renamed."""
    chosen, rejected = ("rewards/chosen", "rewards/rejected") if old_names else ("chosen_reward", "rejected_reward")
    return [{"step": step, "loss": 0.7 - 0.01 * step, "accuracy": 0.6, "margin": 0.1 * step, chosen: 0.05 * step, rejected: -0.05 * step,
             "mean_reward": 0.0, "min_reward": -1.0, "max_reward": 1.0} for step in range(1, steps + 1)]


def test_reward_model_scores_have_their_own_panel_not_the_implicit_rewards(tmp_path):
    old = write_run(tmp_path / "old", reward_model_rows(3, old_names=True), config={"objective": "reward-model"})
    new = write_run(tmp_path / "new", reward_model_rows(4), config={"objective": "reward-model"})
    figures = figures_by_name(load_runs([old, new]))
    assert "rewards" not in figures  # a score head's outputs are not DPO's implicit rewards
    plots = axes_by_title(figures["reward-model"])
    assert set(plots) == {"accuracy", "margin", "chosen_reward and rejected_reward", "min, mean and max reward"}
    scores = plots["chosen_reward and rejected_reward"].get_lines()
    assert [line.get_label() for line in scores] == ["old: chosen", "old: rejected", "new: chosen", "new: rejected"]
    assert list(scores[0].get_ydata()) == pytest.approx([0.05, 0.1, 0.15])  # the old run's rewards/chosen, under today's name


def test_a_run_logged_before_the_nll_term_was_renamed_plots_beside_a_new_one(tmp_path):
    old_rows = [{("loss/sft" if key == "nll_loss" else key): value for key, value in row.items()} for row in online_rows(3, 0)]
    runs = load_runs([write_run(tmp_path / "old", old_rows), write_run(tmp_path / "new", online_rows(3, 1))])
    assert [run.keys().count("nll_loss") for run in runs] == [1, 1] and not runs[0].has("loss/sft")
    loss = axes_by_title(figures_by_name(runs)["loss"])["training loss"]
    labels = [line.get_label() for line in loss.get_lines()]
    assert labels.count("old: nll_loss") == labels.count("new: nll_loss") == 1 and "old: loss/sft" not in labels


def test_runs_with_the_same_folder_name_are_told_apart(tmp_path):
    runs = load_runs([write_run(tmp_path / "a" / "run", online_rows(3, 0)), write_run(tmp_path / "b" / "run", online_rows(3, 0))])
    assert [run.name for run in runs] == ["a/run", "b/run"]


def test_a_run_given_twice_is_reported_once_in_the_order_given(tmp_path):
    first, second = write_run(tmp_path / "a", online_rows(3, 0)), write_run(tmp_path / "b", online_rows(3, 1))
    os.makedirs(os.path.join(first, "final"))
    os.symlink(first, tmp_path / "link")
    runs = load_runs([second, first, first + os.sep, os.path.join(first, "final"), str(tmp_path / "link"), second])
    assert [run.name for run in runs] == ["b", "a"]


def test_smoothing_is_a_trailing_mean():
    assert smoothed([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smoothed([1.0, 3.0], 1) == [1.0, 3.0]


def test_smoothed_report_draws_the_trailing_mean(tmp_path):
    run = load_run(write_run(tmp_path / "run", online_rows(10, 0)))
    loss = axes_by_title(figures_by_name([run], smooth=4)["loss"])["training loss"].get_lines()[0]
    assert loss.get_ydata()[5] == pytest.approx(sum(3.0 - 0.01 * s for s in range(3, 7)) / 4)


def test_curriculum_validation_and_gold_panels(tmp_path):
    rows = []
    for step in range(1, 11):
        row = {"step": step, "loss": 1.0, "curriculum/weight/easy.jsonl": 0.3 + 0.01 * step, "curriculum/weight/hard.jsonl": 0.7 - 0.01 * step,
               "curriculum/difficulty/easy.jsonl": 0.1, "curriculum/difficulty/hard.jsonl": 0.9,
               "gold/labels_spent": float(4 * (step // 3)), "eval/gold_reward": 0.1 * step, "discriminator/accuracy": math.nan}
        if step % 5 == 0:
            row["validation/loss"] = 1.0 / step
            row["eval/reward"] = 0.05 * step  # an online run's reward on its held-out prompts
        rows.append(row)
    run = load_run(write_run(tmp_path / "run", rows, best={"step": 10, "validation_loss": 0.1, "measure": "objective loss"}))
    figures = figures_by_name([run])
    weights = axes_by_title(figures["curriculum"])["sampling weight per dataset"]
    assert [line.get_label() for line in weights.get_lines()] == ["easy.jsonl", "hard.jsonl"]

    validation = axes_by_title(figures["validation"])["validation/loss (dotted: the best/ step)"]
    points, best = validation.get_lines()
    assert list(points.get_xdata()) == [5, 10] and points.get_marker() == "o"
    assert list(best.get_xdata()) == [10, 10] and best.get_label() == "best/: step 10"
    (held_out,) = axes_by_title(figures["validation"])["reward on the held-out prompts"].get_lines()
    assert list(held_out.get_xdata()) == [5, 10] and list(held_out.get_ydata()) == [0.25, 0.5] and held_out.get_marker() == "o"

    gold = axes_by_title(figures["gold"])
    assert set(gold) == {"gold reward of the samples"}  # accuracy was never a number: no empty plot
    curve = gold["gold reward of the samples"]
    assert curve.get_xlabel() == "gold labels spent"
    (line,) = curve.get_lines()  # one point per count of labels spent: the mean gold reward of its steps
    assert list(line.get_xdata()) == [0.0, 4.0, 8.0, 12.0]
    assert list(line.get_ydata()) == pytest.approx([0.15, 0.4, 0.7, 0.95])


def test_html_is_self_contained_and_the_pngs_lie_beside_it(tmp_path):
    run_dir = write_run(tmp_path / "divpo", online_rows(5, 0))
    written = make_report([run_dir], str(tmp_path / "out" / "report.html"))
    page = open(written[0]).read()
    assert written[1:] == [str(tmp_path / "out" / f"report-{name}.png") for name in
                           ("loss", "rewards", "samples", "optimizer", "time")]
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == 5 and base64.b64decode(embedded[0]) == open(written[1], "rb").read()
    assert not re.search(r'(src|href)="(http|//)', page)  # nothing fetched from elsewhere
    assert "<td>divpo</td>" in page and "<td>pref-default</td>" in page and "<td>5</td>" in page


def test_report_errors_are_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 2 and result.output.strip().startswith("Error:") and "not a pref run folder" in result.output
    assert len(result.output.strip().splitlines()) == 1
    empty = write_run(tmp_path / "empty", [])
    result = runner.invoke(cli, ["report", empty])
    assert result.exit_code == 2 and "no logged metrics" in result.output
    with pytest.raises(PrefError, match="--smooth"):
        make_report([empty], str(tmp_path / "r.html"), smooth=0)
    (tmp_path / "empty" / "run.json").write_text('{"config": {"objec')  # damaged: was a JSONDecodeError traceback
    result = runner.invoke(cli, ["report", empty])
    assert result.exit_code == 2 and "is not a pref run record" in result.output


def test_a_report_replaces_only_its_own_files(tmp_path):
    run_dir = write_run(tmp_path / "divpo", online_rows(3, 0))
    runner = CliRunner()
    (tmp_path / "folder.html").mkdir()
    (tmp_path / "notes.html").write_text("<html>my notes</html>")
    (tmp_path / "lonely-loss.png").write_bytes(b"my figure")
    for output, message in [("folder.html", "is a folder; give the report's file name"),  # was an IsADirectoryError traceback
                            ("notes.html", "exists and is not a pref report; give another name"),
                            ("lonely.html", "lonely-loss.png exists and would be replaced by a figure of the report"),
                            ("divpo/run.json/r.html", "is a file, not a folder")]:
        result = runner.invoke(cli, ["report", run_dir, "--output", str(tmp_path / output)])
        assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output, result.output
    assert (tmp_path / "notes.html").read_text() == "<html>my notes</html>" and (tmp_path / "lonely-loss.png").read_bytes() == b"my figure"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["divpo", "folder.html", "lonely-loss.png", "notes.html"]  # nothing written
    first = make_report([run_dir], str(tmp_path / "r.html"))
    assert make_report([run_dir], str(tmp_path / "r.html")) == first  # a report of pref's, and its PNGs, are replaced


@pytest.mark.parametrize("name, content, message", [
    ("best.json", "{bad", "best.json is not a pref best-model record"),  # was a JSONDecodeError traceback
    ("best.json", '"a string"', "best.json is not a pref best-model record"),  # was a TypeError
    ("run.json", '{"config": [1]}', "run.json is not a pref run record"),
    ("run.json", '{"config": {}, "resumes": [{"step": 1}]}', "run.json is not a pref run record"),  # was a KeyError
])
def test_damaged_run_files_are_one_line_errors(tmp_path, name, content, message):
    run_dir = write_run(tmp_path / "run", online_rows(3, 0))
    (tmp_path / "run" / name).write_text(content)
    result = CliRunner().invoke(cli, ["report", run_dir, "--output", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output, result.output


def test_odd_metric_and_generation_rows_are_skipped_and_a_missing_path_is_not_its_parent(tmp_path):
    rows = online_rows(3, 0)
    run_dir = write_run(tmp_path / "run", [*rows, {"step": "x", "loss": 1.0}, {"loss": 2.0}])
    with open(os.path.join(run_dir, "metrics.jsonl"), "ab") as f:
        f.write(b'\xff\xfe{"step": 9}\n[1]\n')
    (tmp_path / "run" / "generations.jsonl").write_text('{"step": 3, "prompt": "Hi", "text": "Hello"}\n{"step": 4}\n')
    run = load_run(run_dir)
    assert [row["step"] for row in run.rows] == [1, 2, 3] and run.generations == [{"step": 3, "prompt": "Hi", "text": "Hello"}]
    assert "<td>Hello</td>" in open(make_report([run_dir], str(tmp_path / "r.html"))[0]).read()
    (tmp_path / "run" / "final").mkdir()
    assert load_run(str(tmp_path / "run" / "final")).path == run_dir  # a folder in a run: the run
    with pytest.raises(PrefError, match="fnial does not exist"):  # was the run above it
        load_run(str(tmp_path / "run" / "fnial"))


def test_the_progress_bar_is_not_among_a_runs_options(tmp_path):
    from pref.reporting.summary import summary

    run = load_run(write_run(tmp_path / "run", online_rows(3, 0), config={"progress": False, "lr": 0.01}))
    assert "progress" not in summary(run)["options"] and "lr=0.01" in summary(run)["options"]


def test_answers_before_and_after_as_bars():
    before = ["cat"] * 6 + ["dog"] * 3 + ["Cat "]
    after = ["cat", "dog", "tree", "lamp", "cup", "cat", "door", "rock", "book", "pen"]
    figure = answers_figure(before, after, top=3)
    (axes,) = figure.axes
    labels = [tick.get_text() for tick in axes.get_yticklabels()]
    assert labels[0] == "cat" and labels[-1] == "(all other answers)"
    first, second = axes.containers
    assert first.datavalues[0] == pytest.approx(0.7) and second.datavalues[0] == pytest.approx(0.2)
    assert first.datavalues[-1] == pytest.approx(0.0) and sum(second.datavalues) == pytest.approx(1.0)
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["before (2 distinct in 10)", "after (9 distinct in 10)"]


def test_report_of_a_real_run(tmp_path, tiny_model_dir, prefs_file):
    """A short DPO run with held-out data, through the command line: every panel it has data for, the model card."""
    config = build_config(flags={"objective": "dpo", "model": tiny_model_dir, "dataset": [prefs_file], "steps": 4, "batch_size": 2,
                                 "device": "cpu", "validation_split": 0.34, "eval_every": 2, "output_dir": str(tmp_path / "dpo")})
    out = train(config, load_registry())
    result = CliRunner().invoke(cli, ["report", out, out + "/final", "--output", str(tmp_path / "report" / "r.html")])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / "report")) == sorted(["r.html", *(f"r-{n}.png" for n in ("loss", "rewards", "validation", "optimizer", "time"))])
    run = load_run(out)
    figures = figures_by_name([run, run])
    margins = axes_by_title(figures["rewards"])["rewards/margins"]
    assert len(margins.get_lines()) == 2 and list(margins.get_lines()[0].get_xdata()) == [1, 2, 3, 4]
    validation = axes_by_title(figures["validation"])["validation/loss (dotted: the best/ step)"]
    assert list(validation.get_lines()[0].get_xdata()) == [2, 4]
    assert any(line.get_label().endswith(f"best/ step {run.best['step']}") for line in validation.get_lines())

    from huggingface_hub import ModelCard

    card = ModelCard.load(os.path.join(out, "final", "README.md"))
    assert card.data.base_model == tiny_model_dir and card.data.library_name == "transformers"
    assert card.data.tags == ["pref", "dpo", "preference-optimization"] and card.data.pipeline_tag == "text-generation"
    assert card.data.datasets is None  # a local file is not a Hub dataset
    assert f"| `loss` | {run.last('loss'):.4g} | 4 |" in card.text
    command = (f"pref run --objective dpo --dataset {prefs_file} --model {tiny_model_dir} --seed 0 --steps 4 --batch-size 2 "
               "--eval-every 2 --validation-split 0.34\n```")
    assert command in card.text and "run-config.yaml" not in card.text  # it held max_new_tokens 32, though the run sampled nothing


def test_unique_valid_answers_get_a_plot_when_a_reward_logs_them(tmp_path):
    rows = [{"step": s, "loss": 1.0, "samples/distinct_ratio": 0.5, "samples/unique_valid": float(s)} for s in (1, 2, 3)]
    samples = axes_by_title(figures_by_name([load_run(write_run(tmp_path / "run", rows))])["samples"])
    assert set(samples) == {"distinct answers / answers", "unique valid answers"}  # no reward/entropy logged: no such plots
    assert list(samples["unique valid answers"].get_lines()[0].get_ydata()) == [1.0, 2.0, 3.0]


def test_answer_lengths_get_plots_of_their_own(tmp_path):
    rows = [{"step": s, "loss": 1.0, "reward/mean": 0.5, "reward/std": 0.1, "completions/mean_length": 10.0 + s, "completions/min_length": 3.0,
             "completions/max_length": 32.0, "completions/mean_terminated_length": 9.0, "completions/clipped_ratio": 0.25} for s in (1, 2, 3)]
    samples = axes_by_title(figures_by_name([load_run(write_run(tmp_path / "run", rows))])["samples"])
    lengths = samples["answer length (TRL's completions/*)"]
    assert [line.get_label() for line in lengths.get_lines()] == ["mean", "min", "max", "mean of those that ended"]
    assert list(lengths.get_lines()[0].get_ydata()) == [11.0, 12.0, 13.0]
    assert samples["answers cut by the sampling limit"].get_ylim() == (-0.02, 1.02)


def test_distillation_runs_get_their_terms_entropy_and_teacher_shares(tmp_path):
    """An sdpo run (terms, re-prompted shares) beside a distill iw_opd run (entropy, weights): one panel, each plot with the lines
    some run has; grpo's `entropy` alone would draw the entropy plot only."""
    sdpo = [{"step": s, "loss": 0.5, "self_distillation/distillation_loss": 0.4 - 0.1 * s, "self_distillation/policy_loss": -0.1,
             "self_distillation/reprompt_sample_fraction": 0.25 * s, "self_distillation/success_sample_fraction": 0.25 * s,
             "self_distillation/success_group_fraction": 0.5, "self_distillation/feedback_used_fraction": 0.0} for s in (1, 2, 3)]
    iw_opd = [{"step": s, "loss": 0.2, "entropy": 2.0 - 0.1 * s, "iw_opd/mean_weight": 1.2, "iw_opd/min_weight": 1.0,
               "iw_opd/max_weight": 1.5} for s in (1, 2, 3)]
    runs = [load_run(write_run(tmp_path / "sdpo", sdpo, {"objective": "sdpo"})), load_run(write_run(tmp_path / "iw", iw_opd, {"objective": "distill"}))]
    plots = axes_by_title(figures_by_name(runs)["distillation"])
    assert set(plots) == {"distillation and policy terms", "entropy of the policy", "SDPO: samples with a teacher", "IW-OPD: position weights"}
    shares = plots["SDPO: samples with a teacher"]
    assert shares.get_ylim() == (-0.02, 1.02) and list(shares.get_lines()[0].get_ydata()) == [0.25, 0.5, 0.75]
    assert [line.get_label() for line in plots["IW-OPD: position weights"].get_lines()] == ["iw: mean", "iw: min", "iw: max"]
    assert [line.get_label() for line in plots["distillation and policy terms"].get_lines()] == [
        "sdpo: self_distillation/distillation_loss", "sdpo: self_distillation/policy_loss"]
    assert "distillation" not in figures_by_name([load_run(write_run(tmp_path / "plain", online_rows(3, 0)))])
    gold = [{"step": s, "loss": 1.0, "uld/distillation_loss": 1.0 / s, "uld/aligned_groups": 4.0, "matched_loss": 0.2, "unmatched_loss": 0.9}
            for s in (1, 2)]
    [terms] = [p for title, p in axes_by_title(figures_by_name([load_run(write_run(tmp_path / "gold", gold, {"objective": "gold"}))])
                                               ["distillation"]).items()]
    assert [line.get_label() for line in terms.get_lines()] == ["uld/distillation_loss", "matched_loss", "unmatched_loss"]
    assert list(terms.get_lines()[0].get_ydata()) == [1.0, 0.5]
    # an sdft run logged before 2026-12-02, under `distillation_loss`, plots under TRL's name
    old = load_run(write_run(tmp_path / "old-sdft", [{"step": s, "loss": 0.3, "distillation_loss": 0.3} for s in (1, 2)], {"objective": "sdft"}))
    [line] = axes_by_title(figures_by_name([old])["distillation"])["distillation and policy terms"].get_lines()
    assert line.get_label() == "self_distillation/distillation_loss" and list(line.get_ydata()) == [0.3, 0.3]


def test_what_a_reward_function_logged_gets_a_plot_of_its_own(tmp_path):
    rows = [{"step": s, "loss": 1.0, "reward/mean": 0.5, "reward/std": 0.1, "reward/max": 1.0, "reward/progress": s / 3} for s in (1, 2, 3)]
    samples = axes_by_title(figures_by_name([load_run(write_run(tmp_path / "run", rows))])["samples"])
    assert set(samples) == {"reward of the samples (mean +/- std)", "what the reward logged"}
    [line] = samples["what the reward logged"].get_lines()  # pref's own reward figures are not among them
    assert line.get_label() == "reward/progress" and list(line.get_ydata()) == [1 / 3, 2 / 3, 1.0]


def test_compare_draws_the_answers_before_and_after(tmp_path, tiny_model_dir):
    figure = tmp_path / "figs" / "answers.png"
    args = ["compare", "--before", tiny_model_dir, "--after", tiny_model_dir, "--reward", "repetition", "--samples", "12",
            "--max-new-tokens", "4", "--json", "--figure", str(figure)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(result.stdout)["before"] == json.loads(result.stdout)["after"]  # the same model, the same seed
    assert CliRunner().invoke(cli, args).exit_code == 0  # its own figure, drawn again

    # a PNG pref did not draw is not replaced, and the error comes before any sampling
    mine = tmp_path / "mine.png"
    answers_figure(["a"], ["b"], ("x", "y")).savefig(mine)
    before = mine.read_bytes()
    result = CliRunner().invoke(cli, [*args[:-1], str(mine)])
    assert result.exit_code == 2 and mine.read_bytes() == before
    assert result.stderr.splitlines()[-1] == (f"Error: --figure {mine} exists and is not a figure pref compare drew; give another name "
                                              "(pref replaces only figures it drew)")


def test_eval_reports_the_reward_over_the_samples_asked_for(tiny_model_dir):
    args = ["eval", "--model", tiny_model_dir, "--reward", "repetition", "--samples", "6", "--max-new-tokens", "4", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["samples"] == 6.0


def test_sampled_answers_keep_every_prompt_when_cut_to_the_count():
    class Echo:
        def generate(self, prompts, k, sampling):
            return [[f"{p}{i}" for i in range(k)] for p in prompts]

    prompts, answers = sample_answers(Echo(), ["a", "b", "c"], 4, SamplingConfig(max_new_tokens=1))  # 2 per prompt drawn, 4 kept
    assert prompts == ["a", "b", "c", "a"] and answers == ["a0", "b0", "c0", "a1"]


def test_compare_json_needs_a_reward():
    result = CliRunner().invoke(cli, ["compare", "--before", "a", "--after", "b", "--prompt", "hi", "--json"])
    assert result.exit_code == 2 and "--json prints the reports under --reward NAME: pass --reward too" in result.output  # was a table, exit 0


def test_compare_figure_needs_a_reward_and_a_png_name(tmp_path):
    result = CliRunner().invoke(cli, ["compare", "--before", "a", "--after", "b", "--prompt", "hi", "--figure", str(tmp_path / "f.png")])
    assert result.exit_code == 2 and "pass --reward too" in result.output
    result = CliRunner().invoke(cli, ["compare", "--before", "a", "--after", "b", "--reward", "repetition", "--figure", str(tmp_path / "f.svg")])
    assert result.exit_code == 2 and "ending in .png" in result.output


def test_throughput_is_drawn_for_any_run_and_the_time_split_only_for_online_ones(tmp_path):
    rows = [{"step": s, "loss": 1.0, "time/update": 0.1, "tokens/per_second": 1000.0 + s} for s in (1, 2, 3)]
    time = axes_by_title(figures_by_name([load_run(write_run(tmp_path / "offline", rows))])["time"])
    assert set(time) == {"tokens per second"}
    assert list(time["tokens per second"].get_lines()[0].get_ydata()) == [1001.0, 1002.0, 1003.0]
    online = load_run(write_run(tmp_path / "online", online_rows(3, 0)))
    assert set(axes_by_title(figures_by_name([online])["time"])) == {"seconds per step (log scale)", "median seconds per step"}


def test_sampling_commands_load_the_model_on_the_device_and_in_the_dtype_asked_for(tiny_model_dir):
    import torch

    from pref.cli.main import Loading, load_policy

    policy = load_policy(tiny_model_dir, Loading("cpu", "bfloat16"))
    assert {p.dtype for p in policy.model.parameters()} == {torch.bfloat16} and policy.device.type == "cpu"
    assert {p.dtype for p in load_policy(tiny_model_dir).model.parameters()} == {torch.float32}  # auto on a CPU
    result = CliRunner().invoke(cli, ["generate", "--model", tiny_model_dir, "--prompt", "Name a fruit.", "--max-new-tokens", "3",
                                      "--device", "cpu", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("> Name a fruit.\n")
