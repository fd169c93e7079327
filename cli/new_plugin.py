"""`pref new-plugin NAME`: write a plugin package skeleton that installs and passes its own test.

The skeleton is `pref-NAME/` with a `pyproject.toml` declaring the entry
point, one module `pref_NAME/__init__.py` registering a reward called NAME,
and `tests/test_pref_NAME.py`. The reward is small but real (1.0 for answers
containing a keyword), so the package works before it is edited.
"""

from __future__ import annotations

import os
import re
from string import Template

import click

from pref.errors import PrefError

NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "pref-$name"
version = "0.1.0"
description = "A pref plugin: the $name reward."
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["pref"]

[project.optional-dependencies]
test = ["pytest>=8"]

# pref loads each module named in this group and calls its @hookimpl functions.
[project.entry-points.pref]
$module = "$module"

[tool.setuptools]
packages = ["$module"]

[tool.pytest.ini_options]
pythonpath = ["."]
testpaths = ["tests"]
'''

README = '''\
# pref-$name

A pref plugin with one reward, `$name`:
1.0 for answers that contain a keyword (option `keyword`, default "please"), else 0.0.

```bash
pip install -e .
pytest
pref list-plugins --kind reward
pref run --objective online-dpo --reward $name --reward-option keyword=thanks
```

Edit `$module/__init__.py` to make it yours; pref's docs/plugins.md shows every
kind of plugin (objectives, rewards, pair selectors, dataset builders, embedders).
'''

MODULE = '''\
"""pref-$name: a pref plugin with one reward, `$name`.

pref finds this module through the entry point in pyproject.toml and calls
its @hookimpl functions. Each receives `register(name, factory)`; pref
calls the factory with the user's options as keyword arguments
(`--reward-option keyword=thanks` becomes `$cls(keyword="thanks")`).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from pref import PrefError, Prompt, RewardSource, hookimpl


class $cls(RewardSource):
    """1.0 for answers that contain a keyword, else 0.0.

    Options:
        keyword: the text to look for, in any case (default "please").
    """

    #: prompts for online training when the user passes no --dataset
    default_prompts: ClassVar[list[str]] = [
        "Ask me to pass the salt.",
        "Ask a friend for help with a move.",
    ]

    def __init__(self, keyword: str = "please"):
        keyword = str(keyword).strip().lower()
        if not keyword:
            raise PrefError("$name: keyword must not be empty")
        self.keyword = keyword

    def score(self, prompts: list[Prompt], completions: list[str]) -> dict[str, torch.Tensor]:
        """`reward`, float [B]: 1.0 where the completion contains the keyword."""
        return {"reward": torch.tensor([float(self.keyword in text.lower()) for text in completions])}


@hookimpl
def register_rewards(register):
    register("$name", $cls)
'''

TEST = '''\
"""pref-$name: the reward worked out by hand, and its registration with pref."""

import pytest

import $module
from pref import PrefError
from pref.registry import Registry, get_plugin_manager


def test_reward_is_one_when_the_keyword_appears():
    reward = $module.$cls(keyword="Please")
    scores = reward.score(["Ask for the salt."] * 2, ["Pass the salt, please.", "Salt. Now."])
    assert scores["reward"].tolist() == [1.0, 0.0]


def test_empty_keyword_is_refused():
    with pytest.raises(PrefError, match="keyword must not be empty"):
        $module.$cls(keyword=" ")


def test_hook_registers_the_reward_with_its_options():
    pm, _, _ = get_plugin_manager(load_entrypoints=False)  # only this plugin, not every installed one
    pm.register($module)
    pm.check_pending()  # a misspelled hook name fails here instead of being ignored
    reward = Registry(pm).create("reward", "$name", {"keyword": "thanks"})
    assert reward.keyword == "thanks"
'''


def write_skeleton(name: str, directory: str = ".") -> str:
    """Write `pref-NAME/` under `directory`; return its path. Never overwrites."""
    if not NAME_PATTERN.fullmatch(name):
        raise PrefError(f"bad plugin name {name!r}: use lowercase letters, digits and single dashes, starting with a letter, e.g. word-count")
    root = os.path.join(directory, f"pref-{name}")
    if os.path.exists(root):
        raise PrefError(f"{root} already exists; choose another NAME or --directory")
    module = "pref_" + name.replace("-", "_")
    values = {"name": name, "module": module, "cls": "".join(part.capitalize() for part in name.split("-")) + "Reward"}
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        os.path.join(module, "__init__.py"): MODULE,
        os.path.join("tests", f"test_{module}.py"): TEST,
    }
    for relative, template in files.items():
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(Template(template).substitute(values))
    return root


@click.command("new-plugin")
@click.argument("name")
@click.option("--directory", default=".", show_default=True, help="Where to write the pref-NAME folder.")
def new_plugin(name: str, directory: str) -> None:
    """Write pref-NAME/, a plugin package with one reward and its test, ready to install."""
    root = write_skeleton(name, directory)
    click.echo(f"Wrote {root}. Next: pip install -e {root} && pytest {root}")
