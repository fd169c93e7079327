"""Online batches train on the token ids the policy sampled, not on their decoded text encoded again.

The tiny model's `generate` is scripted: its answers are token ids that decoding and encoding
again does not give back (a word spelt byte by byte, a trailing space, an answer cut at
max_new_tokens without an EOS), with padding after an EOS as transformers leaves it.
"""

import pytest
import torch

from pref.interfaces import SETS, ObjectiveNeeds, PairSelector, RewardSource, SamplingConfig, ScoredBatch, Selection
from pref.models import prompt_token_ids
from pref.online import OnlineBatches
from pref.plugins.d2po import Discriminator, DiscriminatorRelabeler
from pref.plugins.divpo import BestWorstSelector, OnlineDPO
from pref.plugins.grpo import GRPO
from pref.plugins.ppo import PPO
from pref.policy import HFPolicy
from pref.reference import FrozenReference
from pref.sequences import Sequences

PROMPTS = ["Name a noun.", "Say a word."]
K = 4
SAMPLING = SamplingConfig(max_new_tokens=8)
TEXTS = ["bell", "dog", "cat sat", "sun"]  # what each sample k decodes to, for every prompt


def scripted_answers(tokenizer):
    """K answers as token ids: byte by byte (not BPE's split), canonical, cut at 8 tokens (no EOS), a trailing space."""
    def bytewise(text):
        return tokenizer.convert_tokens_to_ids(list(text.replace(" ", "Ġ")))

    eos = tokenizer.eos_token_id
    canonical = tokenizer("dog", add_special_tokens=False)["input_ids"]
    return [bytewise(" bell") + [eos], canonical + [eos], bytewise(" cat sat"), bytewise(" sun ") + [eos]]


@pytest.fixture
def policy(tiny_model_dir):
    """The tiny model, whose generate gives sample k of every prompt `scripted_answers(...)[k]`, padded after it."""
    policy = HFPolicy.load(tiny_model_dir)
    answers = scripted_answers(policy.tokenizer)
    assert max(map(len, answers)) == SAMPLING.max_new_tokens

    def generate(input_ids, num_return_sequences, max_new_tokens, pad_token_id, **_):
        rows = [answers[j % num_return_sequences] for j in range(len(input_ids) * num_return_sequences)]
        completions = torch.tensor([a + [pad_token_id] * (max_new_tokens - len(a)) for a in rows])
        return torch.cat([input_ids.repeat_interleave(num_return_sequences, 0), completions], 1)

    policy.model.generate = generate
    policy.answers = answers
    return policy


def completion_ids(sequences):
    return [ids[mask.bool()].tolist() for ids, mask in zip(sequences.input_ids, sequences.completion_mask)]


def rows_as_sampled(policy, rows):
    """The (prompt index, k) rows built by hand: the prompt's encoding, then the scripted answer."""
    prompts, answers = [prompt_token_ids(policy.tokenizer, PROMPTS[p]) for p, _ in rows], [policy.answers[k] for _, k in rows]
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))

    def padded(parts):
        return torch.tensor([row + [0] * (width - len(row)) for row in parts])

    return Sequences(padded([p + a for p, a in zip(prompts, answers)]), padded([[1] * (len(p) + len(a)) for p, a in zip(prompts, answers)]),
                     padded([[0] * len(p) + [1] * len(a) for p, a in zip(prompts, answers)]))


def test_samples_are_the_ids_sampled_up_to_the_eos_and_the_text_rewards_read(policy):
    samples = policy.sample(PROMPTS, K, SAMPLING)
    assert samples.completions == [TEXTS] * 2
    assert completion_ids(samples.sequences) == policy.answers * 2  # padding after the EOS dropped, none added to the cut one
    assert samples.truncated.tolist() == [False, False, True, False] * 2  # max_new_tokens cut "cat sat" before its EOS
    flat_prompts = [p for p in PROMPTS for _ in range(K)]
    assert torch.equal(samples.sequences.input_ids, rows_as_sampled(policy, [(p, k) for p in range(2) for k in range(K)]).input_ids)
    # the text encoded again is other ids for all but the canonical answer: what training on it got wrong
    again = completion_ids(policy.encode(flat_prompts, [t for _ in PROMPTS for t in TEXTS]))
    assert [a == b for a, b in zip(again, completion_ids(samples.sequences))] == [False, True, False, False] * 2
    assert policy.generate(PROMPTS, K, SAMPLING) == samples.completions


