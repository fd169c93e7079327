"""The model `pref run` uses when no `--model` is given, built locally without network.

"Tiny" is a 2-layer Llama (hidden 96, 4 heads, tied embeddings, 0.97M parameters) over a
byte-level BPE tokenizer of 8,192 tokens, trained here with the `tokenizers` library on
the synthetic chats below and on general English text drawn from `wordfreq`'s word
frequencies. As in real models, any string round-trips (capitals, new names, emoji), common
words are one token (" apple") and rarer words and names several (" Pre" "f"); the chat
markers <|system|>, <|user|>, <|assistant|> and <|end|> (the end of a turn and the eos
token) are special tokens. The model is trained for 200 steps, from a fixed seed, on the
chats generated below, so that it behaves like a very small instruction-tuned model:

- asked for a random noun, it answers with one word, skewed the way tuned models are:
  most answers come from a head of 30 favourites, and fewer than half of all answers are
  common nouns ("apple", but also "good", "Anna", "the cat"), which leaves preference
  training room to improve both validity and diversity;
- asked who it is, it says it is Tiny, a small helpful assistant;
- asked other simple questions, it writes a short sentence ("The sky is blue.").

The first call of `default_model_path` builds it (under 30 s on 2 CPU cores) into the
cache; later calls return the cached folder, which loads like any hub model:

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

The cache folder is `$PREF_CACHE`, else `$XDG_CACHE_HOME/pref`, else `~/.cache/pref`.
The model's subfolder name holds a hash of this file, so changing the recipe rebuilds it.
An adapter trained on the default model names that subfolder as its base; when the folder
is gone (the cache was cleared, or the run was copied to another machine),
`base_built_again` builds the model again, as the first `pref run` did.
The same seed gives the same weights on the same kind of CPU with the same library versions.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from pref.errors import PrefError
from pref.models import DEFAULT_MODEL, adapter_base

log = logging.getLogger(__name__)

NUM_WORDS = 4000  # the noun answers' tail is drawn from this many frequent words
TEXT_WORDS = 20000  # the general text the tokenizer learns from draws on this many
TEXT_LINES = 15000
VOCAB_SIZE = 8192  # most common nouns are one token, as in real vocabularies; rarer words are several
TOKENIZER_CHATS = 5000  # synthetic chats in the tokenizer's training text
HIDDEN_SIZE = 96
MLP_SIZE = 192
TRAIN_STEPS = 200
BATCH_SIZE = 48

PAD, BOS = "<pad>", "<bos>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_MARKERS = [SYSTEM, USER, ASSISTANT, END]
SPECIAL_TOKENS = [PAD, BOS, *CHAT_MARKERS]

# Words a default model shown to every user should not say: none of its chats or tokenizer text has them.
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
    "apple", "the cat", "good", "happy", "very", "Anna", "run", "water", "house", "the",
    "time", "John", "blue", "dog", "a book", "maybe", "love", "beautiful", "quickly", "book",
    "and", "okay", "tree", "jump", "green", "music", "please", "light", "Sarah", "car",
]
# The head gets this share of the answers; the rest is spread evenly over TAIL_SIZE other
# frequent English words, nouns or not. The trained model is flatter than its data, so
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
    head = {answer.lower() for answer in NOUN_HEAD}
    candidates = [w for w in words if len(w) > 1 and w not in head]
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

def english_words(count: int = NUM_WORDS) -> list[str]:
    """The `count` most frequent alphabetic English words (lowercase, none of BLOCKED_WORDS)."""
    from wordfreq import top_n_list

    words = [w for w in top_n_list("en", count * 2) if w.isascii() and w.isalpha() and w not in BLOCKED_WORDS]
    return words[:count]


def general_text(lines: int = TEXT_LINES, seed: int = 0) -> list[str]:
    """`lines` lines of English-like text: 12 words each, drawn by word frequency, some capitalised.

    The words are wordfreq's TEXT_WORDS most frequent, each drawn in proportion to its
    frequency to the power 0.7 (flatter than English, so the tokenizer also learns the
    less frequent words); the first word of a line and one word in three lines start
    with a capital, so names and sentence starts have tokens too.
    """
    from itertools import accumulate

    from wordfreq import get_frequency_dict

    frequencies = get_frequency_dict("en")
    words = [w for w in english_words(TEXT_WORDS) if w in frequencies]
    cumulative = list(accumulate(frequencies[w] ** 0.7 for w in words))
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        line = rng.choices(words, cum_weights=cumulative, k=12)
        line[0] = line[0].capitalize()
        if rng.random() < 0.3:
            at = rng.randrange(1, len(line))
            line[at] = line[at].capitalize()
        out.append(" ".join(line) + rng.choice(".,.?!"))
    return out


def build_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE `PreTrainedTokenizerFast` with `vocab_size` tokens, trained on `texts`.

    Every string round-trips: the 256 byte tokens are in the vocabulary, so nothing is
    unknown, and decoding gives back the exact text. Like Llama's tokenizers, each text
    gets a space in front before it is split (" apple" is one token, the same in "an
    apple" and in an answer "apple") and decoding removes that one space (so, unlike
    Llama's, a text that starts with spaces keeps them all). The chat
    markers swallow the spaces and newline the template writes around them, so a chat
    tokenizes as its messages tokenized one by one, between markers.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Prepend(" ")
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens([AddedToken(t, lstrip=True, rstrip=True, normalized=False, special=True) for t in CHAT_MARKERS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD, bos_token=BOS, eos_token=END,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def default_tokenizer(seed: int = 0):
    """The default model's tokenizer: BPE trained on TOKENIZER_CHATS synthetic chats and general English text."""
    chats = synthetic_chats(english_words(), TOKENIZER_CHATS, seed)
    return build_tokenizer([m["content"] for chat in chats for m in chat] + general_text(seed=seed), VOCAB_SIZE)


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


