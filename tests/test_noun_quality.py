import pytest
import torch

from pref.errors import PrefError
from pref.plugins.noun_diversity import NounDiversityReward
from pref.plugins.noun_quality import NounChecker, normalize
from pref.plugins.wordnet_data import wordnet_dir
from pref.registry import load_registry


@pytest.fixture(scope="module")
def checker():
    return NounChecker()


@pytest.mark.parametrize(
    "text",
    [
        # common nouns, some of them also verbs
        "water", "book", "light", "house", "dog", "time", "music", "tree", "chair", "play", "look",
        # plurals, regular and irregular
        "apples", "children", "boxes", "leaves", "glasses",
        # first names that are also well-attested common nouns, and a rare name
        "rose", "grace", "bill", "hope", "moon",
        # punctuation and case around one word
        "Apple.", "  house!", '"Dog"', "Tree...",
    ],
)
def test_common_nouns_pass(checker, text):
    assert checker.rejection(text) is None


@pytest.mark.parametrize(
    "text, reason",
    [
        ("the cat", "not one word"),
        ("ice cream", "not one word"),
        ("  ", "empty"),
        ("?!", "empty"),
        ("dog2", "not a word"),
        ("ice-cream", "not a word"),
        ("xqzt", "rare word"),
        ("asdf", "rare word"),
        ("a", "stop word"),
        ("in", "stop word"),
        ("i", "stop word"),
        ("the", "stop word"),
        ("are", "stop word"),
        ("x", "a single letter"),
        ("quickly", "not a noun"),
        ("happy", "not a noun"),
        ("good", "mostly an adjective or adverb"),
        ("annual", "mostly an adjective or adverb"),
        ("red", "mostly an adjective or adverb"),
        ("run", "mostly a verb"),
        ("help", "mostly a verb"),
        ("Paris", "proper noun"),
        ("mary", "proper noun"),
        ("june", "proper noun"),
        ("Anna", "first name"),
        ("billy", "first name"),
        ("John", "first name"),
        ("daisy", "first name"),
    ],
)
def test_other_answers_fail_for_the_right_reason(checker, text, reason):
    assert checker.rejection(text) == reason
    assert not checker.is_common_noun(text)


def test_normalize_trims_and_lowercases_one_word():
    assert normalize("  Apple! ") == "apple"
    assert normalize("'house'.") == "house"
    assert normalize("the cat") is None
    assert normalize("...") is None


def test_min_zipf_is_the_rarity_cut(checker):
    # "dog" is about 5.1 on the Zipf scale
    assert NounChecker(min_zipf=6.0).rejection("dog") == "rare word"
    assert checker.rejection("dog") is None


def test_unknown_tagger_is_a_user_error():
    with pytest.raises(PrefError, match="spacy:<pipeline>"):
        NounChecker(tagger="nltk")


def test_missing_spacy_pipeline_says_how_to_install_it():
    with pytest.raises(PrefError, match="python -m spacy download no_such_pipeline_sm"):
        NounChecker(tagger="spacy:no_such_pipeline_sm")


@pytest.fixture(scope="module")
def spacy_pipeline(tmp_path_factory):
    """A saved spaCy pipeline that tags a few words by rule, standing in for a trained tagger."""
    import spacy

    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("attribute_ruler")
    for word, pos in [("house", "NOUN"), ("dog", "NOUN"), ("anna", "NOUN"), ("london", "PROPN"), ("happy", "ADJ")]:
        ruler.add([[{"LOWER": word}]], {"POS": pos})
    path = tmp_path_factory.mktemp("spacy-pipeline")
    nlp.to_disk(path)
    return str(path)


def test_spacy_tagger_decides_the_part_of_speech(spacy_pipeline):
    checker = NounChecker(tagger=f"spacy:{spacy_pipeline}")
    assert checker.is_common_noun("House.")
    assert checker.rejection("london") == "tagged PROPN"
    assert checker.rejection("happy") == "tagged ADJ"
    # the other rules still apply
    assert checker.rejection("anna") == "first name"
    assert checker.rejection("the dog") == "not one word"


def test_missing_names_package_is_reported_when_the_checker_is_built(monkeypatch):
    import sys

    from pref.plugins import noun_quality

    monkeypatch.setitem(sys.modules, "names", None)  # import names -> ImportError
    noun_quality.first_names.cache_clear()
    try:
        with pytest.raises(PrefError, match="pip install names"):
            NounChecker()
    finally:
        noun_quality.first_names.cache_clear()


def test_spacy_pipeline_without_a_tagger_is_refused(tmp_path):
    import spacy

    spacy.blank("en").to_disk(tmp_path)
    with pytest.raises(PrefError, match="does not tag parts of speech"):
        NounChecker(tagger=f"spacy:{tmp_path}")


def test_reward_scores_quality_only():
    reward = NounDiversityReward()
    scores = reward.score(["Name a noun."] * 4, ["Apple.", "the cat", "good", "dog"])
    expected = torch.tensor([1.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(scores["reward"], expected)
    torch.testing.assert_close(scores["quality"], expected)
    assert scores["reward"].dtype == torch.float32


def test_reward_has_default_prompts_and_is_registered():
    assert "Name one random common English noun." in NounDiversityReward.default_prompts
    assert len(NounDiversityReward.default_prompts) == 8
    registry = load_registry()
    assert registry.get("reward", "noun-diversity").factory is NounDiversityReward
    reward = registry.create("reward", "noun-diversity", {"min_zipf": 4.0})
    assert reward.checker.min_zipf == 4.0


def test_wordnet_files_are_copied_once_with_unix_line_endings(tmp_path, monkeypatch):
    monkeypatch.setenv("PREF_CACHE", str(tmp_path))
    path = wordnet_dir()
    assert path == tmp_path / "wordnet-3.0"
    data = (path / "index.noun").read_bytes()
    assert b"\r\n" not in data and data.count(b"\n") > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["wordnet-3.0"]  # no staging folder left behind
    stamp = (path / "data.noun").stat().st_mtime_ns
    assert wordnet_dir() == path
    assert (path / "data.noun").stat().st_mtime_ns == stamp


def test_unwritable_cache_is_a_user_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PREF_CACHE", str(blocker / "cache"))
    with pytest.raises(PrefError, match="set PREF_CACHE"):
        wordnet_dir()
