"""`pref new-plugin NAME`: write a plugin package skeleton that installs and passes its own test.

The skeleton is `pref-NAME/` with a `pyproject.toml` declaring the entry
point, one module `pref_NAME/__init__.py` registering a plugin called NAME of
the `--kind` asked for (a reward by default; an objective, a pair selector or a
dataset builder), and `tests/test_pref_NAME.py`. Each is small but real, so the
package works before it is edited.
"""

from __future__ import annotations

import os
import re
from string import Template

import click

from pref.cli.kinds import KindChoice
from pref.errors import PrefError
from pref.registry import KIND_ALIASES

NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "pref-$name"
version = "0.1.0"
description = "A pref plugin: the $name $kind."
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

A pref plugin with one $kind, `$name` (see its docstring in `$module/__init__.py`).

```bash
pip install -e .
pytest
pref list-plugins
$usage
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

OBJECTIVE_MODULE = '''\
"""pref-$name: a pref plugin with one objective, `$name`.

pref finds this module through the entry point in pyproject.toml and calls
its @hookimpl functions. Each receives `register(name, factory)`; pref
calls the factory with the user's options as keyword arguments
(`-o weight=0.5` becomes `$cls(weight=0.5)`).
"""

from __future__ import annotations

import torch

from pref import Objective, ObjectiveNeeds, PairBatch, Policy, PrefError, Reference, hookimpl


class $cls(Objective):
    """Raise the chosen answers' per-token log-prob, lower the rejected ones' by `weight` x theirs.

    Options:
        weight: how hard to push rejected answers down (default 0.0: only learn the chosen ones).
    """

    # pairs from `--dataset FILE` (the `preferences` builder); no reference model
    needs = ObjectiveNeeds(reference="none", data="pairs")

    def __init__(self, weight: float = 0.0):
        if weight < 0:
            raise PrefError(f"$name: weight must not be negative, got {weight}")
        self.weight = weight

    def loss(self, policy: Policy, reference: Reference | None, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """-mean(chosen) + weight x mean(rejected), over per-token average log-probs [B]."""
        chosen = policy.logps(batch.chosen).mean
        rejected = policy.logps(batch.rejected).mean
        loss = -chosen.mean() + self.weight * rejected.mean()
        return loss, {"logps/chosen": chosen.mean().item(), "logps/rejected": rejected.mean().item()}


@hookimpl
def register_objectives(register):
    register("$name", $cls)
'''

OBJECTIVE_TEST = '''\
"""pref-$name: the loss worked out by hand, and its registration with pref."""

import pytest
import torch

import $module
from pref import Logps, PairBatch, PrefError
from pref.registry import Registry, get_plugin_manager


class FixedPolicy:
    """A stand-in policy: "chosen" rows score -1 per token, others -3 (the batch's rows are these strings)."""

    def logps(self, rows, **_):
        values = torch.tensor([-1.0 if row == "chosen" else -3.0 for row in rows])
        return Logps(tokens=values[:, None], mask=torch.ones(len(rows), 1), sequence=values)


def test_loss_by_hand():
    """-mean(-1) + 0.5 x mean(-3) = 1 - 1.5 = -0.5."""
    batch = PairBatch(chosen=["chosen"] * 2, rejected=["rejected"] * 2)
    loss, metrics = $module.$cls(weight=0.5).loss(FixedPolicy(), None, batch)
    assert loss.item() == pytest.approx(-0.5)
    assert metrics == {"logps/chosen": -1.0, "logps/rejected": -3.0}


def test_negative_weight_is_refused():
    with pytest.raises(PrefError, match="weight must not be negative"):
        $module.$cls(weight=-1)


def test_hook_registers_the_objective_with_its_options():
    pm, _, _ = get_plugin_manager(load_entrypoints=False)  # only this plugin, not every installed one
    pm.register($module)
    pm.check_pending()  # a misspelled hook name fails here instead of being ignored
    objective = Registry(pm).create("objective", "$name", {"weight": 0.25})
    assert objective.weight == 0.25 and objective.needs.reference == "none"
'''

SELECTOR_MODULE = '''\
"""pref-$name: a pref plugin with one pair selector, `$name`.

pref finds this module through the entry point in pyproject.toml and calls
its @hookimpl functions. Each receives `register(name, factory)`; pref
calls the factory with the user's options as keyword arguments
(`--selector-option min_margin=0.2` becomes `$cls(min_margin=0.2)`).
"""

from __future__ import annotations

from pref import CandidatePool, PairSelector, Selection, hookimpl


class $cls(PairSelector):
    """Each prompt's best answer against its worst, when their rewards differ by at least `min_margin`.

    Options:
        min_margin: the smallest reward gap worth learning from (default 0.5).
    """

    def __init__(self, min_margin: float = 0.5):
        self.min_margin = min_margin

    def select(self, pool: CandidatePool) -> Selection:
        """(prompt, chosen k, rejected k) pairs from the [P, K] rewards."""
        selection = Selection(metrics={"pairs/too_close": 0.0})
        for prompt, rewards in enumerate(pool.scores["reward"]):
            best, worst = int(rewards.argmax()), int(rewards.argmin())
            if rewards[best] - rewards[worst] >= self.min_margin:
                selection.pairs.append((prompt, best, worst))
            else:
                selection.metrics["pairs/too_close"] += 1
        return selection


@hookimpl
def register_pair_selectors(register):
    register("$name", $cls)
'''

SELECTOR_TEST = '''\
"""pref-$name: pairs picked from a hand-made pool, and its registration with pref."""

import torch

import $module
from pref import CandidatePool
from pref.registry import Registry, get_plugin_manager


def test_best_against_worst_when_far_enough_apart():
    """Prompt 0: best k=1, worst k=0, gap 1.0: a pair. Prompt 1: gap 0.1: too close."""
    pool = CandidatePool(["a", "b"], [["x", "y", "z"]] * 2, {"reward": torch.tensor([[0.0, 1.0, 0.2], [0.5, 0.5, 0.6]])})
    selection = $module.$cls(min_margin=0.5).select(pool)
    assert selection.pairs == [(0, 1, 0)] and selection.metrics == {"pairs/too_close": 1.0}


def test_hook_registers_the_selector_with_its_options():
    pm, _, _ = get_plugin_manager(load_entrypoints=False)  # only this plugin, not every installed one
    pm.register($module)
    pm.check_pending()  # a misspelled hook name fails here instead of being ignored
    assert Registry(pm).create("pair-selector", "$name", {"min_margin": 0.2}).min_margin == 0.2
'''

DATASET_MODULE = '''\
"""pref-$name: a pref plugin with one dataset builder, `$name`.

pref finds this module through the entry point in pyproject.toml and calls
its @hookimpl functions. Each receives `register(name, factory)`; pref
calls the factory with the user's options as keyword arguments
(`--dataset $name --dataset-option path=pairs.tsv` becomes `$cls(path="pairs.tsv")`).
"""

from __future__ import annotations

import os
from typing import Any

from pref import PreferenceExample, PrefError, hookimpl


class $cls:
    """Preference pairs from a tab-separated file: prompt, chosen and rejected on each line.

    Options:
        path: the file (required).
    """

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise PrefError(f"$name: no such file {path!r}")  # checked before the model loads
        self.path = path

    def build(self, policy: Any = None) -> list[PreferenceExample]:
        """One `PreferenceExample` per non-empty line."""
        examples = []
        with open(self.path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                fields = line.rstrip("\\n").split("\\t")
                if len(fields) != 3:
                    raise PrefError(f"{self.path} line {number}: expected prompt, chosen and rejected separated by tabs")
                examples.append(PreferenceExample(*fields))
        return examples


@hookimpl
def register_dataset_builders(register):
    register("$name", $cls)
'''

DATASET_TEST = '''\
"""pref-$name: a file read by hand, and its registration with pref."""

import pytest

import $module
from pref import PreferenceExample, PrefError
from pref.registry import Registry, get_plugin_manager


def test_reads_pairs(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("Name a fruit.\\tapple\\tchair\\n\\nSay hi.\\thello\\tgo away\\n")
    assert $module.$cls(str(path)).build() == [PreferenceExample("Name a fruit.", "apple", "chair"),
                                               PreferenceExample("Say hi.", "hello", "go away")]
    path.write_text("only two\\tfields\\n")
    with pytest.raises(PrefError, match="line 1"):
        $module.$cls(str(path)).build()


def test_hook_registers_the_builder(tmp_path):
    pm, _, _ = get_plugin_manager(load_entrypoints=False)  # only this plugin, not every installed one
    pm.register($module)
    pm.check_pending()  # a misspelled hook name fails here instead of being ignored
    with pytest.raises(PrefError, match="no such file"):
        Registry(pm).create("dataset", "$name", {"path": str(tmp_path / "missing.tsv")})
'''

#: kind (as pref.registry.KINDS names it) -> (module template, test template, class-name suffix, README usage line)
SKELETONS = {
    "reward": (MODULE, TEST, "Reward", "pref run --objective online-dpo --reward $name --reward-option keyword=thanks"),
    "objective": (OBJECTIVE_MODULE, OBJECTIVE_TEST, "Objective", "pref run --objective $name --dataset prefs.jsonl -o weight=0.1"),
    "pair-selector": (SELECTOR_MODULE, SELECTOR_TEST, "Selector", "pref run --objective online-dpo --reward noun-diversity --selector $name"),
    "dataset": (DATASET_MODULE, DATASET_TEST, "Data", "pref run --objective dpo --dataset $name --dataset-option path=pairs.tsv"),
}


def write_skeleton(name: str, directory: str = ".", kind: str = "reward") -> str:
    """Write `pref-NAME/` with one plugin of `kind` (see `SKELETONS`; an alias such as `selector` too) under `directory`;
    return its path. Never overwrites."""
    kind = KIND_ALIASES.get(kind, kind)
    if not NAME_PATTERN.fullmatch(name):
        raise PrefError(f"bad plugin name {name!r}: use lowercase letters, digits and single dashes, starting with a letter, e.g. word-count")
    root = os.path.join(directory, f"pref-{name}")
    if os.path.exists(root):
        raise PrefError(f"{root} already exists; choose another NAME or --directory")
    module = "pref_" + name.replace("-", "_")
    if kind not in SKELETONS:
        raise PrefError(f"unknown plugin kind {kind!r}: choose one of {', '.join(SKELETONS)}")
    module_template, test_template, suffix, usage = SKELETONS[kind]
    values = {"name": name, "module": module, "kind": kind.replace("-", " "), "cls": "".join(part.capitalize() for part in name.split("-")) + suffix}
    values["usage"] = Template(usage).substitute(values)
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        os.path.join(module, "__init__.py"): module_template,
        os.path.join("tests", f"test_{module}.py"): test_template,
    }
    try:
        os.makedirs(root)
    except OSError as exc:
        raise PrefError(f"cannot make {root}: {exc.strerror}; give --directory a folder you can write to") from None
    for relative, template in files.items():
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(Template(template).substitute(values))
    return root


@click.command("new-plugin")
@click.argument("name")
@click.option("--directory", default=".", show_default=True, help="Where to write the pref-NAME folder.")
@click.option("--kind", type=KindChoice(list(SKELETONS)), default="reward", show_default=True, help="What the plugin provides.")
def new_plugin(name: str, directory: str, kind: str) -> None:
    """Write pref-NAME/, a plugin package with one objective, reward, pair selector or dataset builder and its test, ready to install."""
    from pref.registry import load_registry

    registered = {item.name: item for item in load_registry().items(kind)}
    if name in registered:  # installed, the package would register the name twice, which stops every pref command
        raise PrefError(f"{kind} {name!r} is already registered by {registered[name].package}; choose another NAME")
    root = write_skeleton(name, directory, kind)
    click.echo(f"Wrote {root}. Next: pip install -e {root} && pytest {root}")
