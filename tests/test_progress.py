"""The progress bar (the logger `progress`): an ETA, the shown metrics and tokens/s when the step measured them."""

import pytest
from rich.console import Console
from rich.progress import TimeRemainingColumn

from pref.plugins.loggers import ProgressBar, tokens_per_second


@pytest.fixture(autouse=True)
def stderr_a_terminal(monkeypatch):
    """The bar is drawn where stderr is a terminal (elsewhere each logged step is a plain line: tests/test_loggers.py)."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")


def rendered(bar, width=200):
    console = Console(record=True, width=width, file=open("/dev/null", "w"))
    console.print(bar.progress.make_tasks_table(bar.progress.tasks))
    return console.export_text()


def test_bar_shows_an_eta_and_tokens_per_second(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the metrics are cut to the terminal's width
    bar = ProgressBar()
    assert any(isinstance(column, TimeRemainingColumn) for column in bar.progress.columns)
    bar.start(10, 0)
    try:
        bar.show(3, {"loss": 0.5, "rewards/margins": 0.25, "tokens/per_second": 12345.0, "grad_norm": 1.0})
        line = rendered(bar)
    finally:
        bar.stop()
    assert "3/10" in line and "eta" in line
    assert "loss 0.5  margins 0.25  12.3k tok/s" in line and "grad_norm" not in line


@pytest.mark.parametrize("columns", [60, 80, 200])
def test_the_progress_bar_keeps_its_step_count_and_times_whole_and_cuts_the_metrics_to_the_width(columns, monkeypatch):
    # the metrics once took the width they wanted, and rich squeezed the step count and the times to "1…"
    monkeypatch.setenv("COLUMNS", str(columns))
    bar = ProgressBar()
    bar.start(400, 0)
    bar.show(37, {"loss": 0.018, "rewards/accuracies": 0.714, "rewards/margins": 0.206, "reward/mean": 0.609,
                  "reward/distinct_ratio": 0.453, "tokens/per_second": 4012.0})
    bar.stop()
    last = rendered(bar, columns).rstrip("\n").splitlines()[-1]
    assert len(last) <= columns and "train" in last and " 37/400 " in last and " eta " in last and "loss 0.01" in last
    assert last.endswith("4.0k tok/s") if columns == 200 else last.endswith("…")


def test_bar_calls_the_samples_reward_reward(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    bar = ProgressBar()
    bar.start(10, 0)
    bar.show(1, {"loss": 0.5, "reward/mean": 0.75})
    bar.stop()
    assert "loss 0.5  reward 0.75" in rendered(bar)  # not a bare "mean 0.75"


def test_bar_without_a_throughput_metric_shows_none():
    bar = ProgressBar()
    bar.start(10, 0)
    bar.show(1, {"loss": 0.5})
    bar.stop()
    assert "tok/s" not in rendered(bar)


def test_a_resumed_run_starts_the_bar_at_its_step():
    bar = ProgressBar()
    bar.start(10, 4)
    bar.stop()
    assert "4/10" in rendered(bar)


def test_tokens_per_second_text():
    assert tokens_per_second(850.4) == "850 tok/s" and tokens_per_second(1500) == "1.5k tok/s"
