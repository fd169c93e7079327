"""Whether a model named by hub id loads from the local Hugging Face cache alone, asked once before any loading.

Without this, a hub that cannot be reached costs 23 s of waits per file: huggingface_hub retries each
file it has no copy of five times (waiting 1, 2, 4, 8 and 8 s) before the load fails, and a cached
model is retried for every optional file it lacks (a chat template, added tokens) that the cache
has not recorded as missing, before it loads.
"""

from __future__ import annotations

import functools
import os

from pref.errors import PrefError

#: The file whose metadata tells whether the hub answers: every model repository transformers loads has one.
PROBE_FILE = "config.json"
#: A model's `from_pretrained` arguments for loading from the local cache alone: transformers (5.24) looks for the model's
#: adapter_config.json with arguments of its own, asking the hub (and retrying for 23 s) unless they say so too.
FROM_CACHE = {"local_files_only": True, "adapter_kwargs": {"local_files_only": True}}


def cache_only(name: str) -> bool:
    """Whether `name` must be loaded with `local_files_only=True`: a hub id in the local Hugging Face cache while the hub cannot be reached.

    False for a local path, for a name that is no hub id, and for a hub id the hub gives any answer for
    (a model, "no such model", "gated", "busy"): the loaders then ask the hub as usual and report what it said.
    A PrefError naming the fixes for a hub id that is not cached when the hub cannot be reached, or when
    HF_HUB_OFFLINE is set. The hub is asked once per process and name, with one request and no retries.
    """
    if os.path.exists(name) or not _is_hub_id(name):
        return False
    return _ask_hub(name)


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


@functools.lru_cache(maxsize=None)  # the tokenizer, the model and the dtype check each ask: a hub that times out makes each wait
def _ask_hub(name: str) -> bool:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    cached = _in_cache(name)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return True
        raise PrefError(f"cannot load model {name!r}: no such local folder, and it is not in the local Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set; give the path of a saved model, or unset "
                        "HF_HUB_OFFLINE to download it")
    try:
        # one HEAD request: retry_on_errors is False by default, and the timeout is huggingface_hub's own (HF_HUB_ETAG_TIMEOUT)
        get_hf_file_metadata(hf_hub_url(name, PROBE_FILE), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except HfHubHTTPError:  # the hub answered: no such model, a repository without the file, gated, busy
        return False
    except Exception as exc:  # no answer: name resolution, refused connection, timeout, proxy, TLS, a server that is no hub
        if cached:
            return True
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PrefError(f"cannot load model {name!r}: no such local folder, and the Hugging Face hub ({constants.ENDPOINT}) cannot "
                        f"be reached to download it ({reason}) nor is it in the local cache ({constants.HF_HUB_CACHE}); give the "
                        "path of a saved model, or check the network or proxy (HF_ENDPOINT, HTTPS_PROXY)") from None
    return False


def _in_cache(name: str) -> bool:
    """Whether the local Hugging Face cache holds a snapshot of `name`'s main revision (whole or not: loading says what is missing)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(name, local_files_only=True)
    except Exception:  # huggingface_hub says "not cached" with errors that have changed between versions
        return False
    return True