def test_sampled_ids_are_cut_to_max_length(policy):
    policy.max_length = len(prompt_token_ids(policy.tokenizer, PROMPTS[0])) + 3
    rows = completion_ids(policy.sample(PROMPTS[:1], K, SAMPLING).sequences)
    assert rows == [answer[:3] for answer in policy.answers]


def test_an_end_of_turn_token_the_model_declares_ends_an_answer_too(tiny_model_dir):
    """A chat model's generation config may end answers with an end-of-turn token besides the tokenizer's EOS (Gemma's
    <end_of_turn>, Phi-3's <|end|>): sampling stops at it, the answer ends with it, and the limit did not cut it."""
    policy = HFPolicy.load(tiny_model_dir)
    eos, end_of_turn = policy.tokenizer.eos_token_id, policy.tokenizer.convert_tokens_to_ids("!")
    assert end_of_turn not in (eos, policy.tokenizer.pad_token_id, policy.tokenizer.unk_token_id)
    policy.model.generation_config.eos_token_id = [eos, end_of_turn]
    words = policy.tokenizer("dog cat", add_special_tokens=False)["input_ids"]
    scripted, asked = [words + [end_of_turn], words + [9, 9, 9]], []

    def generate(input_ids, num_return_sequences, max_new_tokens, pad_token_id, eos_token_id, **_):
        asked.append(eos_token_id)
        rows = [scripted[j % num_return_sequences] for j in range(len(input_ids) * num_return_sequences)]
        padded = [row + [pad_token_id] * (max_new_tokens - len(row)) for row in rows]
        return torch.cat([input_ids.repeat_interleave(num_return_sequences, 0), torch.tensor(padded)], 1)

    policy.model.generate = generate
    samples = policy.sample(PROMPTS[:1], 2, SamplingConfig(max_new_tokens=len(words) + 3))
    assert asked == [[eos, end_of_turn]]
    assert completion_ids(samples.sequences) == [words + [end_of_turn], words + [9, 9, 9]]
    assert samples.truncated.tolist() == [False, True]
    assert policy.stop_ids == [eos, end_of_turn]


def test_answers_come_from_the_policy_whatever_sampling_settings_its_generation_config_holds(tiny_model_dir):
    """A generation config's repetition penalty, n-gram ban, typical or min-p filtering would draw answers from another
    distribution than the log-probs the objectives score: sampling sets them neutral (transformers fills what a call
    leaves unset from the config), so the answers are those of a model without them."""
    plain = HFPolicy.load(tiny_model_dir)
    tuned = HFPolicy.load(tiny_model_dir)
    tuned.model.generation_config.update(repetition_penalty=20.0, no_repeat_ngram_size=1, typical_p=0.2, min_p=0.5, epsilon_cutoff=0.1)
    for sampling in (SamplingConfig(max_new_tokens=12), SamplingConfig(max_new_tokens=12, temperature=1.0)):
        torch.manual_seed(0)
        expected = plain.sample(PROMPTS, 2, sampling)
        torch.manual_seed(0)
        assert completion_ids(tuned.sample(PROMPTS, 2, sampling).sequences) == completion_ids(expected.sequences)


def test_min_p_keeps_the_tokens_near_the_likeliest_one(tiny_model_dir):
    """min_p 0.999 keeps only the likeliest token at each step (ties aside): every sample is the greedy answer; without it they differ."""
    policy = HFPolicy.load(tiny_model_dir)
    greedy = policy.generate(PROMPTS, 1, SamplingConfig(max_new_tokens=12, temperature=0.0))
    torch.manual_seed(0)
    assert policy.generate(PROMPTS, 4, SamplingConfig(max_new_tokens=12, temperature=1.0, min_p=0.999)) == [row * 4 for row in greedy]
    torch.manual_seed(0)
    assert policy.generate(PROMPTS, 4, SamplingConfig(max_new_tokens=12, temperature=1.0)) != [row * 4 for row in greedy]


