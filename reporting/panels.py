"""The panels of a report: which logged metrics each figure draws, and how.

A `Panel` is one figure (one PNG), made of `Plot`s side by side (one axes each).
`panels_for(runs)` keeps the panels and plots that at least one run has data for.
Metric names are the ones pref logs into metrics.jsonl: TRL's names for DPO-style
rewards (`rewards/margins`, ...) and a reward model's scores (`margin`, `mean_reward`, ...),
`reward/*` and `samples/*` for online samples (`reward/NAME`: a reward function's `log_metric`),
`time/*` for the step's time split, `curriculum/weight/NAME`, `validation/loss`, `eval/reward`,
D2PO's `gold/labels_spent` and `eval/gold_reward`, and the distillation objectives' TRL names (`entropy`,
`self_distillation/*`, `iw_opd/*`, `uld/*`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pref.reporting.runs import Run

UNIT = (-0.02, 1.02)  # y limits of shares and accuracies


@dataclass(frozen=True)
class Line:
    """One metric drawn against the plot's x metric; `band`: a metric drawn as +/- around it (a std)."""

    key: str
    label: str
    band: str | None = None


@dataclass(frozen=True)
class Plot:
    """One axes of a panel.

    x: `step`, or a metric logged on the same rows (D2PO's gold labels spent): then each point is the
        mean of the plot's metric over the rows at one value of `x`, drawn with markers.
    sparse: values logged at a few steps only (evaluations): drawn with markers, never smoothed.
    best: mark each run's `best/` step (best.json) with a vertical line.
    bars: draw the median of each line per run as one stacked bar per run (a time split).
    log: a logarithmic y axis (times: a slow first step must not flatten the rest).
    """

    title: str
    lines: tuple[Line, ...]
    ylabel: str = ""
    x: str = "step"
    xlabel: str = "step"
    ylim: tuple[float, float] | None = None
    sparse: bool = False
    best: bool = False
    bars: bool = False
    log: bool = False

    def has_data(self, runs: list[Run]) -> bool:
        return any(run.has(line.key) and (self.x == "step" or run.has(self.x)) for run in runs for line in self.lines)


@dataclass(frozen=True)
class Panel:
    """One figure: `name` is its file's stem (report-NAME.png), `title` its heading."""

    name: str
    title: str
    plots: tuple[Plot, ...]


def keys_of(runs: list[Run]) -> list[str]:
    return list(dict.fromkeys(key for run in runs for key in run.keys()))


def loss_panel(runs: list[Run]) -> Panel:
    # objectives that add terms log them as loss/NAME (loss/dpo, loss/policy, ...); an NLL term under TRL's name, nll_loss
    parts = [Line(key, key) for key in keys_of(runs) if key.startswith("loss/") or key == "nll_loss"]
    return Panel("loss", "Loss", (Plot("training loss", (Line("loss", "loss"), *parts), "loss"),))


def rewards_panel(runs: list[Run]) -> Panel:
    return Panel("rewards", "Implicit rewards (TRL names)", (
        Plot("rewards/margins", (Line("rewards/margins", "margin"),), "chosen - rejected"),
        Plot("rewards/accuracies", (Line("rewards/accuracies", "accuracy"),), "share of pairs", ylim=UNIT),
        Plot("rewards/chosen and rewards/rejected", (Line("rewards/chosen", "chosen"), Line("rewards/rejected", "rejected")), "reward"),
    ))


def reward_model_panel(runs: list[Run]) -> Panel:
    """A trained reward model's scores (TRL RewardTrainer's names): a score head's outputs, not the policy's implicit rewards."""
    return Panel("reward-model", "Reward model: scores of the answers (TRL names)", (
        Plot("accuracy", (Line("accuracy", "accuracy"),), "share of pairs", ylim=UNIT),
        Plot("margin", (Line("margin", "margin"),), "chosen - rejected"),
        Plot("chosen_reward and rejected_reward", (Line("chosen_reward", "chosen"), Line("rejected_reward", "rejected")), "score"),
        Plot("min, mean and max reward", (Line("min_reward", "min"), Line("mean_reward", "mean"), Line("max_reward", "max")), "score"),
    ))


def samples_panel(runs: list[Run]) -> Panel:
    """Quality and diversity side by side: what online objectives trade (DivPO keeps diversity while the reward rises)."""
    unique = [Line(key, key) for key in keys_of(runs) if key.rsplit("/", 1)[-1] == "unique_valid"]
    # a reward function's own figures (TRL's log_metric): reward/NAME besides pref's mean, std and max
    logged = [Line(key, key) for key in keys_of(runs) if key.startswith("reward/") and key not in ("reward/mean", "reward/std", "reward/max")]
    plots = [
        Plot("reward of the samples (mean +/- std)", (Line("reward/mean", "reward/mean", band="reward/std"),), "reward"),
        Plot("distinct answers / answers", (Line("samples/distinct_ratio", "samples/distinct_ratio"),), "share", ylim=UNIT),
        Plot("entropy of the answers", (Line("samples/entropy", "samples/entropy"),), "bits"),
    ]
    plots.append(Plot("answer length (TRL's completions/*)", (Line("completions/mean_length", "mean"), Line("completions/min_length", "min"),
                                                             Line("completions/max_length", "max"),
                                                             Line("completions/mean_terminated_length", "mean of those that ended")), "tokens"))
    plots.append(Plot("answers cut by the sampling limit", (Line("completions/clipped_ratio", "completions/clipped_ratio"),), "share", ylim=UNIT))
    if unique:
        plots.append(Plot("unique valid answers", tuple(unique), "answers"))
    if logged:
        plots.append(Plot("what the reward logged", tuple(logged), "value"))
    return Panel("samples", "The policy's samples: reward and diversity", tuple(plots))


