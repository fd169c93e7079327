"""`pref report`: figures of one or several runs in one HTML file, with the PNGs beside it."""

from __future__ import annotations

import click


@click.command()
@click.argument("runs", nargs=-1, required=True, metavar="RUN [RUN ...]")
@click.option("--output", "-o", default="report.html", show_default=True, help="The HTML file; the PNGs go beside it (OUTPUT-NAME.png).")
@click.option("--smooth", default=1, show_default=True, help="Trailing mean over N logged steps (1: raw values).")
def report(runs: tuple[str, ...], output: str, smooth: int) -> None:
    """Plot runs' metrics (loss, rewards, diversity, ...) into one self-contained HTML report."""
    from pref.reporting.report import make_report

    written = make_report(list(runs), output, smooth)
    click.echo(f"Wrote {written[0]} and {len(written) - 1} PNG files beside it", err=True)
