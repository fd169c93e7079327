"""The embedded default model: built offline, cached, loaded like a hub model, skewed, and able to say anything.

The full recipe is built once per recipe version into pytest's cache folder (about
20 s the first time, nothing after); the other tests build a few-step model or none.
"""

import collections
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pref.cli.main import cli
from pref.config import build_config
from pref.models import DEFAULT_MODEL, adapter_base, completion_token_ids, load_model
from pref.plugins import default_model
from pref.plugins.default_model import NOUN_HEAD, NOUN_PROMPTS, VOCAB_SIZE, build_default_model, default_model_path
from pref.plugins.identity_shift import IdentityShift
from pref.policy import HFPolicy
from pref.registry import load_registry
from pref.train import train


@pytest.fixture(scope="session")
def default_root(request, tmp_path_factory):
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("pref-default-model") if cache else tmp_path_factory.mktemp("pref-default-model")


@pytest.fixture(scope="session")
def default_path(default_root):
    return default_model_path(default_root)


@pytest.fixture(scope="session")
def loaded(default_path):
    return AutoModelForCausalLM.from_pretrained(default_path), AutoTokenizer.from_pretrained(default_path)


def user(text):
    return [{"role": "user", "content": text}]


def sample(model, tokenizer, prompts, per_prompt, max_new_tokens):
    """`per_prompt` answers to each prompt, sampled at temperature 1 from left-padded prompts."""
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(user(p), tokenize=False, add_generation_prompt=True) for p in prompts]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             num_return_sequences=per_prompt, max_new_tokens=max_new_tokens)
    return [t.strip() for t in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]


