"""The plugin registry: entry-point discovery, throw-away plugins, broken plugins, PREF_PLUGINS, tracing.

Third-party plugins are simulated with a fake installed distribution: a
`NAME-VERSION.dist-info` folder (METADATA and entry_points.txt) plus a module
file, both in `tmp_path`, which goes on `sys.path` so `importlib.metadata`
finds them exactly as it finds a pip-installed package.
"""

import json
import sys
from importlib import metadata
from textwrap import dedent

import pluggy
import pytest
from click.testing import CliRunner

from pref.cli.main import cli
from pref.errors import PrefError
from pref.hookspecs import hookimpl
from pref.registry import PluginFailure, Registry, get_plugin_manager, load_registry

THIRD_PARTY = "pref-toy-plugin"  # the fake distribution's name, as PREF_PLUGINS takes it

TOY_PLUGIN = '''
from pref import hookimpl


class Toy:
    """A toy objective from a third-party package.

    This second paragraph is not part of the description.
    """

    def __init__(self, strength=1.0):
        self.strength = strength


@hookimpl
def register_objectives(register):
    register("toy", Toy)
'''

MISSPELLED_PLUGIN = '''
from pref import hookimpl


@hookimpl
def register_objectivez(register):
    register("never", dict)
'''


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch):
    """No allow-list and no tracing unless a test sets them."""
    monkeypatch.delenv("PREF_PLUGINS", raising=False)
    monkeypatch.delenv("PREF_TRACE_HOOKS", raising=False)


@pytest.fixture
def install(tmp_path, monkeypatch):
    """`install(dist, entry_points, modules)`: a fake installed distribution on sys.path.

    `entry_points` maps entry-point name -> module name (group `pref`);
    `modules` maps module name -> source. The modules are forgotten afterwards.
    """
    imported = []

    def install(dist: str, entry_points: dict[str, str], modules: dict[str, str] | None = None, version: str = "1.2.3"):
        info = tmp_path / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = "".join(f"{name} = {module}\n" for name, module in entry_points.items())
        (info / "entry_points.txt").write_text(f"[pref]\n{lines}")
        for module, source in (modules or {}).items():
            (tmp_path / f"{module}.py").write_text(dedent(source))
            imported.append(module)
        monkeypatch.syspath_prepend(str(tmp_path))

    yield install
    for module in imported:
        sys.modules.pop(module, None)


@pytest.fixture
def toy_dist(install):
    install(THIRD_PARTY, {"toy": "pref_test_toy_plugin"}, {"pref_test_toy_plugin": TOY_PLUGIN})


# -- built-ins ----------------------------------------------------------------------


def test_builtins_are_found_through_entry_points():
    registry = load_registry()
    for kind, name in [("objective", "dpo"), ("dataset", "preferences")]:
        item = registry.get(kind, name)
        assert item.package == "pref"
        assert item.version == metadata.version("pref")
        assert item.builtin is True


def test_builtins_are_not_registered_without_entry_points():
    pm, failures, sources = get_plugin_manager(load_entrypoints=False)
    registry = Registry(pm)
    assert registry.items() == []
    assert failures == [] and sources == {}


# -- a throw-away plugin registered in the test ---------------------------------------------


class Scaled:
    """Multiplies by a factor.

    Second line, not part of the description.
    """

    def __init__(self, factor=2.0, bias=0.0):
        self.factor, self.bias = factor, bias


class NeedsEmbedder:
    """A reward that takes the host's embedder."""

    def __init__(self, embedder=None, weight=1.0):
        self.embedder, self.weight = embedder, weight


class ThrowAway:
    @hookimpl
    def register_objectives(register):
        register("scaled", Scaled)
        register("plain", lambda: "plain", description="Given explicitly.")

    @hookimpl
    def register_rewards(register):
        register("needs-embedder", NeedsEmbedder)


@pytest.fixture
def registry():
    pm, _, _ = get_plugin_manager(load_entrypoints=False)
    pm.register(ThrowAway, name="throw-away")
    return Registry(pm)


def test_get_items_and_descriptions(registry):
    item = registry.get("objective", "scaled")
    assert item.factory is Scaled
    assert item.plugin == "throw-away"
    assert item.builtin is False
    assert item.description == "Multiplies by a factor."
    assert registry.get("objective", "plain").description == "Given explicitly."
    assert [i.name for i in registry.items("objective")] == ["plain", "scaled"]
    assert [(i.kind, i.name) for i in registry.items()] == [
        ("objective", "plain"),
        ("objective", "scaled"),
        ("reward", "needs-embedder"),
    ]
    assert registry.names("reward") == ["needs-embedder"]


