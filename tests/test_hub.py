"""Hub ids when the hub cannot be reached: one request and a one-line error, or the local cache, with no retries.

The hub is the `unreachable_hub` fixture (conftest.py): every request huggingface_hub makes is counted and
fails to connect, or gets the answer a test gives.
"""

import peft
import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import constants

from pref.cli.main import cli
from pref.errors import PrefError
from pref.hub import _ask_hub, cache_only
from pref.models import load_model, load_tokenizer, quiet_peft
from pref.precision import checkpoint_dtype

httpx2 = pytest.importorskip("httpx2")  # huggingface_hub's HTTP library since 1.x
MODEL = "pref-test/tiny"


def test_a_hub_id_the_hub_cannot_be_asked_about_fails_at_once_in_one_line(unreachable_hub, monkeypatch):
    result = CliRunner().invoke(cli, ["generate", "--model", MODEL, "--prompt", "hi"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        f"Error: cannot load model {MODEL!r}: no such local folder, and the Hugging Face hub ({constants.ENDPOINT}) cannot be reached to "
        f"download it ([Errno -2] Name or service not known) nor is it in the local cache ({unreachable_hub.cache}); give the path of "
        "a saved model, or check the network or proxy (HF_ENDPOINT, HTTPS_PROXY)"]
    with pytest.raises(PrefError, match="cannot be reached to download it"):
        load_model(MODEL)
    assert unreachable_hub.requests == 2  # one each, none retried: huggingface_hub alone retried each file 5 times, waiting 23 s

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PrefError, match=r"not in the local Hugging Face cache .* while HF_HUB_OFFLINE is set; .* unset HF_HUB_OFFLINE"):
        load_tokenizer(MODEL)
    assert unreachable_hub.requests == 2  # offline: not asked


@pytest.mark.filterwarnings("ignore:.*pref-test/tiny:UserWarning")  # peft's saving, looking for the base model on the hub
def test_a_cached_hub_model_and_an_adapter_on_it_load_from_the_cache_when_the_hub_cannot_be_reached(unreachable_hub, tiny_model_dir,
                                                                                                     tmp_path, monkeypatch):
    hub = unreachable_hub
    hub.cache_model(MODEL, tiny_model_dir)
    tokenizer, model = load_tokenizer(MODEL), load_model(MODEL)
    assert checkpoint_dtype(MODEL) == torch.float32  # what --dtype auto reads on a GPU
    assert hub.requests == 1  # the one question, asked once for the tokenizer, the model and its dtype
    assert tokenizer("apple")["input_ids"] == load_tokenizer(tiny_model_dir)("apple")["input_ids"]
    torch.testing.assert_close(model.state_dict(), load_model(tiny_model_dir).state_dict())

    # an adapter trained on it names its hub id as its base (not the cache folder), and loads from the cache too
    with quiet_peft():
        adapted = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    adapted.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    assert peft.PeftConfig.from_pretrained(tmp_path / "adapter").base_model_name_or_path == MODEL
    hub.requests = 0  # peft's saving looks for the base model's config.json on the hub, once
    assert isinstance(load_model(str(tmp_path / "adapter")), peft.PeftModel)
    assert hub.requests == 0  # the hub's answer for MODEL is remembered

    _ask_hub.cache_clear()
    with monkeypatch.context() as offline:
        offline.setattr(constants, "HF_HUB_OFFLINE", True)
        assert cache_only(MODEL)
    assert hub.requests == 0  # offline: not asked

    # a model cached in part names what is missing
    hub.cache_model("pref-test/no-weights", tiny_model_dir, leave_out="model.safetensors")
    with pytest.raises(PrefError, match="cannot load 'pref-test/no-weights' from the local Hugging Face cache, and the hub cannot be asked "
                                        r"for what is missing \(it cannot be reached, or HF_HUB_OFFLINE is set\): "):
        load_model("pref-test/no-weights")
    assert hub.requests == 1  # its one question, no retries of the missing file

    # the hub answers: it is asked as usual (a newer revision would be downloaded), the cache is not used alone
    hub.answer = lambda request: httpx2.Response(200, headers={"X-Repo-Commit": hub.commit, "ETag": '"e"', "Content-Length": "2"}, request=request)
    _ask_hub.cache_clear()
    assert not cache_only(MODEL) and hub.requests == 2


def test_a_wrong_hub_id_while_the_hub_answers_is_still_no_such_model(unreachable_hub):
    unreachable_hub.answer = lambda request: httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"}, request=request)
    with pytest.raises(PrefError, match=f"cannot load model {MODEL!r}: no such local folder and the Hugging Face hub did not provide it; "
                                        "pass the path of a saved model"):
        load_tokenizer(MODEL)
