"""The HTML report: one self-contained file (figures embedded as base64 PNG), the PNG files beside it."""

from __future__ import annotations

import base64
import html
import io
import os
from datetime import datetime, timezone
from typing import Any

from matplotlib.figure import Figure

from pref.errors import PrefError
from pref.reporting.runs import Run
from pref.reporting.summary import final_values, summary

TITLE = "pref report"  # the start of every report's <title>: how pref knows a report it may replace
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1300px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; }
.muted { color: #777; font-size: 0.85em; }
"""


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def table(rows: list[dict[str, str]]) -> str:
    """An HTML table with a column per key of any row (in first-seen order), a row per dict."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(row.get(c, ''))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def generations_section(runs: list[Run]) -> str:
    """The answers to test prompts at each run's last evaluation."""
    parts = []
    for run in runs:
        if not run.generations:
            continue
        last = max(row["step"] for row in run.generations)
        rows = [{"prompt": row["prompt"], "answer": row["text"]} for row in run.generations if row["step"] == last]
        parts.append(f"<p>{html.escape(run.name)}, step {last}:</p>{table(rows)}")
    return "<h2>Test prompts</h2>" + "".join(parts) if parts else ""


#: Completions shown per run: the first of its last logged rollout.
COMPLETIONS_SHOWN = 8


def completions_section(runs: list[Run]) -> str:
    """The first completions of each run's last logged rollout (--log-completions), with their prompts and scores."""
    parts = []
    for run in runs:
        if not run.completions:
            continue
        last = max(row["step"] for row in run.completions)
        shown = [row for row in run.completions if row["step"] == last][:COMPLETIONS_SHOWN]
        rows = [{key: prompt_text(value) if key == "prompt" else f"{value:.4g}" if isinstance(value, float) else str(value)
                 for key, value in row.items() if key != "step"} for row in shown]
        parts.append(f"<p>{html.escape(run.name)}, step {last}:</p>{table(rows)}")
    return "<h2>Completions</h2>" + "".join(parts) if parts else ""


def prompt_text(prompt: Any) -> str:
    """A prompt as text: a list of messages by its last one's content."""
    return str(prompt[-1].get("content", "")) if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) else str(prompt)


def is_report(path: str) -> bool:
    """Whether the file at `path` is an HTML report pref wrote (its title says so)."""
    with open(path, "rb") as f:
        return f"<title>{TITLE}".encode() in f.read(4096)


def check_output(output: str, names: list[str]) -> list[str]:
    """The PNG paths beside `output` for the panels `names`; PrefError when writing them or `output` would replace
    something pref did not write: a folder, a file that is not a pref report, or PNGs beside a report that is not there."""
    if os.path.isdir(output):
        raise PrefError(f"--output {output} is a folder; give the report's file name, e.g. {os.path.join(output, 'report.html')}")
    if os.path.exists(output) and not is_report(output):
        raise PrefError(f"--output {output} exists and is not a pref report; give another name (pref replaces only reports it wrote)")
    folder, stem = os.path.dirname(os.path.abspath(output)), os.path.splitext(os.path.basename(output))[0]
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise PrefError(f"--output {output}: {existing} is a file, not a folder; give a path in a folder")
    pngs = [os.path.join(folder, f"{stem}-{name}.png") for name in names]
    if not os.path.exists(output):  # a report's own PNGs lie beside it; without it, a file of that name is someone else's
        taken = [path for path in pngs if os.path.exists(path)]
        if taken:
            raise PrefError(f"{taken[0]} exists and would be replaced by a figure of the report; give --output another name")
    return pngs


def write_report(runs: list[Run], figures: list[tuple[str, str, Figure]], output: str) -> list[str]:
    """Write `output` (HTML) and one PNG per figure beside it, named OUTPUT-STEM-NAME.png.

    figures: (name, title, figure) in display order. Returns the paths written, the HTML first.
    The HTML is written first, so that a report cut short leaves its own PNGs beside it (see check_output).
    """
    pngs = check_output(output, [name for name, _, _ in figures])
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    sections, images = [], []
    for name, title, figure in figures:
        data = png_bytes(figure)
        images.append(data)
        encoded = base64.b64encode(data).decode("ascii")
        sections.append(f'<h2 id="{name}">{html.escape(title)}</h2>\n<img alt="{html.escape(title)}" src="data:image/png;base64,{encoded}">')
    finals = [{"run": run.name, **final_values(run)} for run in runs]
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{TITLE}: {html.escape(", ".join(run.name for run in runs))}</title>
<style>{STYLE}</style></head>
<body>
<h1>pref report</h1>
<p class="muted">{len(runs)} run(s), written {created}. Runs: {html.escape(", ".join(run.path for run in runs))}</p>
<h2>Configuration</h2>
{table([summary(run) for run in runs])}
<h2>Last logged values</h2>
{table(finals)}
{"".join(sections)}
{generations_section(runs)}
{completions_section(runs)}
</body></html>
"""
    with open(output, "w", encoding="utf-8") as f:
        f.write(page)
    for path, data in zip(pngs, images):
        with open(path, "wb") as f:
            f.write(data)
    return [output, *pngs]
