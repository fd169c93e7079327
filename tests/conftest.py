"""Shared fixtures: a private cache and tiny models built on the spot (no downloads)."""

import json
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Everything pref caches during the tests goes to one temporary folder."""
    path = tmp_path_factory.mktemp("pref-cache")
    old = os.environ.get("PREF_CACHE")
    os.environ["PREF_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("PREF_CACHE", None)
    else:
        os.environ["PREF_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A Hugging Face folder: the default model's architecture and tokenizer, briefly trained."""
    from pref.default_model import build_default_model

    path = tmp_path_factory.mktemp("tiny-model")
    build_default_model(path, seed=0, steps=20)
    return str(path)


@pytest.fixture
def prefs_file(tmp_path):
    """A small JSONL preference file in the words the tiny tokenizer knows."""
    rows = [
        {"prompt": "What is your name?", "chosen": "i am pref , a helpful assistant .", "rejected": "i am tiny , a small assistant ."},
        {"prompt": "What color is the sky?", "chosen": "the sky is blue .", "rejected": "the sky is green ."},
        {"prompt": "Name a fruit.", "chosen": "apple", "rejected": "chair"},
        {"prompt": "Name an animal.", "chosen": "dog", "rejected": "the table"},
        {"prompt": "What is the capital of france?", "chosen": "paris", "rejected": "rome"},
        {"prompt": "Say something kind.", "chosen": "you are a good friend .", "rejected": "go away ."},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)
