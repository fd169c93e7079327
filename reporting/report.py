"""`pref report`: read runs, draw the panels they have data for, write the HTML and PNGs."""

from __future__ import annotations

from matplotlib.figure import Figure

from pref.errors import PrefError
from pref.reporting.figures import panel_figure
from pref.reporting.html import write_report
from pref.reporting.panels import panels_for
from pref.reporting.runs import Run, load_runs


def report_figures(runs: list[Run], smooth: int = 1) -> list[tuple[str, str, Figure]]:
    """(name, title, figure) for every panel some run has data for, in report order."""
    return [(panel.name, panel.title, panel_figure(panel, runs, smooth)) for panel in panels_for(runs)]


def make_report(paths: list[str], output: str = "report.html", smooth: int = 1) -> list[str]:
    """Report on the run folders `paths` into `output`; returns the files written (the HTML first)."""
    if smooth < 1:
        raise PrefError(f"--smooth must be 1 (no smoothing) or more logged steps, not {smooth}")
    if not output.lower().endswith((".html", ".htm")):
        raise PrefError(f"--output {output}: the report is an HTML file; give a name ending in .html")
    runs = load_runs(paths)
    return write_report(runs, report_figures(runs, smooth), output)
