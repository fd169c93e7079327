"""The hooks a pref plugin can implement.

Each hook receives a `register(name, factory, description=None, requires=None)` callback,
so one plugin module can register several items. The host, not the plugin,
handles duplicate names. `factory` is called with the user's options as
keyword arguments and returns the item (usually it is the class itself).
`requires` names the modules the item imports (a list, or a dict of module ->
what `pip install` takes): a run that lacks one stops before the model loads.
"""

import pluggy

hookspec = pluggy.HookspecMarker("pref")
hookimpl = pluggy.HookimplMarker("pref")


@hookspec
def register_objectives(register):
    """Register training objectives (`pref.Objective` factories)."""


@hookspec
def register_rewards(register):
    """Register reward sources (`pref.RewardSource` factories)."""


@hookspec
def register_pair_selectors(register):
    """Register pair selectors (`pref.PairSelector` factories)."""


@hookspec
def register_dataset_builders(register):
    """Register dataset builders (factories of objects with `build(policy)`)."""


@hookspec
def register_embedders(register):
    """Register embedders (`pref.Embedder` factories: `similarity(texts) -> [N, N]`)."""


@hookspec
def register_samplers(register):
    """Register samplers: which records come next (factories of objects with `build(...)` -> `next()`, `state()`, `load_state()`, `metrics()`)."""


@hookspec
def register_loggers(register):
    """Register metrics loggers (`pref.MetricsLogger` factories, built with `output_dir`, and `config` if they take it)."""


@hookspec
def register_adapters(register):
    """Register adapters (`pref.Adapter` factories: `wrap(model, kind)` adds the few weights a run trains, as LoRA does)."""


@hookspec
def register_evaluators(register):
    """Register evaluators (`pref.Evaluator` factories: `evaluate(step, policy, reference, records)` -> figures to log)."""