class Indexed(RewardSource):
    """Reward = position of the completion in the call: in each pool the last sample is best, the first worst."""

    def score(self, prompts, completions):
        return {"reward": torch.arange(len(completions), dtype=torch.float32)}


@pytest.mark.parametrize("selector", [BestWorstSelector, lambda: DiscriminatorRelabeler(Discriminator(), Indexed(), budget=0)],
                         ids=["best-vs-worst", "d2po"])
def test_pairs_are_the_sampled_ids(policy, selector):
    data = OnlineBatches(policy, PROMPTS, Indexed(), selector(), OnlineDPO.needs, K, SAMPLING, prompts_per_step=2, seed=0)
    batch, _ = data.next()
    assert completion_ids(batch.chosen) == [policy.answers[3]] * 2 and completion_ids(batch.rejected) == [policy.answers[0]] * 2
    # no padding column beyond the longest row picked
    assert batch.rejected.attention_mask[:, -1].any() and batch.chosen.attention_mask[:, -1].any()


class Picking(PairSelector):
    """Picks the same sets every time and keeps the pools it saw; asks for log-probs."""

    needs_logps = True

    def __init__(self):
        self.pools = []

    def select(self, pool):
        self.pools.append(pool)
        return Selection(accepted=[(0, 1), (1, 2)], rejected=[(0, 3)])


def test_sets_and_the_selectors_log_probs_are_of_the_sampled_ids(policy):
    selector = Picking()
    data = OnlineBatches(policy, PROMPTS, Indexed(), selector, ObjectiveNeeds(data=SETS, online=True), K, SAMPLING, 2, seed=0)
    batch, _ = data.next()
    prompt_order = [PROMPTS.index(p) for p in selector.pools[0].prompts]  # the order shuffles the prompts
    assert completion_ids(batch.sequences) == [policy.answers[k] for k in (1, 2, 3)] and batch.labels.tolist() == [True, True, False]
    by_hand = rows_as_sampled(policy, [(p, k) for p in prompt_order for k in range(K)])
    with torch.no_grad():
        expected = policy.logps(by_hand).sequence.reshape(2, K)
    torch.testing.assert_close(selector.pools[0].logps, expected)


@pytest.mark.parametrize("packing", [False, True])
def test_grpo_old_log_probs_are_of_the_sampled_ids(policy, packing):
    policy.packing = packing
    objective = GRPO(num_iterations=2)
    data = OnlineBatches(policy, PROMPTS, Indexed(), None, objective.needs, K, SAMPLING, 2, seed=0)
    step, _ = data.next()
    rollout: ScoredBatch = step.rollout.batch
    assert completion_ids(rollout.sequences) == policy.answers * 2
    assert rollout.completions == TEXTS * 2
    assert rollout.truncated.tolist() == [text == "cat sat" for text in rollout.completions]
    prepared = objective.prepare(policy, None, rollout)
    with torch.no_grad():
        expected = policy.logps(rows_as_sampled(policy, [(PROMPTS.index(p), k % K) for k, p in enumerate(rollout.prompts)]))
    torch.testing.assert_close(prepared.old_logps, expected.tokens.float())


def test_ppo_old_log_probs_are_of_the_sampled_ids(policy):
    objective = PPO()
    objective.setup(policy)
    data = OnlineBatches(policy, PROMPTS, Indexed(), None, objective.needs, K, SAMPLING, 2, seed=0)
    step, _ = data.next()
    rollout = step.rollout.batch
    prepared = objective.prepare(policy, FrozenReference.copy_of(policy.model), rollout)
    with torch.no_grad():
        expected = policy.logps(rows_as_sampled(policy, [(PROMPTS.index(p), k % K) for k, p in enumerate(rollout.prompts)]))
    assert completion_ids(prepared.sequences) == policy.answers * 2
    torch.testing.assert_close(prepared.logps, expected.tokens.float())
