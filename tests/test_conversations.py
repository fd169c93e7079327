"""SFT on every assistant turn of a conversation (`--dataset-option turns=all`, TRL's assistant_only_loss): one row, each answer masked in."""

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from pref.cli.main import cli
from pref.data import collate
from pref.errors import PrefError
from pref.examples import ConversationExample, LabeledExample
from pref.plugins.sft import SFT, CompletionData, sft_loss
from pref.policy import HFPolicy

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "apple"}]


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return HFPolicy.load(tiny_model_dir)


def test_each_answer_is_masked_in_after_the_turns_before_it(policy):
    rows = policy.encode_conversations([CHAT])
    tokens = [(policy.tokenizer.decode([i]), m) for i, m in zip(rows.input_ids[0].tolist(), rows.completion_mask[0].tolist())]
    assert tokens == [("<|user|>", 0), ("Hi", 0), ("<|end|>", 0), ("<|assistant|>", 0), ("Hello", 1), ("there", 1), ("<|end|>", 1),
                      ("<|user|>", 0), ("Name", 0), ("a", 0), ("fruit", 0), (".", 0), ("<|end|>", 0), ("<|assistant|>", 0),
                      ("apple", 1), ("<|end|>", 1)]
    one = policy.encode([CHAT[:1]], ["Hello there"])  # one answer: the row its prompt and answer make
    assert torch.equal(policy.encode_conversations([CHAT[:2]]).input_ids, one.input_ids)
    assert torch.equal(policy.encode_conversations([CHAT[:2]]).completion_mask, one.completion_mask)


def test_the_sft_loss_over_every_turn_is_the_mean_over_each_answers_own_row(policy):
    """One forward over the conversation gives the loss of two rows, each an answer after the turns before it, token for token."""
    objective = SFT()
    conversation = collate(policy, [ConversationExample(CHAT)])
    loss, _ = objective.loss(policy, None, conversation)
    rows = collate(policy, [LabeledExample(CHAT[:1], "Hello there", True), LabeledExample(CHAT[:3], "apple", True)])
    out = policy.logps(rows.sequences)
    assert loss.item() == pytest.approx(sft_loss(out.tokens, out.mask).item(), rel=1e-5)
    assert objective.loss_items(conversation) == objective.loss_items(rows) == 5  # "Hello", "there", "apple" and two ends


def test_a_template_that_rewrites_earlier_turns_or_none_at_all_is_refused(policy):
    hiding = copy.deepcopy(policy.tokenizer)  # as a template that drops earlier answers' reasoning once a later turn follows
    hiding.chat_template = policy.tokenizer.chat_template.replace("(message['content'] | trim)",
                                                                   "('...' if message['role'] == 'assistant' and not loop.last else message['content'] | trim)")
    with pytest.raises(PrefError, match="writes a conversation's earlier turns otherwise once later turns follow"):
        HFPolicy(None, hiding).encode_conversations([CHAT])
    plain = copy.deepcopy(policy.tokenizer)
    plain.chat_template = None
    with pytest.raises(PrefError, match="needs the model's chat template, and this tokenizer has none"):
        HFPolicy(None, plain).encode_conversations([CHAT])


def test_the_completions_builder_reads_every_turn_when_asked(tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"prompt": "Name a tool.", "completion": "saw"}) + "\n")
    assert CompletionData(str(data)).build() == [LabeledExample(CHAT[:3], "apple", True), LabeledExample("Name a tool.", "saw", True)]
    assert CompletionData(str(data), turns="all").build() == [
        ConversationExample(CHAT), ConversationExample([{"role": "user", "content": "Name a tool."}, {"role": "assistant", "content": "saw"}])]
    with pytest.raises(PrefError, match="turns must be last .* or all"):
        CompletionData(str(data), turns="every")


def test_an_sft_run_on_every_turn(tmp_path, tiny_model_dir):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(4)))
    result = CliRunner().invoke(cli, ["run", "--objective", "sft", "--model", tiny_model_dir, "--dataset", str(data), "--dataset-option", "turns=all",
                                      "--steps", "2", "--batch-size", "2", "--device", "cpu", "--no-progress", "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert metrics[-1]["num_tokens"] == 4 * 16  # every token of the four conversations, both answers' too