SELF_DISTILLATION_SHARES = ("reprompt_sample_fraction", "success_sample_fraction", "success_group_fraction", "feedback_used_fraction")


def distillation_panel(runs: list[Run]) -> Panel:
    """What the distillation objectives log (distill, gold, sdft, sdpo): their loss terms, the policy's entropy, SDPO's re-prompted share,
    IW-OPD's position weights, GOLD's ULD terms."""
    return Panel("distillation", "Distillation", (
        Plot("distillation and policy terms", (Line("self_distillation/distillation_loss", "self_distillation/distillation_loss"),
                                               Line("self_distillation/policy_loss", "self_distillation/policy_loss")), "loss"),
        Plot("entropy of the policy", (Line("entropy", "entropy"),), "nats"),
        Plot("SDPO: samples with a teacher", tuple(Line(f"self_distillation/{name}", name) for name in SELF_DISTILLATION_SHARES), "share",
             ylim=UNIT),
        Plot("IW-OPD: position weights", (Line("iw_opd/mean_weight", "mean"), Line("iw_opd/min_weight", "min"),
                                          Line("iw_opd/max_weight", "max")), "weight"),
        Plot("GOLD: ULD terms", (Line("uld/distillation_loss", "uld/distillation_loss"), Line("uld/crossentropy_loss", "uld/crossentropy_loss"),
                                 Line("matched_loss", "matched_loss"), Line("unmatched_loss", "unmatched_loss")), "loss"),
    ))


def optimizer_panel(runs: list[Run]) -> Panel:
    return Panel("optimizer", "Learning rate and gradient norm", (
        Plot("learning rate", (Line("lr", "lr"),), "lr"),
        Plot("gradient norm (before clipping)", (Line("grad_norm", "grad norm"),), "norm"),
    ))


TIME_SPLIT = (Line("time/sampling", "sampling"), Line("time/scoring", "scoring"), Line("time/update", "update"))


def time_panel(runs: list[Run]) -> Panel:
    plots = [Plot("tokens per second", (Line("tokens/per_second", "tokens/per_second"),), "tokens/s")]
    if any(run.has("time/sampling") for run in runs):  # the split says something only when a step also samples and scores
        plots[:0] = [
            Plot("seconds per step (log scale)", TIME_SPLIT, "seconds", log=True),
            Plot("median seconds per step", TIME_SPLIT, "seconds", xlabel="", bars=True),
        ]
    return Panel("time", "Time and throughput", tuple(plots))


def curriculum_panel(runs: list[Run]) -> Panel:
    weights = [Line(key, key.split("/", 2)[2]) for key in keys_of(runs) if key.startswith("curriculum/weight/")]
    difficulties = [Line(key, key.split("/", 2)[2]) for key in keys_of(runs) if key.startswith("curriculum/difficulty/")]
    return Panel("curriculum", "Curriculum over the datasets", (
        Plot("sampling weight per dataset", tuple(weights), "weight", ylim=UNIT),
        Plot("difficulty per dataset", tuple(difficulties), "difficulty"),
    ))


def validation_panel(runs: list[Run]) -> Panel:
    return Panel("validation", "Validation", (
        Plot("validation/loss (dotted: the best/ step)", (Line("validation/loss", "validation loss"),), "loss", sparse=True, best=True),
        Plot("reward on the held-out prompts", (Line("eval/reward", "eval/reward"),), "reward", sparse=True),
    ))


def gold_panel(runs: list[Run]) -> Panel:
    return Panel("gold", "D2PO: gold labels spent", (
        Plot("gold reward of the samples", (Line("eval/gold_reward", "gold reward"),), "gold reward", x="gold/labels_spent", xlabel="gold labels spent"),
        Plot("discriminator accuracy on fresh gold pairs", (Line("discriminator/accuracy", "accuracy"),), "share", x="gold/labels_spent",
             xlabel="gold labels spent", ylim=UNIT),
    ))


#: Report order: what training optimizes first, then what it produces, then how it ran.
PANELS: tuple[Callable[[list[Run]], Panel], ...] = (
    loss_panel, rewards_panel, reward_model_panel, samples_panel, distillation_panel, gold_panel,
    validation_panel, curriculum_panel, optimizer_panel, time_panel,
)


def panels_for(runs: list[Run]) -> list[Panel]:
    """The panels, each with only the plots that some run has data for; panels with none are left out."""
    kept = []
    for build in PANELS:
        panel = build(runs)
        plots = tuple(plot for plot in panel.plots if plot.lines and plot.has_data(runs))
        if plots:
            kept.append(Panel(panel.name, panel.title, plots))
    return kept
