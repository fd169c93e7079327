"""Finding plugins: a plugin-manager factory and the registry of what they provide.

Built-in plugins and third-party ones are both found through the `pref`
entry-point group. Environment variables:

- `PREF_PLUGINS`: comma-separated distribution names allowed to load plugins
  (pref's own built-ins always load). Set but empty: no third-party plugin loads.
- `PREF_TRACE_HOOKS`: when set, every hook call is printed to stderr.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shlex
import sys
import typing
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import pluggy

from pref import hookspecs
from pref.errors import PrefError, expected_type, unknown_name

GROUP = "pref"
BUILTIN_DISTRIBUTION = "pref"

#: kind name (as users see it) -> hook that registers it
KINDS = {
    "objective": "register_objectives",
    "reward": "register_rewards",
    "pair-selector": "register_pair_selectors",
    "dataset": "register_dataset_builders",
    "embedder": "register_embedders",
    "logger": "register_loggers",
    "sampler": "register_samplers",
    "adapter": "register_adapters",
    "evaluator": "register_evaluators",
}
#: other spellings of a kind that `--kind` takes: `selector`, as `pref run --selector` names a pair selector
KIND_ALIASES = {"selector": "pair-selector"}


@dataclass
class PluginItem:
    """One registered item of any kind in `KINDS`."""

    kind: str
    name: str
    factory: Callable[..., Any]
    description: str
    plugin: str
    package: str
    version: str
    requires: dict[str, str] = field(default_factory=dict)  # a module it imports -> what `pip install` takes to get it

    @property
    def builtin(self) -> bool:
        return self.package == BUILTIN_DISTRIBUTION

    def check_requires(self) -> None:
        """A one-line error naming the first module of `requires` that cannot be imported, and the install that gives it."""
        for module, install in self.requires.items():
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):  # a dotted name whose parent is missing
                found = False
            if not found:
                raise PrefError(f"the {self.name} {self.kind} needs the {module} package: pip install {shlex.quote(install)}")


@dataclass
class PluginFailure:
    """A plugin that could not be loaded, kept to be reported instead of crashing."""

    name: str
    package: str
    error: str


def get_plugin_manager(load_entrypoints: bool = True) -> tuple[pluggy.PluginManager, list[PluginFailure], dict[str, tuple[str, str]]]:
    """Build a plugin manager with pref's hook specs and, by default, every installed plugin.

    Returns the manager, the plugins that failed to load, and a map of plugin
    name -> (distribution, version) for the ones that came from entry points.
    """
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    if os.environ.get("PREF_TRACE_HOOKS"):
        pm.trace.root.setwriter(lambda message: sys.stderr.write(message))
        pm.enable_tracing()
    failures: list[PluginFailure] = []
    sources: dict[str, tuple[str, str]] = {}
    if not load_entrypoints:
        return pm, failures, sources

    allow_list = os.environ.get("PREF_PLUGINS")
    allowed = None if allow_list is None else {part.strip() for part in allow_list.split(",") if part.strip()}
    seen: set[tuple[str, str]] = set()
    for dist in metadata.distributions():
        dist_name = dist.metadata["Name"]
        for ep in dist.entry_points:
            # a distribution can be visible twice on sys.path (editable installs)
            if ep.group != GROUP or (dist_name, ep.name) in seen:
                continue
            seen.add((dist_name, ep.name))
            if allowed is not None and dist_name != BUILTIN_DISTRIBUTION and dist_name not in allowed:
                continue
            try:
                pm.register(ep.load(), name=ep.name)
            except Exception as exc:  # a broken plugin is reported, not fatal
                failures.append(PluginFailure(ep.name, dist_name, f"{type(exc).__name__}: {exc}"))
                continue
            try:
                pm.check_pending()  # a misspelled hook name is an error, not silence
            except pluggy.PluginValidationError as exc:
                pm.unregister(name=ep.name)
                failures.append(PluginFailure(ep.name, dist_name, str(exc)))
                continue
            sources[ep.name] = (dist_name, dist.version)
    return pm, failures, sources


class Registry:
    """Everything the loaded plugins registered, by kind and name."""

    def __init__(self, pm: pluggy.PluginManager, failures: list[PluginFailure] | None = None, sources: dict[str, tuple[str, str]] | None = None):
        self.failures = list(failures or [])
        sources = sources or {}
        self._items: dict[str, dict[str, PluginItem]] = {kind: {} for kind in KINDS}
        for kind, hook_name in KINDS.items():
            for plugin_name, plugin in pm.list_name_plugin():
                if plugin is None:
                    continue
                caller = pm.subset_hook_caller(hook_name, remove_plugins=[p for p in pm.get_plugins() if p is not plugin])
                package, version = sources.get(plugin_name, (plugin_name, ""))
                try:
                    caller(register=self._registrar(kind, plugin_name, package, version))
                except PrefError:
                    raise
                except Exception as exc:
                    self.failures.append(PluginFailure(plugin_name, package, f"{type(exc).__name__}: {exc}"))

    def _registrar(self, kind: str, plugin_name: str, package: str, version: str) -> Callable[..., None]:
        def register(name: str, factory: Callable[..., Any], description: str | None = None,
                     requires: dict[str, str] | list[str] | None = None) -> None:
            if description is None:  # the first line of the factory's docstring
                description = ((inspect.getdoc(factory) or "").strip().splitlines() or [""])[0]
            existing = self._items[kind].get(name)
            if existing is not None:
                raise PrefError(
                    f"{kind} {name!r} is registered twice: by {existing.plugin} ({existing.package}) "
                    f"and by {plugin_name} ({package}); uninstall one of them or limit loading with PREF_PLUGINS"
                )
            needed = {module: module.split(".")[0] for module in requires} if isinstance(requires, (list, tuple)) else dict(requires or {})
            self._items[kind][name] = PluginItem(kind, name, factory, description, plugin_name, package, version, needed)

        return register

    def items(self, kind: str | None = None) -> list[PluginItem]:
        kinds = [kind] if kind else list(KINDS)
        return [item for k in kinds for item in sorted(self._items[k].values(), key=lambda i: i.name)]

    def names(self, kind: str) -> list[str]:
        return sorted(self._items[kind])

    def get(self, kind: str, name: str) -> PluginItem:
        if kind == "reward" and FUNCTION_FILE.search(name):  # `--reward rewards.py:accuracy`: the `function` reward on that file
            name = FUNCTION_REWARD
        try:
            return self._items[kind][name]
        except KeyError:
            raise unknown_name(kind, name, self._items[kind], hint=" (see `pref list-plugins`)") from None

    def create(self, kind: str, name: str, options: dict[str, Any] | None = None, **context: Any) -> Any:
        """Build the item `name` of `kind` with the user's `options`.

        `context` holds values of the run that the host supplies (`registry`, always this
        registry, and the others in docs/plugins.md's table); each is passed only if the factory
        takes a parameter of that name. Unknown option keys are an error that lists the accepted ones.
        """
        if kind == "reward" and FUNCTION_FILE.search(name):
            name, options = FUNCTION_REWARD, {"path": name, **(options or {})}
        item = self.get(kind, name)
        item.check_requires()
        options = dict(options or {})
        context = {"registry": self, **context}
        params = inspect.signature(item.factory).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in context]
        hints = option_types(item.factory)
        for key, value in options.items():
            if key not in accepted and not takes_any:
                raise unknown_name(f"option for {kind} {name!r}:", key, accepted)
            wanted = expected_type(value, hints.get(key))
            if wanted:  # else "maybe" would pass as a true flag, and "abc" fail deep in the factory
                quote = f"; quote a text: {key}='\"...\"'" if "string" in wanted and isinstance(value, (dict, list)) else ""  # YAML's {a}, [a]
                raise PrefError(f"{name} option {key} must be {wanted}, not {value!r}{quote}")
        for key, value in context.items():
            if key in params or takes_any:
                options.setdefault(key, value)
        try:
            return item.factory(**options)
        except TypeError as exc:
            missing = [n for n in accepted if params[n].default is inspect.Parameter.empty and n not in options]
            if missing:  # a required option the user did not give
                flag = OPTION_FLAGS.get(kind, "its option flag")
                raise PrefError(f"{kind} {name} needs the option{'s' * (len(missing) > 1)} {', '.join(missing)}: give "
                                + " ".join(f"{flag} {n}=VALUE" for n in missing)) from None
            raise PrefError(f"bad options for {kind} {name!r}: {exc}") from None


#: A reward named FILE.py:FUNCTION is the reward `function` (`plugins/function_reward.py`) with that `path`.
FUNCTION_FILE, FUNCTION_REWARD = re.compile(r"\.py:[A-Za-z_]\w*$"), "function"

#: The `pref run` flag that gives a plugin of each kind its options.
OPTION_FLAGS = {"objective": "-o", "reward": "--reward-option", "dataset": "--dataset-option", "pair-selector": "--selector-option",
                "sampler": "--sampler-option", "adapter": "--adapter-option", "evaluator": "--evaluator-option"}


def option_types(factory: Callable[..., Any]) -> dict[str, Any]:
    """The factory's parameter annotations as types; none where a plugin's annotations cannot be resolved."""
    try:
        return typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    except Exception:
        return {}


def load_registry() -> Registry:
    """The registry of every installed plugin."""
    return Registry(*get_plugin_manager())