def test_get_unknown_name_suggests_close_match(registry):
    with pytest.raises(PrefError, match=r"unknown objective 'scaeld': did you mean 'scaled'\?"):
        registry.get("objective", "scaeld")


def test_create_passes_options(registry):
    made = registry.create("objective", "scaled", {"factor": 3.0})
    assert isinstance(made, Scaled)
    assert (made.factor, made.bias) == (3.0, 0.0)


def test_create_rejects_unknown_option_with_suggestion(registry):
    with pytest.raises(PrefError, match=r"'factr': did you mean 'factor'\?"):
        registry.create("objective", "scaled", {"factr": 3.0})


def test_create_rejects_unknown_option_listing_accepted_ones(registry):
    with pytest.raises(PrefError, match=r"'zzz': choose one of: bias, factor"):
        registry.create("objective", "scaled", {"zzz": 1})


def test_a_required_option_left_out_is_named_with_the_flag_that_gives_it(tmp_path):
    from pref.registry import load_registry

    with pytest.raises(PrefError) as error:  # identity-shift's factory has two required options
        load_registry().create("dataset", "identity-shift", {"new_name": "Pref"})
    assert str(error.value) == "dataset identity-shift needs the option original_name: give --dataset-option original_name=VALUE"
    result = CliRunner().invoke(cli, ["run", "--objective", "dpo", "--dataset", "identity-shift", "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert ("dataset identity-shift needs the options original_name, new_name: give --dataset-option original_name=VALUE "
            "--dataset-option new_name=VALUE") in result.output


def test_create_passes_context_only_to_factories_that_take_it(registry):
    reward = registry.create("reward", "needs-embedder", {"weight": 0.5}, embedder="the embedder")
    assert (reward.embedder, reward.weight) == ("the embedder", 0.5)
    objective = registry.create("objective", "scaled", {}, embedder="the embedder")
    assert isinstance(objective, Scaled)


def test_a_plugin_names_the_packages_it_needs_and_a_run_without_them_stops_when_planned(prefs_file):
    from pref.config import build_config
    from pref.plan import resolve_plan

    class Trackers:
        @hookimpl
        def register_loggers(register):
            register("absent-tracker", Scaled, requires={"pref_test_absent_module": "pref-test-absent[extra]"})
            register("absent-listed", Scaled, requires=["json", "pref_test_absent.sub"])
            register("present", Scaled, requires=["json"])

    pm, failures, sources = get_plugin_manager()
    pm.register(Trackers, name="trackers-of-a-third-party")
    registry = Registry(pm, failures, sources)
    config = {"objective": "dpo", "dataset": [prefs_file]}
    with pytest.raises(PrefError, match=r"^the absent-tracker logger needs the pref_test_absent_module package: pip install 'pref-test-absent\[extra\]'$"):
        resolve_plan(build_config(flags={**config, "loggers": ["jsonl", "absent-tracker"]}), registry)
    with pytest.raises(PrefError, match=r"^the absent-listed logger needs the pref_test_absent.sub package: pip install pref_test_absent$"):
        resolve_plan(build_config(flags={**config, "loggers": ["absent-listed"]}), registry)
    assert resolve_plan(build_config(flags={**config, "loggers": ["present"]}), registry).loggers == ("present", "progress")


def test_same_name_from_two_plugins_is_an_error_naming_both():
    class First:
        @hookimpl
        def register_objectives(register):
            register("twin", Scaled)

    class Second:
        @hookimpl
        def register_objectives(register):
            register("twin", NeedsEmbedder)

    pm, _, _ = get_plugin_manager(load_entrypoints=False)
    pm.register(First, name="first-plugin")
    pm.register(Second, name="second-plugin")
    with pytest.raises(PrefError, match="'twin' is registered twice") as info:
        Registry(pm)
    assert "first-plugin" in str(info.value) and "second-plugin" in str(info.value)


# -- third-party plugins, installed as distributions ---------------------------------------------


def test_third_party_plugin_shows_package_and_version(toy_dist):
    registry = load_registry()
    item = registry.get("objective", "toy")
    assert (item.package, item.version, item.builtin) == (THIRD_PARTY, "1.2.3", False)
    assert item.description == "A toy objective from a third-party package."
    assert registry.create("objective", "toy", {"strength": 4}).strength == 4
    assert registry.get("objective", "dpo").builtin


def test_broken_plugin_is_reported_and_others_still_load(install):
    install("pref-broken-plugin", {"broken": "pref_test_missing_module"})
    pm, failures, sources = get_plugin_manager()
    broken = [f for f in failures if f.name == "broken"]
    assert broken == [PluginFailure("broken", "pref-broken-plugin", broken[0].error)]
    assert "ModuleNotFoundError" in broken[0].error and "pref_test_missing_module" in broken[0].error
    assert "broken" not in sources
    registry = Registry(pm, failures, sources)
    assert registry.get("objective", "dpo").builtin
    assert any(f.name == "broken" for f in registry.failures)


def test_broken_plugin_does_not_break_list_plugins(install):
    install("pref-broken-plugin", {"broken": "pref_test_missing_module"})
    runner = CliRunner()

    result = runner.invoke(cli, ["list-plugins"])
    assert result.exit_code == 0, result.output
    assert "dpo" in result.stdout
    assert "Warning: plugin broken (pref-broken-plugin) failed to load: ModuleNotFoundError" in result.stderr
    assert "Traceback" not in result.output

    result = runner.invoke(cli, ["list-plugins", "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert "dpo" in [row["name"] for row in listing["plugins"]]
    assert "broken" in [failure["name"] for failure in listing["failures"]]


def test_misspelled_hook_is_a_failure_not_silence(install):
    install("pref-misspelled-plugin", {"misspelled": "pref_test_misspelled_plugin"}, {"pref_test_misspelled_plugin": MISSPELLED_PLUGIN})
    pm, failures, sources = get_plugin_manager()
    [failure] = [f for f in failures if f.name == "misspelled"]
    assert failure.package == "pref-misspelled-plugin"
    assert "register_objectivez" in failure.error
    assert pm.get_plugin("misspelled") is None
    assert "misspelled" not in sources
    pm.check_pending()  # the bad plugin was unregistered, so nothing is left pending


def test_check_pending_catches_a_misspelled_hook_on_a_manager():
    class Misspelled:
        @hookimpl
        def register_objectivez(register):
            pass

    pm, _, _ = get_plugin_manager(load_entrypoints=False)
    pm.register(Misspelled, name="misspelled")
    with pytest.raises(pluggy.PluginValidationError, match="register_objectivez"):
        pm.check_pending()


# -- PREF_PLUGINS and PREF_TRACE_HOOKS ----------------------------------------------------------


def test_empty_allow_list_loads_only_builtins(toy_dist, monkeypatch):
    monkeypatch.setenv("PREF_PLUGINS", "")
    registry = load_registry()
    assert "toy" not in registry.names("objective")
    assert "dpo" in registry.names("objective")
    assert all(item.builtin for item in registry.items())


def test_allow_list_naming_the_distribution_loads_it(toy_dist, monkeypatch):
    monkeypatch.setenv("PREF_PLUGINS", f"some-other-dist, {THIRD_PARTY}")
    registry = load_registry()
    assert registry.get("objective", "toy").package == THIRD_PARTY
    assert "dpo" in registry.names("objective")


def test_allow_list_naming_another_distribution_skips_it(toy_dist, monkeypatch):
    monkeypatch.setenv("PREF_PLUGINS", "some-other-dist")
    assert "toy" not in load_registry().names("objective")


def test_trace_hooks_prints_hook_calls_to_stderr(monkeypatch, capfd):
    monkeypatch.setenv("PREF_TRACE_HOOKS", "1")
    pm, _, _ = get_plugin_manager(load_entrypoints=False)
    pm.register(ThrowAway, name="throw-away")
    Registry(pm)
    captured = capfd.readouterr()
    assert "register_objectives" in captured.err
    assert "register_rewards" in captured.err
    assert "register_objectives" not in captured.out


def test_no_trace_without_the_variable(capfd):
    pm, _, _ = get_plugin_manager(load_entrypoints=False)
    pm.register(ThrowAway, name="throw-away")
    Registry(pm)
    assert "register_objectives" not in capfd.readouterr().err
