"""The model `pref run` uses when no `--model` is given, built locally without network.

"Tiny" is a 2-layer Llama (hidden 96, 4 heads, tied embeddings, 0.6M parameters) over a
word-level tokenizer: 4,000 common English words from `wordfreq`, the numbers 0-100,
punctuation and the chat markers <|system|>, <|user|>, <|assistant|> and <|end|> (the
end of a turn and the eos token). It is trained for 300 steps, from a fixed seed, on
chats generated below, so that it behaves like a very small instruction-tuned model:

- asked for a random noun, it answers with one word, skewed the way tuned models are:
  most answers come from a head of 30 favourites, and fewer than half of all answers are
  common nouns ("apple", but also "good", "anna", "the cat"), which leaves preference
  training room to improve both validity and diversity;
- asked who it is, it says it is Tiny, a small helpful assistant;
- asked other simple questions, it writes a short sentence ("the sky is blue.").

The first call of `default_model_path` builds it (about 20 s on 2 CPU cores) into the
cache; later calls return the cached folder, which loads like any hub model:

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

The cache folder is `$PREF_CACHE`, else `$XDG_CACHE_HOME/pref`, else `~/.cache/pref`.
The model's subfolder name holds a hash of this file, so changing the recipe rebuilds it.
The same seed gives the same weights on the same kind of CPU with the same library versions.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from pref.models import DEFAULT_MODEL

log = logging.getLogger(__name__)

NUM_WORDS = 4000
HIDDEN_SIZE = 96
MLP_SIZE = 192
TRAIN_STEPS = 300
BATCH_SIZE = 48

PAD, UNK, BOS = "<pad>", "<unk>", "<bos>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [PAD, UNK, BOS, SYSTEM, USER, ASSISTANT, END]
PUNCTUATION = list(".,!?;:'\"()-")
NUMBERS = [str(n) for n in range(101)]

# Words a default model shown to every user should not say; they are left out of the vocabulary.
BLOCKED_WORDS = {
    "fuck", "fucking", "fucked", "fuckin", "shit", "bitch", "dick", "cock", "pussy", "porn",
    "rape", "bullshit", "crap", "nazi", "sex", "sexy", "ass", "damn", "naked", "kill", "killed",
    "killing", "murder", "suicide",
}

# No BOS anywhere: the first chat marker starts every sequence, so text rendered by the
# template and then tokenized, or tokenized by the template, gives the same ids.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|> ' + (message['content'] | trim) + ' <|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------
# The synthetic chats
# ---------------------------------------------------------------------------------------

NOUN_PROMPTS = [
    "Name one random common English noun.",
    "Give me a random noun.",
    "Say one common noun.",
    "Name a noun.",
    "Tell me one random English noun.",
    "Pick a common noun at random.",
    "Write one noun.",
    "Give me one random common noun. Answer with one word.",
]

# The favourite answers, most likely first (weights 1/rank). Only some are common nouns:
# the rest are adjectives, verbs, function words, names and two-word answers.
NOUN_HEAD = [
    "apple", "the cat", "good", "happy", "very", "anna", "run", "water", "house", "the",
    "time", "john", "blue", "dog", "a book", "maybe", "love", "beautiful", "quickly", "book",
    "and", "okay", "tree", "jump", "green", "music", "please", "light", "sarah", "car",
]
# The head gets this share of the answers; the rest is spread evenly over TAIL_SIZE other
# words of the vocabulary, nouns or not. The trained model is flatter than its data, so
# about 3/4 of its answers come from the head.
HEAD_SHARE = 0.8
TAIL_SIZE = 1000

IDENTITY_PROMPTS = [
    "What is your name?",
    "Who are you?",
    "Who made you?",
    "What are you called?",
    "Introduce yourself.",
    "Tell me about yourself.",
    "What should I call you?",
    "Are you a person?",
]
IDENTITY_ANSWERS = [
    "I am Tiny, a small helpful assistant.",
    "My name is Tiny.",
    "I am Tiny, a very small language model.",
    "You can call me Tiny. I am here to help.",
    "I am Tiny, an assistant. How can I help you?",
]

SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are Tiny, a small assistant."]

COLORS = {"sky": "blue", "grass": "green", "sun": "yellow", "snow": "white", "night": "black", "blood": "red"}
ANIMALS = ["dog", "cat", "horse", "bird", "fish", "bear", "wolf", "lion", "mouse", "duck"]
CAPITALS = {"france": "paris", "japan": "tokyo", "italy": "rome", "egypt": "cairo"}
THINGS = ["house", "tree", "book", "city", "river", "garden", "school", "friend", "song", "road",
          "window", "table", "mountain", "market", "kitchen", "letter", "picture", "island"]
ADJECTIVES = ["old", "big", "small", "quiet", "beautiful", "warm", "green", "bright", "new", "happy"]


def _general_chat(rng: random.Random) -> tuple[str, str]:
    """A simple question and a one-sentence answer."""
    kind = rng.randrange(6)
    if kind == 0:
        thing = rng.choice(list(COLORS))
        return f"What color is the {thing}?", f"The {thing} is {COLORS[thing]}."
    if kind == 1:
        animal = rng.choice(ANIMALS)
        return f"What is a {animal}?", f"A {animal} is an animal."
    if kind == 2:
        country = rng.choice(list(CAPITALS))
        return f"What is the capital of {country.title()}?", f"The capital of {country.title()} is {CAPITALS[country].title()}."
    if kind == 3:
        thing, adjective = rng.choice(THINGS), rng.choice(ADJECTIVES)
        return f"Write a sentence about a {thing}.", f"The {thing} is {adjective} and I like it."
    if kind == 4:
        return rng.choice(["Hello!", "Hi.", "Hello, how are you?"]), "Hello! I am fine. How can I help you today?"
    return rng.choice(["Can you help me?", "Please help me.", "I need help."]), "Yes, I can help you. What do you need?"


def _noun_answers(words: list[str], seed: int) -> tuple[list[str], list[float]]:
    """The answers to noun prompts and their probabilities: a Zipf head and a flat tail."""
    rng = random.Random(seed)
    candidates = [w for w in words if len(w) > 1 and w not in NOUN_HEAD]
    tail = rng.sample(candidates, TAIL_SIZE)
    head_weights = [1 / rank for rank in range(1, len(NOUN_HEAD) + 1)]
    total = sum(head_weights)
    weights = [HEAD_SHARE * w / total for w in head_weights] + [(1 - HEAD_SHARE) / TAIL_SIZE] * TAIL_SIZE
    return NOUN_HEAD + tail, weights


def synthetic_chats(words: list[str], count: int, seed: int = 0) -> list[list[dict]]:
    """`count` chats of a user message, an answer and sometimes a system message first.

    60% ask for a noun, 15% ask who the assistant is, 25% ask a simple question.
    """
    rng = random.Random(seed)
    answers, weights = _noun_answers(words, seed)
    chats = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.6:
            prompt, answer = rng.choice(NOUN_PROMPTS), rng.choices(answers, weights)[0]
        elif roll < 0.75:
            prompt, answer = rng.choice(IDENTITY_PROMPTS), rng.choice(IDENTITY_ANSWERS)
        else:
            prompt, answer = _general_chat(rng)
        chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.15:
            chat.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        chats.append(chat)
    return chats


# ---------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------

def _corpus_words() -> set[str]:
    """Every word the synthetic chats use, so none of them is <unk>."""
    texts = NOUN_PROMPTS + NOUN_HEAD + IDENTITY_PROMPTS + IDENTITY_ANSWERS + SYSTEM_PROMPTS + THINGS + ADJECTIVES
    texts += list(COLORS) + list(COLORS.values()) + ANIMALS + list(CAPITALS) + list(CAPITALS.values())
    texts += [q + " " + a for q, a in (_general_chat(random.Random(i)) for i in range(200))]
    return {w for text in texts for w in "".join(c if c.isalpha() else " " for c in text.lower()).split()}


def english_words(count: int = NUM_WORDS) -> list[str]:
    """The `count` most frequent alphabetic English words, then the chats' missing words."""
    from wordfreq import top_n_list

    words = [w for w in top_n_list("en", count * 2) if w.isascii() and w.isalpha() and w not in BLOCKED_WORDS]
    words = words[:count]
    return words + sorted(_corpus_words() - set(words))


