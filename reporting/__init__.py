"""Looking at runs and models: the figures and HTML report of run folders (`pref report`), model cards, a reward's report on a model's samples.

- `pref.reporting.runs`: read a run folder (run.json, metrics.jsonl, best.json, generations);
- `pref.reporting.panels`: which metrics each panel of the report draws;
- `pref.reporting.figures`: matplotlib figures of runs, and of answers before and after;
- `pref.reporting.html`: the self-contained HTML report and its PNG files;
- `pref.reporting.card`: the Hugging Face model card written into `final/`;
- `pref.reporting.evaluate`: a reward's report on a model's sampled answers (`pref eval`, `pref compare`);
- `pref.reporting.diversity`: how diverse a set of sampled answers is (distinct ratio, entropy), for online runs' metrics, rewards' reports and figures.

Nothing is imported here, so that writing a model card at the end of a run does not load matplotlib.
"""
