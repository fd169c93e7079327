"""Hub ids of models and datasets when the hub cannot be reached: one request and a one-line error, or the local cache, with no retries.

The hub is the `unreachable_hub` fixture (conftest.py): every request huggingface_hub makes is counted and
fails to connect, or gets the answer a test gives.
"""

import datasets
import peft
import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import constants

from pref.cli.main import cli
from pref.errors import PrefError
from pref.hub import _ask_hub, cache_only
from pref.models import load_model, load_tokenizer, quiet_peft
from pref.plugins.records import read_records
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


# Datasets: `--dataset org/name` and `--validation-dataset org/name`, read by read_records

DATASET = "pref-test/prefs"


def test_a_hub_dataset_the_hub_cannot_be_asked_about_fails_at_once_in_one_line(unreachable_hub, monkeypatch, capfd):
    with pytest.raises(PrefError) as error:
        read_records(DATASET)
    assert str(error.value) == (
        f"cannot load dataset {DATASET!r}: no such local file or folder, and the Hugging Face hub ({constants.ENDPOINT}) cannot be "
        f"reached to download it ([Errno -2] Name or service not known) nor is it in the local cache ({unreachable_hub.datasets_cache}); "
        "give a local data file (JSONL, JSON, CSV or Parquet) or a folder saved with datasets' save_to_disk, or check the network or "
        "proxy (HF_ENDPOINT, HTTPS_PROXY)")
    assert unreachable_hub.requests == 1  # not retried: datasets alone retried its card 5 times, waiting 23 s
    assert capfd.readouterr().err == ""  # nor printed each retry

    _ask_hub.cache_clear()
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # HF_DATASETS_OFFLINE=1 as datasets reads it
    with pytest.raises(PrefError, match=r"not in the local datasets cache .* while HF_HUB_OFFLINE is set; give .* or unset HF_HUB_OFFLINE"):
        read_records(DATASET)
    assert unreachable_hub.requests == 1  # offline: not asked


def test_a_hub_dataset_datasets_has_cached_loads_from_its_cache_when_the_hub_cannot_be_reached(unreachable_hub, prefs_file, capfd):
    unreachable_hub.cache_dataset(DATASET, prefs_file)
    capfd.readouterr()
    assert list(read_records(DATASET)) == list(read_records(prefs_file))
    assert unreachable_hub.requests == 1 and not datasets.config.HF_HUB_OFFLINE  # offline for that load alone
    assert capfd.readouterr().err == ""  # not datasets' "Using the latest cached version of the dataset since ..."
    with pytest.raises(PrefError, match=fr"^{DATASET}: could not load it from the local datasets cache \(ValueError: Unknown split "
                                        r"\"test\"\. Should be one of \['train'\]\.\), and the hub cannot be asked"):
        read_records(DATASET, split="test")
    assert unreachable_hub.requests == 1


def test_a_wrong_hub_dataset_name_while_the_hub_answers_is_still_no_such_dataset(unreachable_hub):
    unreachable_hub.answer = lambda request: httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"}, request=request)
    with pytest.raises(PrefError, match=f"^{DATASET}: no such file or folder, and no hub dataset of that name could be loaded "
                                        rf"\(DatasetNotFoundError: Dataset '{DATASET}' doesn't exist on the Hub or cannot be accessed\.\)"):
        read_records(DATASET)