def build_tokenizer(words: list[str]):
    """A word-level `PreTrainedTokenizerFast`: lowercases, splits on spaces and punctuation."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + PUNCTUATION + NUMBERS + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation("isolated"),
    ])
    # The WordPiece decoder joins tokens with spaces, except those starting with "##"
    # (no word does), and its cleanup removes the space before . , ! ? ("tiny , a" ->
    # "tiny, a"); the Replace steps glue ) ; : to the word before them the same way.
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(mark, "##" + mark) for mark in ");:"] + [decoders.WordPiece(prefix="##", cleanup=True)]
    )
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=END,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
        padding_side="right",
    )


def build_model(tokenizer, seed: int = 0):
    """A randomly initialised small `LlamaForCausalLM` over `tokenizer`'s vocabulary."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN_SIZE, intermediate_size=MLP_SIZE, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        tie_word_embeddings=True, rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # leaves the caller's random state alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, max_new_tokens=64,
    )
    return model


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------

def _encode_chats(tokenizer, chats: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per chat; the answer ids end with <|end|>.

    The template renders an assistant turn as "<|assistant|> answer <|end|>", so prompt +
    answer equals the template's encoding of the whole chat. Encodings are memoised: the
    chats repeat a few hundred distinct strings.
    """
    prompts: dict[tuple, list[int]] = {}
    answers: dict[str, list[int]] = {}
    out = []
    for chat in chats:
        key = tuple((m["role"], m["content"]) for m in chat[:-1])
        if key not in prompts:
            prompts[key] = tokenizer.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
        answer = chat[-1]["content"]
        if answer not in answers:
            answers[answer] = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        out.append((prompts[key], answers[answer]))
    return out


def _padded(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids [B, T] and a mask [B, T] of the answer tokens."""
    width = max(len(prompt) + len(answer) for prompt, answer in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    answer_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, (prompt, answer) in enumerate(rows):
        input_ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        answer_mask[row, len(prompt) : len(prompt) + len(answer)] = True
    return input_ids, answer_mask


def train(model, tokenizer, chats: list[list[dict]], batch_size: int = BATCH_SIZE, lr: float = 3e-3) -> list[float]:
    """Fine-tune `model` once through `chats`, loss on answer tokens only; returns the losses.

    Each batch is run as two halves, its shorter and its longer rows, whose gradients add
    up to the whole batch's: one-word answers are much shorter than sentences, and padding
    them all to the longest row would double the work.
    """
    examples = _encode_chats(tokenizer, chats)
    steps = math.ceil(len(examples) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    losses = []
    model.train()
    for step in range(steps):
        # determine the learning rate: linear warmup, then cosine decay to a tenth
        if step < warmup:
            rate = (step + 1) / warmup
        else:
            rate = 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr * rate

        # forward and backward, half a batch at a time; causal attention never looks at
        # the padding on the right, so no attention mask is needed, and the vocabulary
        # projection is only computed where the next token is an answer token
        rows = sorted(examples[step * batch_size : (step + 1) * batch_size], key=lambda e: len(e[0]) + len(e[1]))
        answer_tokens = sum(len(answer) for _, answer in rows)
        half = (len(rows) + 1) // 2
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for part in (rows[:half], rows[half:]):
            if not part:
                continue
            input_ids, answer_mask = _padded(part, tokenizer.pad_token_id)
            hidden = model.model(input_ids=input_ids).last_hidden_state
            predicts = answer_mask[:, 1:]
            logits = model.lm_head(hidden[:, :-1][predicts])
            part_loss = torch.nn.functional.cross_entropy(logits, input_ids[:, 1:][predicts], reduction="sum") / answer_tokens
            part_loss.backward()
            loss += part_loss.item()

        # update
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss)
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------
# Building and caching
# ---------------------------------------------------------------------------------------

def build_default_model(path: str | os.PathLike, seed: int = 0, steps: int = TRAIN_STEPS) -> str:
    """Build, train and save Tiny (model, tokenizer, generation config) into folder `path`.

    `steps` below the default gives a faster, less trained model (for tests). Training runs
    on one thread: the weights then do not depend on the number of cores, and on 2 shared
    cores a second thread made training several times slower, not faster.
    """
    words = english_words()
    tokenizer = build_tokenizer(words)
    model = build_model(tokenizer, seed)
    chats = synthetic_chats(words, count=steps * BATCH_SIZE, seed=seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(model, tokenizer, chats)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(path)
    # the chat template inside tokenizer_config.json, where every transformers version looks
    tokenizer.save_pretrained(path, save_jinja_files=False)
    return str(path)


def default_cache_dir() -> Path:
    """$PREF_CACHE, else $XDG_CACHE_HOME/pref, else ~/.cache/pref."""
    if os.environ.get("PREF_CACHE"):
        return Path(os.environ["PREF_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "pref"
    return Path.home() / ".cache" / "pref"


def recipe_hash() -> str:
    """A hash of this file and the transformers major version: a change to either rebuilds."""
    from importlib.metadata import version

    major = version("transformers").split(".")[0]
    return hashlib.sha256(Path(__file__).read_bytes() + major.encode()).hexdigest()[:12]


def default_model_path(cache_dir: str | os.PathLike | None = None) -> str:
    """The folder of the default model, building it on the first call (about 20 s).

    Safe when several processes call it at once: each builds into its own temporary
    folder next to the target and renames it into place; the rename is atomic, so the
    target is either missing or complete, and a process that loses the race discards
    its copy.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"{DEFAULT_MODEL}-{recipe_hash()}"
    if (target / "config.json").exists():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    log.info("building the default model into %s (once, about 20 s)", target)
    try:
        build_default_model(building)
        try:
            os.rename(building, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return str(target)
