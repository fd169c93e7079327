"""Log-probs cover completion tokens only: the prompt and the padding are masked out."""

import torch
from torch.testing import assert_close

from pref.policy import HFPolicy
from pref.sequences import Sequences, logps_from_logits


def test_hand_computed_logps_mask_prompt_and_padding():
    # vocab of 2, uniform logits except position 1 which strongly predicts token 1
    logits = torch.zeros(1, 4, 2)
    logits[0, 1] = torch.tensor([0.0, 2.0])
    seqs = Sequences(
        input_ids=torch.tensor([[0, 1, 1, 0]]),
        attention_mask=torch.tensor([[1, 1, 1, 0]]),  # last token is padding
        completion_mask=torch.tensor([[0, 1, 1, 0]]),  # token 0 is the prompt
    )
    out = logps_from_logits(logits, seqs)
    # token 1 at position 1 is predicted by logits[0, 0] (uniform): log 1/2
    # token 1 at position 2 is predicted by logits[0, 1]: log(e^2 / (1 + e^2))
    expected = torch.tensor([[0.0, -0.693147, 2.0 - torch.log1p(torch.exp(torch.tensor(2.0))).item(), 0.0]])
    assert_close(out.tokens, expected, atol=1e-5, rtol=0)
    assert_close(out.sequence, expected.sum(-1), atol=1e-5, rtol=0)
    assert out.mask.tolist() == [[0, 1, 1, 0]]


def test_padding_does_not_change_a_row(tiny_model_dir):
    policy = HFPolicy.load(tiny_model_dir)
    alone = policy.encode(["Name a fruit."], ["apple"])
    batch = policy.encode(["Name a fruit.", "What is your name? Tell me more about you."], ["apple", "i am tiny , a small helpful assistant ."])
    assert batch.input_ids.shape[1] > alone.input_ids.shape[1]  # row 0 is right-padded in the batch
    with torch.no_grad():
        single = policy.logps(alone).sequence[0]
        batched = policy.logps(batch).sequence[0]
    assert_close(single, batched, atol=1e-5, rtol=0)


def test_logps_equal_manual_sum_over_completion(tiny_model_dir):
    policy = HFPolicy.load(tiny_model_dir)
    seqs = policy.encode(["Name a fruit."], ["green apple"])
    n_prompt = int((seqs.completion_mask[0] == 0).sum())
    with torch.no_grad():
        out = policy.logps(seqs)
        logits = policy.model(input_ids=seqs.input_ids).logits[0].log_softmax(-1)
    ids = seqs.input_ids[0]
    manual = sum(logits[t - 1, ids[t]] for t in range(n_prompt, len(ids)))
    assert_close(out.sequence[0], manual, atol=1e-5, rtol=1e-5)  # the lean path multiplies in other shapes: float32 rounding
    assert (out.tokens[0, :n_prompt] == 0).all()
    # the completion is the answer's tokens plus exactly one EOS
    assert int(seqs.completion_mask.sum()) == 3
    assert ids[-1].item() == policy.tokenizer.eos_token_id


def test_a_row_never_exceeds_max_length_and_keeps_an_answer_token(tiny_model_dir):
    """--max-prompt-length above --max-length: the prompt keeps its last max_length - 1 tokens, the answer its first."""
    from pref.models import completion_token_ids, load_tokenizer, prompt_token_ids

    tokenizer = load_tokenizer(tiny_model_dir)
    policy = HFPolicy(None, tokenizer, max_length=16, max_prompt_length=256)
    prompts, answers = [" ".join(["word"] * 40), "Hi"], ["a long answer of many words here", "yes"]
    rows = policy.encode(prompts, answers)
    long_prompt, answer = prompt_token_ids(tokenizer, prompts[0]), completion_token_ids(tokenizer, answers[0])
    assert len(long_prompt) > 16
    assert rows.attention_mask.sum(1).tolist()[0] == 16 and rows.input_ids.shape[1] == 16
    assert rows.input_ids[0].tolist() == long_prompt[-15:] + answer[:1] and rows.completion_mask[0].tolist() == [0] * 15 + [1]
    short = prompt_token_ids(tokenizer, prompts[1])  # a short row is cut at max_length too, its answer first
    assert rows.input_ids[1, : rows.attention_mask[1].sum()].tolist() == (short + completion_token_ids(tokenizer, answers[1]))[:16]