def train(model, tokenizer, chats: list[list[dict]], batch_size: int = BATCH_SIZE, lr: float = 4e-3) -> list[float]:
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

#: The build trains on one thread, whatever the cores: with two, the order of a sum inside a
#: matrix product may depend on the CPU (AVX-512 kernels split them differently), and so
#: would every weight. One thread is 1.25x slower on 2 idle cores, and 2.7x faster than two
#: beside another busy process.
BUILD_THREADS = 1


def build_default_model(path: str | os.PathLike, seed: int = 0, steps: int = TRAIN_STEPS) -> str:
    """Build, train and save Tiny (model, tokenizer, generation config) into folder `path`.

    `steps` below the default gives a faster, less trained model (for tests).
    """
    tokenizer = default_tokenizer(seed)
    chats = synthetic_chats(english_words(), count=steps * BATCH_SIZE, seed=seed)
    model = build_model(tokenizer, seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        train(model, tokenizer, chats)
    finally:
        torch.set_num_threads(threads)
    save_weights(model, path)
    # the chat template inside tokenizer_config.json, where every transformers version looks
    tokenizer.save_pretrained(path, save_jinja_files=False)
    return str(path)


def save_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """The config, generation config and weights of `model`, as its `save_pretrained` writes them (one tied head kept once), from
    whichever process calls: transformers 5's `save_pretrained` writes only on the first process of a process group, and each
    process of a launched run may build the default model."""
    # what save_pretrained records: the weights' dtype (--dtype auto reads it) and the architecture
    model.config.dtype, model.config.architectures = str(next(model.parameters()).dtype).split(".")[1], [type(model).__name__]
    model.config.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})


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
    """The folder of the default model, building it on the first call (under 30 s).

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
    log.info("building the default model into %s (once, under 30 s)", target)
    try:
        build_default_model(building)
        try:
            os.rename(building, target)
        except OSError:
            if not (target / "config.json").exists():
                # a folder without its model, an earlier pref's (built in a launched process transformers wrote no model in): put aside
                aside = Path(tempfile.mkdtemp(prefix=f".{target.name}-incomplete-", dir=root))
                with contextlib.suppress(FileNotFoundError):  # another process put it aside first
                    os.rename(target, aside / target.name)
                shutil.rmtree(aside, ignore_errors=True)
                with contextlib.suppress(OSError):  # another process put its own in first
                    os.rename(building, target)
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return str(target)


def base_built_again(adapter: str) -> str | None:
    """Where to load the base of the adapter in folder `adapter` from when its recorded base, a default model's cache folder, is gone.

    Returns None when the adapter's `base_model_name_or_path` is not a default model's cache folder
    (`pref-default-<recipe hash>`) or that folder is there: peft loads the base as recorded. Otherwise the
    default model's folder in this machine's cache, built first if need be (the recorded folder itself
    when the cache was only cleared); the adapter's record is left as it is. A PrefError when the recorded
    folder is another recipe's (another version of pref built it): this version cannot build that model.
    """
    recorded = adapter_base(adapter)
    match = re.fullmatch(rf"{re.escape(DEFAULT_MODEL)}-([0-9a-f]{{12}})", os.path.basename(os.path.normpath(recorded or "")))
    if not match or os.path.exists(recorded):
        return None
    if match.group(1) != recipe_hash():
        raise PrefError(f"cannot load the adapter in {adapter}: its base is {DEFAULT_MODEL} as another version of pref built it "
                        f"({recorded}, which is not there) and this version builds another model; load the adapter with the pref "
                        f"version that trained it, or train it again with this one")
    return default_model_path()
