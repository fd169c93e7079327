"""The example third-party package, examples/pref-simpo, installed as a user would install it.

It goes into a fresh virtual environment (which sees pref and torch from the
system), then: its own tests pass there, `pref list-plugins --json` lists its
plugins with its version, and `pref run --objective simpo` trains with it.
"""

import json
import os
import shutil

import pytest

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "pref-simpo")

pytestmark = pytest.mark.slow


@pytest.fixture
def simpo_venv(fresh_venv, tmp_path):
    # pip builds in the source folder; a copy keeps build/ and *.egg-info out of the checkout
    source = tmp_path / "pref-simpo"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"))
    fresh_venv.install(source)
    fresh_venv.source = source
    return fresh_venv


def test_example_package_installs_lists_tests_and_trains(simpo_venv, tiny_model_dir, prefs_file, tmp_path):
    listing = json.loads(simpo_venv.pref("list-plugins", "--json").stdout)
    rows = {(row["kind"], row["name"]): row for row in listing["plugins"]}
    for kind, name in [("objective", "simpo"), ("reward", "response-length")]:
        row = rows[(kind, name)]
        assert (row["package"], row["version"], row["builtin"]) == ("pref-simpo", "0.1.0", False)
        assert row["description"]
    assert rows[("objective", "dpo")]["builtin"] is True
    assert listing["failures"] == []

    tests = simpo_venv.run("-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=simpo_venv.source)
    assert "6 passed" in tests.stdout and "skipped" not in tests.stdout, tests.stdout

    out = tmp_path / "run"
    simpo_venv.pref("run", "--objective", "simpo", "--dataset", prefs_file, "--model", tiny_model_dir, "--steps", "2",
                    "--batch-size", "2", "--device", "cpu", "--output-dir", out)
    assert os.path.exists(out / "final" / "config.json")
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2]
    record = json.load(open(out / "run.json"))
    assert record["config"]["objective"] == "simpo"

