"""matplotlib figures: a report panel over one or several runs, and answers before and after training.

Figures are built as `matplotlib.figure.Figure` objects on the Agg canvas, never through
pyplot, so nothing opens a window and no global state is shared between figures.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from statistics import median

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pref.reporting.panels import Panel, Plot
from pref.reporting.runs import Run

STYLES = ("-", "--", ":", "-.")
#: Colour-blind-safe colours (Okabe-Ito), one per run (or per line when there is one run).
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
PLOT_SIZE = (5.0, 3.6)  # inches per axes


def smoothed(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start); `window` <= 1 keeps them."""
    if window <= 1:
        return list(values)
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def paired(run: Run, x: str, y: str) -> tuple[list[float], list[float]]:
    """The values of `y` against `x`: per step when `x` is `step`; else the mean of `y` over the rows
    at each value of the metric `x` (D2PO: one point per count of gold labels spent, which moves by rounds)."""
    if x == "step":
        return run.series(y)
    sums: dict[float, list[float]] = {}
    for row in run.rows:
        a, b = row.get(x), row.get(y)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == a and b == b:
            sums.setdefault(float(a), []).append(float(b))
    return list(sums), [sum(values) / len(values) for values in sums.values()]


def new_figure(plots: int) -> Figure:
    figure = Figure(figsize=(PLOT_SIZE[0] * plots, PLOT_SIZE[1] + 0.4), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def panel_figure(panel: Panel, runs: list[Run], smooth: int = 1) -> Figure:
    """The panel's plots side by side, every run overlaid on each.

    One run: a colour per line. Several runs: a colour per run and a line style per
    metric, labelled "RUN: metric" (or just RUN when the plot has one metric).
    `smooth`: trailing-mean window over logged values (evaluation points and plots against a metric
    are drawn as points, not smoothed).
    """
    figure = new_figure(len(panel.plots))
    figure.suptitle(panel.title, fontweight="bold")
    for axes, plot in zip(figure.subplots(1, len(panel.plots), squeeze=False)[0], panel.plots):
        if plot.bars:
            draw_bars(axes, plot, runs)
        else:
            draw_lines(axes, plot, runs, smooth)
        axes.set_title(plot.title, fontsize=10)
        axes.set_xlabel(plot.xlabel)
        axes.set_ylabel(plot.ylabel)
        if plot.ylim:
            axes.set_ylim(*plot.ylim)
        if plot.log:
            axes.set_yscale("log")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    return figure


def draw_lines(axes, plot: Plot, runs: list[Run], smooth: int) -> None:
    for r, run in enumerate(runs):
        for i, line in enumerate(plot.lines):
            xs, ys = paired(run, plot.x, line.key)
            if not xs:
                continue
            colour = COLOURS[(r if len(runs) > 1 else i) % len(COLOURS)]
            style = STYLES[i % len(STYLES)] if len(runs) > 1 else "-"
            if len(runs) == 1:
                label = line.label
            else:
                label = run.name if len(plot.lines) == 1 else f"{run.name}: {line.label}"
            if plot.sparse or plot.x != "step":
                axes.plot(xs, ys, style, marker="o", markersize=4, color=colour, label=label)
            else:
                axes.plot(xs, smoothed(ys, smooth), style, color=colour, label=label, linewidth=1.4)
            if line.band and run.has(line.band):
                band = dict(zip(*run.series(line.band)))
                points = [(x, y, band[x]) for x, y in zip(xs, smoothed(ys, smooth)) if x in band]
                stds = smoothed([s for _, _, s in points], smooth)
                axes.fill_between([x for x, _, _ in points], [y - s for (_, y, _), s in zip(points, stds)],
                                  [y + s for (_, y, _), s in zip(points, stds)], color=colour, alpha=0.18, linewidth=0)
        if plot.best and run.best:
            colour = COLOURS[r % len(COLOURS)]
            step = run.best["step"]
            axes.axvline(step, color=colour, linestyle=":", linewidth=1.2,
                         label=f"best/: step {step}" if len(runs) == 1 else f"{run.name}: best/ step {step}")


def draw_bars(axes, plot: Plot, runs: list[Run]) -> None:
    """One bar per run, stacked by the plot's lines: the median of each over the logged steps.

    The median, so that one-off costs of the first steps (loading a word list) do not hide the usual split.
    """
    names = [run.name for run in runs]
    bottoms = [0.0] * len(runs)
    for i, line in enumerate(plot.lines):
        medians = [median(run.series(line.key)[1] or [0.0]) for run in runs]
        axes.bar(names, medians, bottom=bottoms, color=COLOURS[i % len(COLOURS)], label=line.label, width=0.6)
        bottoms = [b + m for b, m in zip(bottoms, medians)]
    axes.set_ylim(0, max(bottoms + [1e-9]) * 1.4)  # room for the legend above the bars
    if len(runs) > 2:
        axes.tick_params(axis="x", labelrotation=20)


def answers_figure(before: Sequence[str], after: Sequence[str], labels: tuple[str, str] = ("before", "after"), top: int = 15,
                   title: str = "") -> Figure:
    """Horizontal bars: the share of samples of each of the most frequent answers, before and after.

    Answers are compared trimmed and lowercased; the `top` answers of either side are shown,
    most frequent overall first, plus one bar for every other answer together.
    """
    from pref.reporting.diversity import normalize

    counts = [Counter(normalize(a) or "(empty)" for a in answers) for answers in (before, after)]
    totals = [max(1, len(before)), max(1, len(after))]
    shown = list(dict.fromkeys([a for a, _ in counts[0].most_common(top)] + [a for a, _ in counts[1].most_common(top)]))
    shown.sort(key=lambda a: -(counts[0][a] / totals[0] + counts[1][a] / totals[1]))
    rows = shown + ["(all other answers)"]
    shares = [[c[a] / t for a in shown] + [1.0 - sum(c[a] for a in shown) / t] for c, t in zip(counts, totals)]

    figure = Figure(figsize=(8.0, 1.8 + 0.32 * len(rows)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    height = 0.4
    positions = list(range(len(rows)))
    for j, (label, values, count) in enumerate(zip(labels, shares, counts)):
        distinct = len(count)
        axes.barh([p + (j - 0.5) * height for p in positions], values, height=height, color=COLOURS[j],
                  label=f"{label} ({distinct} distinct in {sum(count.values())})")
    axes.set_yticks(positions, [r if len(r) <= 40 else r[:37] + "..." for r in rows])
    axes.invert_yaxis()  # the most frequent answer on top
    axes.set_xlabel("share of samples")
    axes.set_title(title or "Most frequent answers", fontsize=11)
    axes.grid(axis="x", alpha=0.3)
    figure.legend(fontsize=9, loc="outside lower center")  # below the axes: long bars may fill any corner
    return figure
