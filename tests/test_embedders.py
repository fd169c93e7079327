import pytest
import torch

from pref.errors import PrefError
from pref.interfaces import Embedder
from pref.plugins.embedders import SentenceTransformerEmbedder, WordNetEmbedder
from pref.registry import load_registry

WORDS = ["dog", "cat", "democracy", "apples", "apple", "xqzt", "Dog."]


@pytest.fixture(scope="module")
def wordnet_similarity():
    return WordNetEmbedder().similarity(WORDS)


def test_wordnet_related_words_are_closer(wordnet_similarity):
    dog, cat, democracy = 0, 1, 2
    assert wordnet_similarity[dog, cat] > 0.8
    assert wordnet_similarity[dog, democracy] < 0.3
    assert wordnet_similarity[dog, cat] > wordnet_similarity[dog, democracy]


def test_wordnet_similarity_is_symmetric_with_ones_on_the_diagonal(wordnet_similarity):
    assert wordnet_similarity.shape == (len(WORDS), len(WORDS))
    torch.testing.assert_close(wordnet_similarity, wordnet_similarity.T)
    torch.testing.assert_close(wordnet_similarity.diagonal(), torch.ones(len(WORDS)))


def test_wordnet_compares_base_forms_and_ignores_case_and_punctuation(wordnet_similarity):
    assert wordnet_similarity[3, 4] == 1.0  # apples ~ apple
    assert wordnet_similarity[0, 6] == 1.0  # dog ~ Dog.


def test_wordnet_unknown_word_is_unlike_everything_else(wordnet_similarity):
    unknown = WORDS.index("xqzt")
    others = [i for i in range(len(WORDS)) if i != unknown]
    assert wordnet_similarity[unknown, others].abs().sum() == 0.0


def test_wordnet_caches_each_pair_once():
    embedder = WordNetEmbedder()
    embedder.similarity(["dog", "cat", "dog"])
    assert list(embedder._pairs) == [("cat", "dog")]


def test_wordnet_empty_input():
    assert WordNetEmbedder().similarity([]).shape == (0, 0)


@pytest.fixture(scope="module")
def tiny_sentence_model(tmp_path_factory):
    """A sentence-transformers folder: a 1-layer BERT with random weights and a 12-word vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizer

    try:  # sentence-transformers >= 6 moved the modules
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Pooling, Transformer
    from sentence_transformers import SentenceTransformer

    root = tmp_path_factory.mktemp("tiny-sentence-model")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "dog", "cat", "house", "tree", "democracy", "a", "the"]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    bert_dir = root / "bert"
    BertTokenizer(str(root / "vocab.txt")).save_pretrained(bert_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    BertModel(config).save_pretrained(bert_dir)
    transformer = Transformer(str(bert_dir), max_seq_length=16)
    model = SentenceTransformer(modules=[transformer, Pooling(16)], device="cpu")
    model.save(str(root / "sentence"))
    return str(root / "sentence")


@pytest.mark.slow  # importing sentence-transformers takes several seconds
def test_sentence_transformers_loads_a_local_folder(tiny_sentence_model):
    embedder = SentenceTransformerEmbedder(model=tiny_sentence_model, device="cpu")
    texts = ["dog", "cat", "the house", "a tree", "democracy"]
    similarity = embedder.similarity(texts)
    assert isinstance(embedder, Embedder)
    assert similarity.shape == (5, 5) and similarity.dtype == torch.float32
    torch.testing.assert_close(similarity, similarity.T)
    torch.testing.assert_close(similarity.diagonal(), torch.ones(5), atol=1e-5, rtol=0)
    assert embedder.similarity([]).shape == (0, 0)


@pytest.mark.slow
def test_sentence_transformers_loads_a_cached_hub_id_when_the_hub_cannot_be_reached(tiny_sentence_model, unreachable_hub):
    unreachable_hub.cache_model("pref-test/sentence", tiny_sentence_model)
    texts = ["dog", "the house", "democracy"]
    cached = SentenceTransformerEmbedder(model="pref-test/sentence", device="cpu").similarity(texts)
    torch.testing.assert_close(cached, SentenceTransformerEmbedder(model=tiny_sentence_model, device="cpu").similarity(texts))
    assert unreachable_hub.requests == 1  # asked once, not retried
    with pytest.raises(PrefError, match="cannot load model 'pref-test/other': no such local folder, and the Hugging Face hub .* cannot be "
                                        "reached to download it"):
        SentenceTransformerEmbedder(model="pref-test/other")
    assert unreachable_hub.requests == 2


@pytest.mark.slow
def test_sentence_transformers_bad_model_is_a_one_line_user_error(tmp_path):
    with pytest.raises(PrefError, match="pass a local folder") as caught:
        SentenceTransformerEmbedder(model=str(tmp_path))  # an empty folder, not a model
    assert "\n" not in str(caught.value)


def test_sentence_transformers_missing_folder_is_named(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(PrefError, match="does not exist"):
        SentenceTransformerEmbedder(model=missing)


def test_embedders_are_registered():
    registry = load_registry()
    assert registry.get("embedder", "wordnet").factory is WordNetEmbedder
    assert registry.get("embedder", "sentence-transformers").factory is SentenceTransformerEmbedder
