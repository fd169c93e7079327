"""`pref new-plugin NAME`: the skeleton installs, passes its own tests, and pref lists it."""

import json

import pytest
from click.testing import CliRunner

from pref.cli.main import cli
from pref.cli.new_plugin import SKELETONS
from pref.registry import KIND_ALIASES, KINDS


def new_plugin(*args):
    return CliRunner().invoke(cli, ["new-plugin", *map(str, args)])


@pytest.mark.slow
def test_skeleton_installs_passes_its_test_and_is_listed(tmp_path, fresh_venv):
    result = new_plugin("word-count", "--directory", tmp_path)
    assert result.exit_code == 0, result.output
    root = tmp_path / "pref-word-count"
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
        "README.md", "pref_word_count/__init__.py", "pyproject.toml", "tests/test_pref_word_count.py",
    ]

    # plugin packages are installed next to this pref, with the build backend the test extra installed, not whatever the
    # base interpreter has
    import setuptools

    import pref

    seen = fresh_venv.run("-c", "import pref, setuptools; print(pref.__file__); print(setuptools.__version__)").stdout.split()
    assert seen == [pref.__file__, setuptools.__version__]
    fresh_venv.install(root)
    tests = fresh_venv.run("-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=root)
    assert "3 passed" in tests.stdout, tests.stdout

    listing = json.loads(fresh_venv.pref("list-plugins", "--json", "--kind", "reward").stdout)
    [row] = [row for row in listing["plugins"] if row["name"] == "word-count"]
    assert row == {
        "kind": "reward", "name": "word-count", "package": "pref-word-count", "version": "0.1.0", "builtin": False,
        "description": "1.0 for answers that contain a keyword, else 0.0.",
    }
    assert listing["failures"] == []


@pytest.mark.parametrize("name", ["Word", "word_count", "2words", "word--count", "word-", ""])
def test_bad_names_are_one_line_errors(tmp_path, name):
    result = new_plugin(name, "--directory", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: bad plugin name {name!r}: use lowercase letters, digits and single dashes")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_not_overwritten(tmp_path):
    (tmp_path / "pref-mine").mkdir()
    (tmp_path / "pref-mine" / "keep.txt").write_text("mine")
    result = new_plugin("mine", "--directory", tmp_path)
    assert result.exit_code == 2
    assert "already exists" in result.stderr and "Traceback" not in result.output
    assert [p.name for p in (tmp_path / "pref-mine").iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_each_kind_of_skeleton_passes_its_own_test(tmp_path):
    """Without installing: the generated tests import each module from its skeleton's folder (one pytest for all kinds)."""
    import os
    import subprocess
    import sys

    kinds = {"objective": ("register_objectives", 3, "objective"), "selector": ("register_pair_selectors", 2, "pair selector"),
             "dataset": ("register_dataset_builders", 2, "dataset")}
    roots = []
    for kind, (hook, _, what) in kinds.items():
        result = new_plugin(f"my-{kind}", "--directory", tmp_path, "--kind", kind)
        assert result.exit_code == 0, result.output
        root = tmp_path / f"pref-my-{kind}"
        assert f"def {hook}(register)" in (root / f"pref_my_{kind}" / "__init__.py").read_text()
        assert f"A pref plugin: the my-{kind} {what}." in (root / "pyproject.toml").read_text()
        roots.append(root)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", *(str(r / "tests") for r in roots)],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(map(str, roots))}, capture_output=True,
                          text=True, timeout=300)
    assert f"{sum(passed for _, passed, _ in kinds.values())} passed" in done.stdout, done.stdout[-3000:]
    for kind, (_, passed, _) in kinds.items():  # each skeleton's own tests ran and passed
        assert done.stdout.count(f"test_pref_my_{kind}.py::") == passed, done.stdout[-3000:]


@pytest.mark.parametrize("name, kind", [("dpo", "objective"), ("best-vs-worst", "selector"), ("repetition", "reward")])
def test_a_name_already_registered_for_the_kind_is_refused(tmp_path, name, kind):
    """Installed, the package would register the name twice, and every pref command would stop at that."""
    result = new_plugin(name, "--directory", tmp_path, "--kind", kind)
    assert result.exit_code == 2
    shown = KIND_ALIASES.get(kind, kind)  # the kind as pref list-plugins shows it
    assert f"{shown} {name!r} is already registered by pref; choose another NAME" in result.stderr and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
    assert new_plugin("dpo", "--directory", tmp_path, "--kind", "reward").exit_code == 0  # names are per kind


@pytest.mark.parametrize("name, kind", [("none", "objective"), ("true", "objective"), ("pref-error", "objective"), ("pair", "selector")])
def test_a_name_that_spells_a_python_name_still_makes_a_working_module(tmp_path, name, kind, monkeypatch):
    """An objective's class was the bare name: `none` gave `class None(Objective)`, a SyntaxError, and `pref-error`
    a class PrefError that hid pref's, so the skeleton's `raise PrefError(...)` raised a TypeError."""
    import importlib

    import pref

    assert new_plugin(name, "--directory", tmp_path, "--kind", kind).exit_code == 0
    monkeypatch.syspath_prepend(str(tmp_path / f"pref-{name}"))
    module = importlib.import_module("pref_" + name.replace("-", "_"))
    [made] = [value for value in vars(module).values() if isinstance(value, type) and value.__module__ == module.__name__]
    assert getattr(module, "PrefError", pref.PrefError) is pref.PrefError
    if kind == "objective":
        with pytest.raises(pref.PrefError, match="weight must not be negative"):
            made(weight=-1)


def test_a_directory_that_cannot_hold_the_package_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("mine")
    for directory in (tmp_path / "file", tmp_path / "file" / "below"):  # were NotADirectoryError tracebacks
        result = new_plugin("mine", "--directory", directory)
        assert result.exit_code == 2 and "give --directory a folder you can write to" in result.stderr, result.output
    assert (tmp_path / "file").read_text() == "mine"


def test_an_unknown_kind_is_refused(tmp_path):
    result = new_plugin("mine", "--directory", tmp_path, "--kind", "embedder")
    assert result.exit_code == 2 and "'embedder' is not one of" in result.output
    assert "'pair-selector'" in result.output and "'selector'" not in result.output  # each kind named one way
    assert list(tmp_path.iterdir()) == []


def test_both_commands_take_both_spellings_of_the_pair_selector_kind(tmp_path):
    """`pref new-plugin --kind selector` and `pref list-plugins --kind pair-selector` named one kind two ways; both take either,
    and their help shows the registry's name only."""
    listed = [CliRunner().invoke(cli, ["list-plugins", "--json", "--kind", kind]) for kind in ("pair-selector", "selector")]
    assert listed[0].exit_code == listed[1].exit_code == 0 and listed[0].stdout == listed[1].stdout
    assert {row["kind"] for row in json.loads(listed[0].stdout)["plugins"]} == {"pair-selector"}
    for kind in ("pair-selector", "selector"):
        assert new_plugin(f"my-{kind}", "--directory", tmp_path, "--kind", kind).exit_code == 0
        module = tmp_path / f"pref-my-{kind}" / f"pref_my_{kind.replace('-', '_')}" / "__init__.py"
        assert "def register_pair_selectors(register)" in module.read_text()
    for command in ("list-plugins", "new-plugin"):
        shown = CliRunner().invoke(cli, [command, "--help"]).stdout
        assert "|pair-selector|" in shown and "|selector|" not in shown
    assert set(SKELETONS) <= set(KINDS)  # new-plugin's kinds are the registry's

