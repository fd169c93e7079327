"""docs/plugins.md runs, and every hook is documented and tested (registry meta-tests).

Each ```python and ```toml block of the docs follows an include comment,
`<!-- include: PATH -->` or `<!-- include: PATH#REGION -->`, and must equal
that file, or its lines between `# docs-start: REGION` and `# docs-end: REGION`.
The files are ones the test suite runs: tests/docs_examples/ (tested below)
and the example package examples/pref-simpo (tests/test_example_plugin.py).
After editing one, `python tests/test_docs.py` rewrites the docs' blocks.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.testing import assert_close

from docs_examples import adapter, dataset_builder, embedder, evaluator, labeled_objective, pair_selector, reinforce
from pref import (
    CandidatePool, LabeledBatch, Logps, PrefError, PreferenceExample, RewardSource, SamplingConfig, ScoredBatch, TextExample, hookimpl, hookspecs,
)
from pref.cli.main import cli
from pref.registry import KINDS, Registry, get_plugin_manager

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "plugins.md"
TESTED_FOLDERS = ("tests/", "examples/pref-simpo/")
INCLUDE = re.compile(r"<!-- include: (?P<path>[^#\s]+)(?:#(?P<region>[\w-]+))? -->\n```(?P<lang>\w+)\n(?P<code>.*?)^```\n", re.S | re.M)
FENCE = re.compile(r"^```(\w+)\n", re.M)
CHECKED_LANGUAGES = ("python", "toml")


def included(path: str, region: str | None = None) -> str:
    """The text an include comment stands for: a whole file, or one region of it."""
    text = (ROOT / path).read_text(encoding="utf-8")
    if region is None:
        return text
    start, end = f"# docs-start: {region}\n", f"# docs-end: {region}\n"
    assert start in text and end in text, f"{path} has no region {region!r}"
    return text.split(start, 1)[1].split(end, 1)[0]


def regenerate(docs: str) -> str:
    """The docs with every included block replaced by the current text of its file."""
    return INCLUDE.sub(lambda m: m[0][: m.start("code") - m.start()] + included(m["path"], m["region"]) + "```\n", docs)


def hook_names() -> list[str]:
    return sorted(name for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if f.__module__ == hookspecs.__name__)


# -- the docs' code is the tested code --------------------------------------------------------------


def test_every_python_and_toml_block_is_included_from_a_tested_file():
    docs = DOCS.read_text(encoding="utf-8")
    includes = list(INCLUDE.finditer(docs))
    included_fences = {m.start("lang") - 3 for m in includes}
    for fence in FENCE.finditer(docs):
        if fence[1] in CHECKED_LANGUAGES:
            line = docs.count("\n", 0, fence.start()) + 1
            assert fence.start() in included_fences, f"docs/plugins.md line {line}: a ```{fence[1]} block without an include comment"
    for match in includes:
        assert match["path"].startswith(TESTED_FOLDERS), f"{match['path']} is not run by the test suite"
        assert match["code"] == included(match["path"], match["region"]), (
            f"docs/plugins.md is out of date with {match['path']}: run `python tests/test_docs.py`"
        )
    assert len(includes) >= 8


def test_list_plugins_json_example_has_the_real_keys(tmp_path, monkeypatch):
    """The documented schema: top-level keys, a plugin row's keys and a failure row's keys."""
    [example] = [json.loads(m[1]) for m in re.finditer(r"^```json\n(.*?)^```", DOCS.read_text(encoding="utf-8"), re.S | re.M)]
    # a distribution whose plugin cannot be imported, so the output has a failure row
    info = tmp_path / "pref_docs_broken-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pref-docs-broken\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[pref]\ndocs_broken = pref_docs_missing_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PREF_PLUGINS", raising=False)
    result = CliRunner().invoke(cli, ["list-plugins", "--json"])
    real = json.loads(result.stdout)
    assert list(example) == list(real) == ["plugins", "failures"]
    assert [list(row) for row in example["plugins"]] == [list(real["plugins"][0])] * len(example["plugins"])
    assert [list(row) for row in example["failures"]] == [list(real["failures"][0])] * len(example["failures"])
    assert {row["name"]: row["builtin"] for row in real["plugins"]}["dpo"] is True


def architecture_names(text: str) -> tuple[list[str], list[str]]:
    """The source paths (`core/x.py`) and code names (`resolve_plan`, `HFPolicy(None, tokenizer)`, `needs.moves_reference`)
    in backticks in `text`; plain words (`none`, `model`) are left out, as they are values, not names."""
    spans = re.findall(r"`([^`\n]+)`", text)
    paths = [span for span in spans if re.fullmatch(r"(core|plugins|cli)/\w+\.py", span)]
    names = []
    for span in spans:
        match = re.fullmatch(r"(?:[a-z_]+(?:\(\))?\.)*([A-Za-z_]\w*)(?:\(.*\))?", span)
        if match and ("_" in match[1] or match[1][0].isupper() or span.endswith(")")):
            names.append(match[1])
    return paths, names


def test_architecture_names_only_files_and_code_that_exist():
    """docs/architecture.md is written from the code: a renamed function, class, field or file fails here, not in a reader's search."""
    paths, names = architecture_names((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    assert len(paths) >= 20 and len(names) >= 60  # the pattern still finds what the page names
    assert [path for path in paths if not (ROOT / path).is_file()] == []
    source = "\n".join(path.read_text(encoding="utf-8") for folder in ("core", "plugins", "cli") for path in (ROOT / folder).rglob("*.py"))
    elsewhere = {"set_seed", "RUN", "None"}  # accelerate's; a placeholder; Python's
    defined = [name for name in set(names) - elsewhere if not re.search(rf"^\s*(def|class) {name}\b|^\s*{name}\s*[:=]|\.{name}\b", source, re.M)]
    assert defined == [], f"docs/architecture.md names what the code does not define: {sorted(defined)}"


# -- registry meta-tests: every hook is known, documented and tested ------------------------------------


def test_every_hook_registers_a_kind():
    assert sorted(KINDS.values()) == hook_names()


def test_the_docs_name_every_kind_list_plugins_takes():
    assert f"`--kind {'|'.join(KINDS)}`" in DOCS.read_text(encoding="utf-8")


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_has_a_docstring_and_a_heading_in_the_docs(hook):
    assert inspect.getdoc(getattr(hookspecs, hook))
    assert re.search(rf"^#+ `{hook}\(register\)`$", DOCS.read_text(encoding="utf-8"), re.M), f"docs/plugins.md has no heading for {hook}"


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_is_implemented_by_a_test_plugin(hook):
    pattern = re.compile(rf"@hookimpl\s*\n\s*def {hook}\(register\)")
    users = [path for path in (ROOT / "tests").rglob("*.py") if pattern.search(path.read_text(encoding="utf-8"))]
    assert users, f"no test implements {hook}"


def test_builtin_plugins_all_load_and_use_only_known_hooks():
    pm, failures, sources = get_plugin_manager()
    pm.check_pending()  # a misspelled hook name in any loaded plugin would fail here
    assert [f for f in failures if f.package == "pref"] == []
    builtins = {ep.name for ep in metadata.distribution("pref").entry_points if ep.group == "pref"}
    assert builtins and builtins <= set(sources)


# -- the docs' examples of a pair selector, a dataset builder and an embedder ------------------------------


@pytest.fixture
def registry():
    """Only the docs' example plugins, registered as modules, the way entry points register them."""
    pm, _, _ = get_plugin_manager(load_entrypoints=False)
    for module in (pair_selector, dataset_builder, embedder):
        pm.register(module)
    pm.check_pending()
    return Registry(pm)


def test_margin_selector_pairs_best_with_worst_when_far_enough_apart(registry):
    """Prompt 0: best k=1 (1.0), worst k=0 (0.0), gap 1.0 >= 0.5: a pair. Prompt 1: gap 0.1, too close."""
    selector = registry.create("pair-selector", "margin", {"min_margin": 0.5}, embedder=None)
    pool = CandidatePool(["a", "b"], [["x", "y", "z"]] * 2, {"reward": torch.tensor([[0.0, 1.0, 0.2], [0.5, 0.5, 0.6]])})
    selection = selector.select(pool)
    assert selection.pairs == [(0, 1, 0)]
    assert selection.metrics == {"pairs/too_close": 1.0}
    assert registry.get("pair-selector", "margin").description.startswith("Best against worst answer")


def test_tab_separated_builder_reads_pairs(registry, tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("Name a fruit.\tapple\tchair\n\nSay hi.\thello\tgo away\nOne more.\tyes\tno\n")
    builder = registry.create("dataset", "tab-separated", {"path": str(path), "limit": 2})
    assert builder.build(policy=None) == [PreferenceExample("Name a fruit.", "apple", "chair"), PreferenceExample("Say hi.", "hello", "go away")]
    path.write_text("only a prompt\tand one answer\n")
    with pytest.raises(PrefError, match="line 1: expected prompt, chosen and rejected"):
        registry.create("dataset", "tab-separated", {"path": str(path)}).build(None)
    with pytest.raises(PrefError, match="no such file"):
        registry.create("dataset", "tab-separated", {"path": str(tmp_path / "missing.tsv")})


def test_character_ngram_embedder_by_hand(registry):
    """" cat " has the 3-grams " ca", "cat", "at "; " cats " has " ca", "cat", "ats", "ts ".
    They share two, so the cosine is 2 / (sqrt(3) x sqrt(4)) = 0.57735; "dog" shares none with "cat"."""
    similarity = registry.create("embedder", "char-ngrams", {"n": 3}).similarity(["cat", "cats", "Dog", "dog"])
    assert_close(similarity[0, 1], torch.tensor(0.57735), atol=1e-5, rtol=0)
    assert similarity[0, 2] == 0.0
    assert_close(similarity[2, 3], torch.tensor(1.0))
    assert_close(similarity, similarity.T)
    with pytest.raises(PrefError, match="n must be at least 1"):
        registry.create("embedder", "char-ngrams", {"n": 0})


class Length(RewardSource):
    def score(self, prompts, completions):
        return {"reward": torch.tensor([float(len(c)) for c in completions])}


@hookimpl
def register_rewards(register):
    register("length", Length)


class Answers:
    """A stand-in policy: answers greedily with these texts, in order."""

    def __init__(self, *answers):
        self.answers, self.asked = list(answers), []

    def generate(self, prompts, k, sampling):
        assert k == 1 and sampling.temperature == 0 and sampling.max_new_tokens == 7
        self.asked.extend(prompts)
        return [[answer] for answer in self.answers[: len(prompts)]]


def test_held_out_reward_evaluator_by_hand():
    """Answers "ab" and "abcd" have lengths 2 and 4: mean 3; with limit 1 only the first prompt is answered: 2."""
    pm, _, _ = get_plugin_manager(load_entrypoints=False)
    for plugin in (evaluator, sys.modules[__name__]):
        pm.register(plugin)
    registry = Registry(pm)
    records = [PreferenceExample("Say hi.", "hello", "go"), TextExample(" one", prompt="Name one.")]
    sampling = SamplingConfig(max_new_tokens=7, temperature=1.0)
    held_out_reward = registry.create("evaluator", "held-out-reward", {"reward": "length"}, sampling=sampling)
    policy = Answers("ab", "abcd")
    assert held_out_reward.evaluate(5, policy, None, records) == {"eval/length": 3.0}
    assert policy.asked == ["Say hi.", "Name one."]
    assert registry.create("evaluator", "held-out-reward", {"reward": "length", "limit": 1}, sampling=sampling).evaluate(
        5, Answers("ab", "abcd"), None, records) == {"eval/length": 2.0}
    assert held_out_reward.evaluate(5, policy, None, []) == {}
    with pytest.raises(PrefError, match="limit must be at least 1"):
        registry.create("evaluator", "held-out-reward", {"reward": "length", "limit": 0}, sampling=sampling)


# -- the docs' examples of objectives that learn from labelled sets and from scored samples ------------------


class MeanLogps:
    """A stand-in policy: `logps(...)` gives these per-row log-probs, one completion token each."""

    def __init__(self, values):
        self.values = torch.tensor(values)

    def logps(self, sequences, **_):
        return Logps(tokens=self.values[:, None], mask=torch.ones(len(self.values), 1), sequence=self.values)


def test_unlikelihood_by_hand():
    """Rows m = -1 (accepted) and -2 (rejected): terms 1 and -log(1 - e^-2) = 0.145413; mean 0.572707."""
    batch = LabeledBatch(sequences=None, labels=torch.tensor([True, False]))
    loss, metrics = labeled_objective.Unlikelihood().loss(MeanLogps([-1.0, -2.0]), None, batch)
    assert_close(loss, torch.tensor(0.572707), atol=1e-6, rtol=0)
    assert metrics == {"logps/accepted": -1.0, "logps/rejected": -2.0}
    loss, _ = labeled_objective.Unlikelihood(rejected_weight=0.0).loss(MeanLogps([-1.0, -2.0]), None, batch)
    assert_close(loss, torch.tensor(0.5))


def test_reinforce_advantages_by_hand():
    """Two prompts, K = 2: rewards (1, 0) and (3, 1) have means 0.5 and 2, so advantages (0.5, -0.5, 1, -1)."""
    batch = ScoredBatch(["a", "a", "b", "b"], ["w", "x", "y", "z"], None, {"reward": torch.tensor([1.0, 0.0, 3.0, 1.0])}, 2)
    prepared = reinforce.Reinforce().prepare(None, None, batch)
    assert_close(prepared.scores["advantage"], torch.tensor([0.5, -0.5, 1.0, -1.0]))


def test_the_example_objectives_train(tmp_path, tiny_model_dir):
    """Two steps each through `pref.train`, found by the registry as entry points find them."""
    from pref.config import build_config
    from pref.train import train

    pm, failures, sources = get_plugin_manager()
    pm.register(labeled_objective)
    pm.register(reinforce)
    registry = Registry(pm, failures, sources)
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Name a fruit.", "completion": answer, "label": label}) + "\n"
                            for answer, label in [("apple", True), ("chair", False), ("pear", True), ("go away", False)]))
    common = {"model": tiny_model_dir, "steps": 2, "batch_size": 2, "device": "cpu"}
    runs = [
        {"objective": "unlikelihood", "dataset": [str(data)], "output_dir": str(tmp_path / "sets")},
        {"objective": "reinforce", "reward": "noun-diversity", "samples_per_prompt": 2, "max_new_tokens": 4, "output_dir": str(tmp_path / "samples")},
    ]
    for flags in runs:
        out = train(build_config(flags={**common, **flags}), registry)
        lines = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
        assert [line["step"] for line in lines] == [1, 2] and all(math.isfinite(line["loss"]) for line in lines)


if __name__ == "__main__":
    DOCS.write_text(regenerate(DOCS.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"rewrote the included blocks of {DOCS.relative_to(ROOT)}")


# -- the docs' example of an adapter ---------------------------------------------------------------------


def test_the_example_adapter_is_what_a_run_trains_saves_and_merges(tmp_path, tiny_model_dir, prefs_file):
    """`--adapter ia3` from a plugin: only IA3's scales train, final/ is an IA3 adapter that pref loads, and the merged weights compute the same."""
    from pref.config import build_config
    from pref.models import load_model
    from pref.train import train_policy

    pm, failures, sources = get_plugin_manager()
    pm.register(adapter)
    config = build_config(flags={"objective": "dpo", "model": tiny_model_dir, "dataset": [prefs_file], "steps": 2, "batch_size": 2, "lr": 1e-2,
                                 "device": "cpu", "adapter": "ia3", "adapter_options": {"target_modules": "v_proj,down_proj"}, "merge_lora": True,
                                 "output_dir": str(tmp_path / "ia3")})
    out, policy = train_policy(config, Registry(pm, failures, sources))
    trained = [name for name, p in policy.model.named_parameters() if p.requires_grad]
    assert trained and all("ia3_" in name and ("v_proj" in name or "down_proj" in name) for name in trained)
    final = Path(out) / "final"
    assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == "IA3"
    adapted, merged, base = load_model(str(final)).eval(), load_model(str(final / "merged")).eval(), load_model(tiny_model_dir).eval()
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-4), "training did not move the scales"
    with pytest.raises(PrefError, match="feedforward_modules"):
        Registry(pm).create("adapter", "ia3", {"target_modules": "v_proj"})
