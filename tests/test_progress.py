"""The progress bar: an ETA, the shown metrics and tokens/s when the step measured them."""

from rich.console import Console
from rich.progress import TimeRemainingColumn

from pref.progress import TrainingProgress, tokens_per_second


def rendered(progress):
    console = Console(record=True, width=200, file=open("/dev/null", "w"))
    console.print(progress.progress.make_tasks_table(progress.progress.tasks))
    return console.export_text()


def test_bar_shows_an_eta_and_tokens_per_second():
    progress = TrainingProgress(10, enabled=False)
    assert any(isinstance(column, TimeRemainingColumn) for column in progress.progress.columns)
    progress.update(3, {"loss": 0.5, "rewards/margins": 0.25, "tokens/per_second": 12345.0, "grad_norm": 1.0})
    line = rendered(progress)
    assert "3/10" in line and "eta" in line
    assert "loss 0.5  margins 0.25  12.3k tok/s" in line and "grad_norm" not in line


def test_bar_without_a_throughput_metric_shows_none():
    progress = TrainingProgress(10, enabled=False)
    progress.update(1, {"loss": 0.5})
    assert "tok/s" not in rendered(progress)


def test_tokens_per_second_text():
    assert tokens_per_second(850.4) == "850 tok/s" and tokens_per_second(1500) == "1.5k tok/s"
