"""Looking at runs: the figures and HTML report of run folders (`pref report`), and model cards.

- `pref.reporting.runs`: read a run folder (run.json, metrics.jsonl, best.json, generations);
- `pref.reporting.panels`: which metrics each panel of the report draws;
- `pref.reporting.figures`: matplotlib figures of runs, and of answers before and after;
- `pref.reporting.html`: the self-contained HTML report and its PNG files;
- `pref.reporting.card`: the Hugging Face model card written into `final/`.

Nothing is imported here, so that writing a model card at the end of a run does not load matplotlib.
"""
