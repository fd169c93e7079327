"""Whether a model or dataset named by hub id loads from a local cache alone, asked once before any loading.

Without this, a hub that cannot be reached costs 23 s of waits per file: huggingface_hub retries each
file it has no copy of five times (waiting 1, 2, 4, 8 and 8 s) before the load fails, and a cached
model is retried for every optional file it lacks (a chat template, added tokens) that the cache
has not recorded as missing, before it loads. `datasets` waits as long for a dataset's card before
it looks in its own cache, and prints each retry.
"""

from __future__ import annotations

import functools
import glob
import os

from pref.errors import PrefError

#: Per repository type, a file whose metadata request tells whether the hub answers: every model repository transformers loads
#: has a config.json; a dataset's card is what `datasets` asks for first (a repository without the file is an answer too).
PROBE_FILES = {"model": "config.json", "dataset": "README.md"}
#: A model's `from_pretrained` arguments for loading from the local cache alone: transformers (5.24) looks for the model's
#: adapter_config.json with arguments of its own, asking the hub (and retrying for 23 s) unless they say so too.
FROM_CACHE = {"local_files_only": True, "adapter_kwargs": {"local_files_only": True}}
#: Per repository type, for the errors: what a local one is, whose cache keeps downloaded ones, what to give instead of a hub id.
WORDS = {"model": ("folder", "Hugging Face", "the path of a saved model"),
         "dataset": ("file or folder", "datasets", "a local data file (JSONL, JSON, CSV or Parquet) or a folder saved with datasets' save_to_disk")}


def cache_only(name: str, repo_type: str = "model") -> bool:
    """Whether `name` must be loaded from the local cache alone: a hub id in it while the hub cannot be reached.

    `repo_type` "model": the cache is huggingface_hub's (HF_HUB_CACHE), read with `FROM_CACHE`; "dataset": the
    datasets `datasets` prepared before, in its own cache (HF_DATASETS_CACHE), read with `datasets.config.HF_HUB_OFFLINE`.
    False for a local path, for a name that is no hub id, and for a hub id the hub gives any answer for
    (a model, "no such model", "gated", "busy"): the loaders then ask the hub as usual and report what it said.
    A PrefError naming the fixes for a hub id that is not cached when the hub cannot be reached, or when
    offline mode is set. The hub is asked once per process, name and type, with one request and no retries.
    """
    if os.path.exists(name) or not _is_hub_id(name):
        return False
    return _ask_hub(name, repo_type)


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


@functools.lru_cache(maxsize=None)  # the tokenizer, the model and the dtype check each ask: a hub that times out makes each wait
def _ask_hub(name: str, repo_type: str) -> bool:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    cached, cache, offline = _in_cache(name, repo_type), _cache_folder(repo_type), _offline(repo_type)
    local, owner, instead = WORDS[repo_type]
    if offline:
        if cached:
            return True
        raise PrefError(f"cannot load {repo_type} {name!r}: no such local {local}, and it is not in the local "
                        f"{owner} cache ({cache}) while {offline} is set; give {instead}, "
                        f"or unset {offline} to download it")
    try:
        # one HEAD request: retry_on_errors is False by default, and the timeout is huggingface_hub's own (HF_HUB_ETAG_TIMEOUT)
        get_hf_file_metadata(hf_hub_url(name, PROBE_FILES[repo_type], repo_type=repo_type), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except HfHubHTTPError:  # the hub answered: no such repository, a repository without the file, gated, busy
        return False
    except Exception as exc:  # no answer: name resolution, refused connection, timeout, proxy, TLS, a server that is no hub
        if cached:
            return True
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PrefError(f"cannot load {repo_type} {name!r}: no such local {local}, and the Hugging Face hub ({constants.ENDPOINT}) cannot "
                        f"be reached to download it ({reason}) nor is it in the local cache ({cache}); give {instead}, "
                        "or check the network or proxy (HF_ENDPOINT, HTTPS_PROXY)") from None
    return False


def _offline(repo_type: str) -> str | None:
    """The environment variable that set offline mode for `repo_type`, or None."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE"
    if repo_type == "dataset":
        from datasets import config

        if config.HF_HUB_OFFLINE:  # HF_DATASETS_OFFLINE, or HF_HUB_OFFLINE as `datasets` read it when imported
            return "HF_DATASETS_OFFLINE" if os.environ.get("HF_DATASETS_OFFLINE") else "HF_HUB_OFFLINE"
    return None


def _cache_folder(repo_type: str) -> str:
    from huggingface_hub import constants

    if repo_type == "model":
        return constants.HF_HUB_CACHE
    from datasets import config

    return config.HF_DATASETS_CACHE


def _in_cache(name: str, repo_type: str) -> bool:
    """Whether the local cache holds `name`: for a model a snapshot of its main revision (whole or not: loading says what is
    missing), for a dataset a version `datasets` prepared (whichever revision and configuration: loading says which is missing)."""
    if repo_type == "dataset":
        from datasets.naming import camelcase_to_snakecase

        # `datasets` keeps a hub dataset as ORG___NAME/CONFIGURATION/VERSION/HASH/ (CachedDatasetModuleFactory looks there too)
        *namespace, dataset = name.split("/")
        folder = os.path.join(_cache_folder(repo_type), "___".join([*namespace, camelcase_to_snakecase(dataset)]))
        return any(os.path.isdir(path) for path in glob.glob(os.path.join(glob.escape(folder), "*", "*", "*")))
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(name, local_files_only=True)
    except Exception:  # huggingface_hub says "not cached" with errors that have changed between versions
        return False
    return True