def answer(model, tokenizer, prompt):
    """The greedy answer to one prompt."""
    ids = tokenizer.apply_chat_template(user(prompt), add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, max_new_tokens=20)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_folder_loads_like_a_hub_model(default_path, loaded):
    model, tokenizer = loaded
    files = {p.name for p in Path(default_path).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    config = json.loads((Path(default_path) / "tokenizer_config.json").read_text())
    assert config["chat_template"] and config["eos_token"] == "<|end|>"
    assert config["pad_token"] == "<pad>" and config["bos_token"] == "<bos>"
    assert tokenizer.unk_token is None  # byte-level: no text is unknown
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.vocab_size == len(tokenizer) and model.config.eos_token_id == tokenizer.eos_token_id
    assert Path(default_path).name.startswith(DEFAULT_MODEL + "-")


def test_noun_answers_are_one_word_and_skewed(loaded):
    model, tokenizer = loaded
    answers = sample(model, tokenizer, NOUN_PROMPTS, per_prompt=25, max_new_tokens=8)
    counts = collections.Counter(answers)
    top30 = sum(n for _, n in counts.most_common(30))
    assert len(answers) == 200
    assert sum(len(a.split()) == 1 for a in answers) > 0.75 * len(answers)
    assert 15 <= len(counts) <= 150
    assert top30 > 0.5 * len(answers)
    # the favourites, right or wrong, are the likeliest answers
    assert counts.most_common(1)[0][0] in NOUN_HEAD
    assert sum(n for a, n in counts.items() if a in NOUN_HEAD) > 0.5 * len(answers)


def test_says_it_is_tiny_and_answers_in_sentences(loaded):
    model, tokenizer = loaded
    assert "Tiny" in answer(model, tokenizer, "What is your name?")
    assert "Tiny" in answer(model, tokenizer, "Who are you?")
    assert "blue" in answer(model, tokenizer, "What color is the sky?")
    assert answer(model, tokenizer, "What is the capital of France?").startswith("The capital of ")


def test_chat_template_adds_no_bos_and_one_eos_per_turn(loaded):
    _, tokenizer = loaded
    chat = [{"role": "system", "content": "You are a helpful assistant."}, *user("Name a noun."),
            {"role": "assistant", "content": "apple"}]
    ids = tokenizer.apply_chat_template(chat, return_dict=False)
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    # tokenizing the rendered text adds nothing the template did not write
    assert tokenizer(text)["input_ids"] == ids
    assert tokenizer.bos_token_id not in ids
    assert ids.count(tokenizer.eos_token_id) == len(chat)
    prompt = tokenizer.apply_chat_template(chat[:-1], add_generation_prompt=True, return_dict=False)
    assert prompt[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert ids == prompt + tokenizer("apple")["input_ids"] + [tokenizer.eos_token_id]


def random_text(rng, length):
    """`length` characters from across unicode: ASCII, accented letters, CJK, emoji, spaces and newlines."""
    ranges = [(0x20, 0x7E), (0xC0, 0x17F), (0x4E00, 0x4E80), (0x1F600, 0x1F64F), (0x9, 0xA)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(length))


def test_any_text_round_trips(loaded):
    _, tokenizer = loaded
    rng = random.Random(0)
    texts = ["I am Pref, a helpful assistant.", "Zyxwv", "ZYXWV zyxwv", "Hello 😀!", "  two leading spaces",
             "\nnewline first", "trailing space ", "", "naïve café, 東京, Ünïcödé", "tab\tthen, (parenthesis) ; colon:"]
    texts += [random_text(rng, rng.randint(1, 40)) for _ in range(200)]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        # what pref trains on: the completion's ids then <|end|>
        assert tokenizer.decode(completion_token_ids(tokenizer, text), skip_special_tokens=True) == text


def test_words_split_like_a_real_tokenizer(loaded):
    """Frequent words are one token (with the space before them), rare words and new names several."""
    _, tokenizer = loaded
    pieces = lambda text: tokenizer.tokenize(text)  # noqa: E731
    assert len(tokenizer) == VOCAB_SIZE
    for word in ["apple", "house", "the", "Tiny", "Name", "assistant"]:
        assert len(pieces(word)) == 1, pieces(word)
    assert pieces("an apple")[1] == pieces("apple")[0]  # the same token inside a sentence and alone
    assert 2 <= len(pieces("Pref")) <= 4 and 3 <= len(pieces("Zyxwv")) <= 6
    assert 2 <= len(pieces("photosynthesis")) <= 6
    assert len(pieces("Hello 😀")) > 2  # the emoji as its UTF-8 bytes


def test_favourite_answers_are_training_answers():
    chats = default_model.synthetic_chats(default_model.english_words(), count=2000)
    assert set(NOUN_HEAD) <= {c[-1]["content"] for c in chats}


def test_identity_shift_on_the_default_model_spells_the_new_name(default_path):
    """The renaming pairs use the model's own answers ("I am Tiny, ...") with "Pref" in the name's place, and
    the chosen answers tokenize to ids that decode back to "Pref" (a word-level vocabulary made it <unk>)."""
    torch.manual_seed(0)
    policy = HFPolicy.load(default_path)
    pairs = IdentityShift(original_name="Tiny", new_name="Pref").build(policy)
    own = [p for p in pairs if p.rejected != "I am Tiny, an AI assistant."]
    assert len(own) >= len(pairs) // 2  # most pairs are the model's own answers, not the template
    for pair in pairs:
        assert "Tiny" in pair.rejected and "Tiny" not in pair.chosen
        assert pair.chosen == pair.rejected.replace("Tiny", "Pref")
        ids = completion_token_ids(policy.tokenizer, pair.chosen)
        assert policy.tokenizer.decode(ids, skip_special_tokens=True) == pair.chosen


def test_same_seed_gives_the_same_weights_and_tokenizer(tmp_path):
    first = load_file(os.path.join(build_default_model(tmp_path / "a", seed=0, steps=3), "model.safetensors"))
    second = load_file(os.path.join(build_default_model(tmp_path / "b", seed=0, steps=3), "model.safetensors"))
    other = load_file(os.path.join(build_default_model(tmp_path / "c", seed=1, steps=3), "model.safetensors"))
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_cached_model_is_reused(default_root, default_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(default_model, "build_default_model", no_build)
    assert default_model_path(default_root) == default_path


def fake_build(path, seed=0, steps=0):
    Path(path, "config.json").write_text("{}")
    return str(path)


def test_changed_recipe_builds_a_new_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "build_default_model", fake_build)
    first = default_model_path(tmp_path)
    monkeypatch.setattr(default_model, "recipe_hash", lambda: "changed")
    second = default_model_path(tmp_path)
    assert first != second and Path(second).name == f"{DEFAULT_MODEL}-changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([Path(first).name, Path(second).name])


def test_losing_a_build_race_keeps_the_winners_folder(tmp_path, monkeypatch):
    target = tmp_path / f"{DEFAULT_MODEL}-{default_model.recipe_hash()}"

    def build_while_another_process_finishes_first(path, seed=0, steps=0):
        fake_build(path)
        target.mkdir()
        (target / "config.json").write_text('{"winner": true}')
        return str(path)

    monkeypatch.setattr(default_model, "build_default_model", build_while_another_process_finishes_first)
    assert default_model_path(tmp_path) == str(target)
    assert json.loads((target / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # the loser's copy is gone


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_build(path, seed=0, steps=0):
        raise RuntimeError("out of disk")

    monkeypatch.setattr(default_model, "build_default_model", broken_build)
    with pytest.raises(RuntimeError):
        default_model_path(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("PREF_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model.default_cache_dir() == tmp_path / "xdg" / "pref"
    monkeypatch.setenv("PREF_CACHE", str(tmp_path / "pref"))
    assert default_model.default_cache_dir() == tmp_path / "pref"
    monkeypatch.setattr(default_model, "build_default_model", fake_build)
    assert Path(default_model_path()).parent == tmp_path / "pref"


def test_the_threads_torch_is_set_to_do_not_change_the_built_weights(tmp_path):
    """The build trains on one thread whatever torch was set to: on a CPU with AVX-512, two threads train other weights."""
    from safetensors.torch import load_file

    threads, built = torch.get_num_threads(), []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            default_model.build_default_model(tmp_path / str(count), seed=1, steps=3)
            assert torch.get_num_threads() == count  # given back
            built.append(load_file(tmp_path / str(count) / "model.safetensors"))
    finally:
        torch.set_num_threads(threads)
    assert built[0].keys() == built[1].keys()
    for key, value in built[0].items():
        assert torch.equal(value, built[1][key]), key


def test_an_adapter_on_the_default_model_loads_after_its_cache_folder_is_gone(tmp_path, tiny_model_dir, prefs_file, monkeypatch):
    """A LoRA run on the default model records the cache folder as its base (peft loads it while it is there); with the
    folder removed, or the run copied to a machine whose cache is elsewhere, pref builds the default model again."""
    monkeypatch.setenv("PREF_CACHE", str(tmp_path / "cache"))
    builds = []

    def build_tiny(path, seed=0, steps=0):  # the default model's stand-in: the few-step model every test shares
        builds.append(path)
        shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
        return str(path)

    monkeypatch.setattr(default_model, "build_default_model", build_tiny)
    config = build_config(flags={"objective": "dpo", "dataset": [prefs_file], "output_dir": str(tmp_path / "run"), "steps": 1,
                                 "batch_size": 2, "lr": 1e-2, "device": "cpu", "lora": True})
    final = os.path.join(train(config, load_registry()), "final")
    base = adapter_base(final)
    assert base == default_model_path() and len(builds) == 1
    assert ModelCard.load(os.path.join(final, "README.md")).data.base_model == DEFAULT_MODEL  # not the cache folder
    ids = torch.tensor([[5, 9, 13, 2]])
    with torch.no_grad():
        trained = load_model(final)(ids).logits

    shutil.rmtree(base)
    with torch.no_grad():
        torch.testing.assert_close(load_model(final)(ids).logits, trained)
    assert len(builds) == 2 and os.path.isdir(base) and adapter_base(final) == base  # built again where the adapter says

    shutil.rmtree(base)
    monkeypatch.setenv("PREF_CACHE", str(tmp_path / "elsewhere"))
    with torch.no_grad():
        torch.testing.assert_close(load_model(final)(ids).logits, trained)
    assert len(builds) == 3 and not os.path.exists(base) and Path(builds[-1]).parent == tmp_path / "elsewhere"

    monkeypatch.setattr(default_model, "recipe_hash", lambda: "0123456789ab")  # a later pref, whose default model is another
    result = CliRunner().invoke(cli, ["generate", "--model", final, "--prompt", "hi"])
    assert result.exit_code == 2 and len(builds) == 3
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert Path(base).name in result.output and "another version of pref" in result.output


def test_a_launched_process_other_than_the_first_builds_a_whole_model(tmp_path, monkeypatch):
    """transformers 5 writes a model on a process group's first process only: the default model is written by pref itself, so each
    process of `accelerate launch` on an empty cache builds a whole one (before 2026-12-02 the second built a folder holding the
    tokenizer alone, which could win the race and break the cache)."""
    import transformers.distributed.mixin as mixin

    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    path = build_default_model(tmp_path / "second", seed=0, steps=3)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(path))
    monkeypatch.undo()
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "transformers")  # the same files as transformers writes: the config (its dtype), the weights' names
    assert json.loads(Path(path, "config.json").read_text()) == json.loads((tmp_path / "transformers" / "config.json").read_text())
    assert load_file(os.path.join(path, "model.safetensors")).keys() == load_file(tmp_path / "transformers" / "model.safetensors").keys()


def test_an_incomplete_cached_folder_is_replaced(tmp_path, monkeypatch):
    """A cache folder without its model (what an earlier pref could leave, above) is put aside for a whole one, and nothing else stays."""
    target = tmp_path / f"{DEFAULT_MODEL}-{default_model.recipe_hash()}"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(default_model, "build_default_model", fake_build)
    assert default_model_path(tmp_path) == str(target) and (target / "config.json").exists()
    assert not (target / "tokenizer.json").exists() and [p.name for p in tmp_path.iterdir()] == [target.name]
