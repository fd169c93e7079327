"""Shared fixtures: a private cache, tiny models built on the spot and fresh virtual environments (no downloads)."""

import atexit
import contextlib
import json
import os
import shutil
import site
import subprocess
import sys
import tempfile

import pytest

# the code a model ships (tests/test_remote_code.py) is copied where transformers imports it from: a temporary folder, not the user's cache
MODULES = tempfile.mkdtemp(prefix="pref-test-modules-")
os.environ["HF_MODULES_CACHE"] = MODULES
atexit.register(shutil.rmtree, MODULES, ignore_errors=True)


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
    from pref.plugins.default_model import build_default_model

    path = tmp_path_factory.mktemp("tiny-model")
    build_default_model(path, seed=0, steps=100)
    return str(path)


def write_prefs(path):
    """Write a small JSONL preference file of plain English chats, like the default model's, to `path`; return the path as a string."""
    rows = [
        {"prompt": "What is your name?", "chosen": "I am Pref, a helpful assistant.", "rejected": "I am Tiny, a small assistant."},
        {"prompt": "What color is the sky?", "chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"prompt": "Name a fruit.", "chosen": "apple", "rejected": "chair"},
        {"prompt": "Name an animal.", "chosen": "dog", "rejected": "the table"},
        {"prompt": "What is the capital of France?", "chosen": "Paris", "rejected": "Rome"},
        {"prompt": "Say something kind.", "chosen": "You are a good friend.", "rejected": "Go away."},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture
def prefs_file(tmp_path):
    """`write_prefs`'s file, fresh for each test."""
    return write_prefs(tmp_path / "prefs.jsonl")


@pytest.fixture(scope="session")
def shared_prefs_file(tmp_path_factory):
    """`write_prefs`'s file, for fixtures that outlive a test (the tests must not change it)."""
    return write_prefs(tmp_path_factory.mktemp("shared-prefs") / "prefs.jsonl")



@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """The Hugging Face hub out of reach, and empty local caches, through huggingface_hub's own hook for its HTTP client.

    Every request huggingface_hub makes (for pref, transformers, peft, sentence-transformers or datasets) goes to
    `hub.answer(request)`, which fails to connect unless a test replaces it with one answering as the hub would;
    `hub.requests` counts the requests for test models and datasets (ids `pref-test/NAME`); `hub.cache_model(id, folder)`
    puts a saved model (but the file `leave_out`) into the local cache as the main revision of `id`;
    `hub.cache_dataset(id, file)` puts a JSONL file's rows into `datasets`' cache as the train split of hub dataset `id`.
    """
    httpx2 = pytest.importorskip("httpx2")  # huggingface_hub's HTTP library since 1.x: its client is what set_client_factory takes
    import datasets
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils._http import default_client_factory

    from pref.hub import _ask_hub

    class Hub:
        requests = 0
        cache = tmp_path / "hf-cache"
        datasets_cache = tmp_path / "datasets-cache"
        commit = "0123456789abcdef0123456789abcdef01234567"

        def answer(self, request):
            raise httpx2.ConnectError("[Errno -2] Name or service not known", request=request)

        def handle(self, request):
            self.requests += "/pref-test/" in request.url.path  # not huggingface_hub's own once-a-process requests
            return self.answer(request)

        def cache_model(self, repo_id, folder, leave_out=None):
            repo = self.cache / ("models--" + repo_id.replace("/", "--"))
            (repo / "refs").mkdir(parents=True)
            (repo / "refs" / "main").write_text(self.commit)
            shutil.copytree(folder, repo / "snapshots" / self.commit, ignore=shutil.ignore_patterns(leave_out) if leave_out else None)

        def cache_dataset(self, repo_id, data_file):
            # `datasets` prepares a folder of data files as it does a downloaded hub dataset, under NAME/default/0.0.0/HASH/:
            # a hub dataset's is ORG___NAME/..., where it looks for one it cannot download
            org, name = repo_id.split("/")
            folder = tmp_path / "hub-datasets" / name
            folder.mkdir(parents=True)
            shutil.copy(data_file, folder / "train.jsonl")
            datasets.load_dataset_builder(str(folder)).download_and_prepare()
            (self.datasets_cache / name).rename(self.datasets_cache / f"{org}___{name}")

    hub = Hub()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub.cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(hub.datasets_cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    _ask_hub.cache_clear()
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub.handle)))
    yield hub
    huggingface_hub.set_client_factory(default_client_factory)
    _ask_hub.cache_clear()

class Venv:
    """A fresh virtual environment that sees this interpreter's packages (torch, pref itself, pytest, pip, setuptools).

    The test may itself run inside a virtual environment (the README's
    `pip install -e ".[test]"` in a fresh venv): `venv --system-site-packages`
    would then see the *base* interpreter's packages, without pref and with
    whatever old build tools it has. Instead the new environment gets a `.pth`
    file that adds this interpreter's own site-packages folders, in its order
    (their `.pth` files run too, so an editable pref is found). Made
    `--without-pip`, nothing is downloaded and it takes a fraction of a second;
    pip and the build backend come from this interpreter's environment
    (the `test` extra installs a setuptools that builds wheels).
    """

    def __init__(self, path):
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
        self.python = str(path / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
        own = subprocess.run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
        os.makedirs(own, exist_ok=True)
        outer = [p for p in site.getsitepackages() if os.path.isdir(p)]
        with open(os.path.join(own, "_outer_environment.pth"), "w") as f:
            f.write(f"import site; list(map(site.addsitedir, {outer!r}))\n")
        self.env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1", "PYTHONUTF8": "1"}
        for name in ("PREF_PLUGINS", "PREF_TRACE_HOOKS", "PYTHONPATH", "PYTHONHOME"):
            self.env.pop(name, None)

    def run(self, *args, cwd=None):
        """`python ARGS` in the environment; the completed process (output as text), which must succeed."""
        result = subprocess.run([self.python, *map(str, args)], cwd=cwd, env=self.env, capture_output=True, text=True)
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, args))} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def install(self, source):
        """pip-install the package folder `source` (offline, without its dependencies)."""
        return self.run("-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet", os.path.abspath(source))

    def pref(self, *args):
        """The `pref` command as this environment sees it."""
        return self.run("-m", "pref", *args)


@pytest.fixture
def fresh_venv(tmp_path):
    return Venv(tmp_path / "venv")


class Interrupted(Exception):
    """What `interrupted_after` raises: a crash between two checkpoints."""


@pytest.fixture
def interrupted_after(monkeypatch):
    """`with interrupted_after(3): train(...)`: the run crashes once step 3 is done (logged), and must crash.

    The crash comes from the progress bar's `show`, which the loop calls after a step's logging (the bar is on by default).
    """
    from pref.plugins.loggers import ProgressBar

    @contextlib.contextmanager
    def interrupt(step):
        original = ProgressBar.show

        def show(self, at, metrics):
            original(self, at, metrics)
            if at == step:
                raise Interrupted()

        monkeypatch.setattr(ProgressBar, "show", show)
        try:
            with pytest.raises(Interrupted):
                yield
        finally:
            monkeypatch.setattr(ProgressBar, "show", original)

    return interrupt
