"""The response-length reward by hand, and both plugins as pref finds them."""

from importlib import metadata

import pytest

from pref.registry import Registry, get_plugin_manager, load_registry
from pref_simpo import response_length, simpo
from pref_simpo.response_length import ResponseLength


def test_reward_is_minus_the_distance_to_the_target():
    reward = ResponseLength(target=3)
    scores = reward.score(["Hi."] * 3, ["one two three", "one", "one two three four five"])
    assert scores["reward"].tolist() == [0.0, -2.0, -2.0]
    assert scores["words"].tolist() == [3.0, 1.0, 5.0]
    assert ResponseLength.default_prompts


def test_hooks_register_both_plugins():
    """A fresh plugin manager with only these modules: no other installed plugin interferes."""
    pm, _, _ = get_plugin_manager(load_entrypoints=False)
    pm.register(simpo)
    pm.register(response_length)
    pm.check_pending()  # a misspelled hook name would fail here
    registry = Registry(pm)
    assert registry.create("objective", "simpo", {"beta": 2.5}).beta == 2.5
    assert registry.create("reward", "response-length", {"target": 8}).target == 8


def test_installed_package_is_found_through_its_entry_points():
    try:
        version = metadata.version("pref-simpo")
    except metadata.PackageNotFoundError:
        pytest.skip("pref-simpo is not installed: pip install -e .")
    registry = load_registry()
    for kind, name in [("objective", "simpo"), ("reward", "response-length")]:
        item = registry.get(kind, name)
        assert (item.package, item.version, item.builtin) == ("pref-simpo", version, False)
