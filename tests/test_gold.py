"""gold: byte alignment by hand, the teacher's inputs and the whole ULD loss against TRL 1.16's experimental GOLD, and runs."""

import json
import types

import pytest
import torch
from click.testing import CliRunner
from trl.experimental.gold.gold_trainer import ULDLoss, build_teacher_inputs_from_texts
from trl.experimental.utils import encode_with_byte_offsets, piece_byte_len

from pref.cli.main import cli
from pref.interfaces import Minibatch, Rollout, ScoredBatch
from pref.plugins.gold import Gold, align_by_bytes, byte_spans, piece_bytes, probability_jsd, sorted_l1, text_tokens
from pref.policy import HFPolicy
from pref.reference import FrozenReference

PROMPTS = ["Name a fruit.", "What is your name?", "Name one random common English noun.", "Say something.", "And then?"]
# the last splits into more tokens for the student than for the teacher: groups of several student tokens
ANSWERS = ["apple", "I am Pref, a helpful assistant.", "table", "Crème brûlée 🙂 is sweet", "you'll see, they'll say it'll rain"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A teacher of another family: a random Llama with its own byte-level BPE tokenizer of 700 tokens (no chat template)."""
    import wordfreq
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = wordfreq.top_n_list("en", 3000)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([" ".join(words[i : i + 20]) for i in range(0, len(words), 20)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(tokenizer) + 4, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_align_by_bytes_by_hand():
    """"abc" as [ab][c] and [a][bc]: one group of both tokens each; [ab][c] and [a][b][c]: [[0], [1]] and [[0, 1], [2]]; tokens left
    over when one side ends form a last group."""
    assert align_by_bytes([(0, 2), (2, 3)], [(0, 1), (1, 3)]) == ([[0, 1]], [[0, 1]])
    assert align_by_bytes([(0, 2), (2, 3)], [(0, 1), (1, 2), (2, 3)]) == ([[0], [1]], [[0, 1], [2]])
    assert align_by_bytes([(0, 2), (2, 3), (3, 7)], [(0, 2), (2, 2)]) == ([[0], [1, 2]], [[0], [1]])
    assert byte_spans([b" a", b"bc", b""]) == [(0, 2), (2, 4), (4, 4)]


def test_sorted_l1_and_probability_jsd_by_hand():
    """(0.1, 0.6, 0.3) against (0.7, 0.3) sorted: |0.6-0.7| + |0.3-0.3| + |0.1-0| = 0.2; the JSD of sub-distributions needs no sum of 1."""
    student, teacher = torch.tensor([[0.1, 0.6, 0.3]]), torch.tensor([[0.7, 0.3]])
    assert sorted_l1(student, teacher).item() == pytest.approx(0.2)
    s, t = torch.tensor([[0.2, 0.1]]), torch.tensor([[0.1, 0.3]])
    forward = (0.1 * torch.log(torch.tensor(0.1 / 0.2)) + 0.3 * torch.log(torch.tensor(0.3 / 0.1))).item()
    assert probability_jsd(s, t, 0.0).item() == pytest.approx(forward, rel=1e-5)
    m = (0.15, 0.2)
    jsd = 0.5 * (0.1 * torch.log(torch.tensor(0.1 / m[0])) + 0.3 * torch.log(torch.tensor(0.3 / m[1]))) + \
        0.5 * (0.2 * torch.log(torch.tensor(0.2 / m[0])) + 0.1 * torch.log(torch.tensor(0.1 / m[1])))
    assert probability_jsd(s, t, 0.5).item() == pytest.approx(jsd.item(), rel=1e-5)


def test_byte_offsets_are_trls(tiny_model_dir, teacher_dir):
    """A text's tokens and byte spans are TRL's `encode_with_byte_offsets` (multi-byte characters split over tokens, a normalizer
    that puts a space first); sampled tokens' spans are TRL's running sum of `piece_byte_len`."""
    for path in (teacher_dir, tiny_model_dir):
        tokenizer = HFPolicy.load(path).tokenizer if path == tiny_model_dir else __import__("transformers").AutoTokenizer.from_pretrained(path)
        for text in ANSWERS + [" leading space" if path == teacher_dir else "trailing space ", "naïve façade — 東京"]:
            [(ids, spans)] = encode_with_byte_offsets(tokenizer.backend_tokenizer, [text])
            assert text_tokens(tokenizer, text) == (ids, [tuple(s) for s in spans]), (path, text)
            running, total = [], 0
            for piece in tokenizer.convert_ids_to_tokens(ids):
                running.append((total, total + piece_byte_len(piece)))
                total += piece_byte_len(piece)
            assert byte_spans(piece_bytes(tokenizer, ids)) == running
    # the default tokenizer puts a space before " leading": its first token is that space alone (TRL's raises on the overlap)
    assert text_tokens(tokenizer, " leading space")[1] == [(0, 0), (0, 8), (8, 14)]


def objective_for(teacher_dir, **options):
    objective = Gold(reference_model=teacher_dir, lmbda=1.0, **options)
    return objective


def student_teacher_batch(tiny_model_dir, teacher_dir):
    student = HFPolicy.load(tiny_model_dir)
    student.model.eval()
    teacher = FrozenReference(HFPolicy.load(teacher_dir).model.eval().requires_grad_(False))
    sequences = student.encode(PROMPTS, ANSWERS)
    return student, teacher, Minibatch(Rollout(ScoredBatch(PROMPTS, ANSWERS, sequences, {}, 1)), torch.arange(len(PROMPTS)))


def test_teacher_inputs_are_trls(tiny_model_dir, teacher_dir):
    """Plain-text prompts to a teacher without a chat template: its ids, answer positions and byte spans are those of TRL's
    `build_teacher_inputs_from_texts`, and the answers' text is the policy's tokens' bytes."""
    student, _, batch = student_teacher_batch(tiny_model_dir, teacher_dir)
    objective = objective_for(teacher_dir)
    objective.setup(student)
    texts = [objective.answer_text(ids) for ids, _ in objective.answers(batch.rollout.batch.sequences)]
    assert [t.strip() for t in texts] == ANSWERS  # the default tokenizer writes a space before each text
    sequences, answers = objective.teacher_inputs(PROMPTS, texts)
    ids, labels, attention, offsets = build_teacher_inputs_from_texts(objective.teacher_tokenizer, PROMPTS, texts)
    assert torch.equal(sequences.input_ids, ids) and torch.equal(sequences.attention_mask.bool(), attention)
    assert torch.equal(torch.where(sequences.completion_mask.bool(), sequences.input_ids, -100), labels)
    for row, (answer_ids, spans, start) in enumerate(answers):
        assert offsets[row, start : start + len(answer_ids)].tolist() == [list(s) for s in spans]


def trl_loss(objective, student, teacher, batch, config):
    """TRL's `ULDLoss` on the two models' whole logits, with the inputs TRL's on-policy path builds."""
    sequences = batch.rollout.batch.sequences
    ours = objective.answers(sequences)
    texts = [objective.answer_text(ids) for ids, _ in ours]
    t_ids, t_labels, t_attention, t_offsets = build_teacher_inputs_from_texts(objective.teacher_tokenizer, PROMPTS, texts,
                                                                             use_extended_uld=config.use_extended_uld)
    s_offsets = torch.zeros(*sequences.input_ids.shape, 2, dtype=torch.long)
    for row, (ids, start) in enumerate(ours):
        total = 0
        for i, piece in enumerate(student.tokenizer.convert_ids_to_tokens(ids)):
            s_offsets[row, start + i] = torch.tensor([total, total + piece_byte_len(piece)])
            total += piece_byte_len(piece)
    s_labels = torch.where(sequences.completion_mask.bool(), sequences.input_ids, -100)
    student_logits = student.model(input_ids=sequences.input_ids, attention_mask=sequences.attention_mask).logits
    with torch.no_grad():
        teacher_logits = teacher.model(input_ids=t_ids, attention_mask=t_attention.long()).logits
    uld = ULDLoss(config, student_tokenizer=student.tokenizer, teacher_tokenizer=objective.teacher_tokenizer)
    return uld(student_logits, teacher_logits, s_labels, t_labels, sequences.input_ids, t_ids, s_offsets, t_offsets), uld


OPTION_SETS = [
    {},
    {"uld_token_merge_strategy": "bayesian"},
    {"use_extended_uld": False, "uld_skip_teacher_eos": False},
    {"uld_use_hybrid_loss": True, "beta": 0.3},
    {"uld_use_hybrid_loss": True, "uld_hybrid_matched_weight": 0.7, "uld_hybrid_unmatched_weight": 0.2, "uld_token_merge_strategy": "bayesian"},
    {"uld_crossentropy_weight": 0.5, "uld_distillation_weight": 2.0, "uld_student_temperature": 0.8, "uld_teacher_temperature": 1.3,
     "uld_skip_student_eos": False},
]


@pytest.mark.parametrize("options", OPTION_SETS)
def test_uld_loss_and_gradients_are_trls(tiny_model_dir, teacher_dir, monkeypatch, options):
    """The whole loss (two tokenizers, byte groups, merged tokens, sorted distances; chunked) and the policy's gradients equal
    TRL's `ULDLoss` on the two models' full logits, for each merge strategy, positional ULD, the hybrid loss and the weights."""
    import pref.plugins.distill as distill

    monkeypatch.setattr(distill, "LOGIT_CHUNK_ELEMENTS", 8192)  # 1 position a chunk: several chunks, each recomputed in the backward
    student, teacher, batch = student_teacher_batch(tiny_model_dir, teacher_dir)
    objective = objective_for(teacher_dir, **options)
    objective.setup(student)
    assert objective.uld and objective.loss_items(batch) is None
    loss, metrics = objective.loss(student, teacher, batch)
    loss.backward()
    ours = [p.grad.clone() for p in student.model.parameters()]
    student.model.zero_grad()

    config = types.SimpleNamespace(**{
        "uld_crossentropy_weight": 0.0, "uld_distillation_weight": 1.0, "uld_student_temperature": 1.0, "uld_teacher_temperature": 1.0,
        "uld_skip_student_eos": True, "uld_skip_teacher_eos": True, "use_extended_uld": True, "uld_token_merge_strategy": "observed",
        "uld_use_hybrid_loss": False, "uld_hybrid_matched_weight": None, "uld_hybrid_unmatched_weight": None, "beta": 0.5, **options})
    theirs, uld = trl_loss(objective, student, teacher, batch, config)
    theirs.backward()
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-4) and loss.item() > 0.01
    if config.uld_use_hybrid_loss:  # TRL keeps the last row's parts
        assert metrics["matched_loss"] > 0 and metrics["unmatched_loss"] > 0
    for mine, trl in zip(ours, [p.grad for p in student.model.parameters()]):
        torch.testing.assert_close(mine, trl, rtol=2e-3, atol=1e-5)


def run(tmp_path, *args, out="run"):
    return CliRunner().invoke(cli, ["run", "--device", "cpu", "--no-progress", "--output-dir", str(tmp_path / out), *args])


def answers_file(tmp_path):
    path = tmp_path / "answers.jsonl"
    rows = [{"prompt": "Name a fruit.", "completion": "An apple."},
            {"messages": [{"role": "user", "content": "What is your name?"}, {"role": "assistant", "content": "I am Pref."}]},
            {"prompt": "Name an animal.", "completion": "A crème brûlée."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def metrics_of(tmp_path, out="run"):
    return [json.loads(line) for line in open(tmp_path / out / "metrics.jsonl")]


def test_gold_trains_from_the_cli(tmp_path, tiny_model_dir, teacher_dir):
    """The tiny model learns from a teacher of another tokenizer, on its samples and on the rows' answers (lmbda 0.5, TRL's); a
    teacher of its own tokenizer is distill's JSD."""
    result = run(tmp_path, "--objective", "gold", "--model", tiny_model_dir, "--reference-model", teacher_dir, "--dataset", answers_file(tmp_path),
                 "--steps", "4", "--batch-size", "2", "-o", "uld_use_hybrid_loss=true")
    assert result.exit_code == 0, result.output + repr(result.exception)
    lines = metrics_of(tmp_path)
    assert [m["step"] for m in lines] == [1, 2, 3, 4] and all(m["loss"] > 0 and m["uld/aligned_groups"] >= 1 for m in lines)
    assert {m["samples/on_policy"] for m in lines} == {0.0, 1.0}  # seed 0 draws both kinds of step in four
    assert all("matched_loss" in m and "unmatched_loss" in m for m in lines)

    result = run(tmp_path, "--objective", "gold", "--model", tiny_model_dir, "--reference-model", "pref-default", "--steps", "2",
                 "--batch-size", "2", "--dataset", answers_file(tmp_path), out="same")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert all("entropy" in m and "uld/distillation_loss" not in m for m in metrics_of(tmp_path, "same"))


@pytest.mark.parametrize("options,message", [
    (["-o", "uld=false"], "has another vocabulary than the policy"),
    (["-o", "uld_token_merge_strategy=last"], "uld_token_merge_strategy must be observed or bayesian"),
    (["-o", "uld_hybrid_matched_weight=0.5"], "give both uld_hybrid_matched_weight and uld_hybrid_unmatched_weight"),
    (["-o", "uld_student_temperature=0"], "must be above 0"),
    ([], "has no 'completion'; give rows of a prompt and 'completion', or let every step sample (distill's and gold's -o lmbda=1)"),
])
def test_gold_mistakes_are_one_line_errors(tmp_path, tiny_model_dir, teacher_dir, options, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Name a fruit."}) + "\n")
    dataset = str(prompts) if not options else answers_file(tmp_path)
    result = run(tmp_path, "--objective", "gold", "--model", tiny_model_dir, "--reference-model", teacher_dir, "--dataset", dataset,
                 "--steps", "1", *options)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_a_teacher_that_is_not_byte_level_needs_positional_uld(tmp_path, tiny_model_dir, teacher_dir):
    """A teacher whose tokenizer is not byte-level BPE cannot be aligned by bytes: a one-line error names the way out, which runs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", *"a an the apple cat name fruit what is your i am pref".split()]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    other = tmp_path / "word-level"
    AutoModelForCausalLM.from_pretrained(teacher_dir).save_pretrained(other)
    tokenizer.save_pretrained(other)
    args = ["--objective", "gold", "--model", tiny_model_dir, "--reference-model", str(other), "--dataset", answers_file(tmp_path), "--steps", "2",
            "--batch-size", "2"]
    result = run(tmp_path, *args)
    assert result.exit_code == 2 and "the teacher's tokenizer is not byte-level BPE" in result.output and "use_extended_uld=false" in result.output
    result = run(tmp_path, *args, "-o", "use_extended_uld=false", out="positional")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert all(m["loss"] > 0 for m in metrics_of(tmp_path, "positional"))


def test_a_teacher_with_a_chat_template_reads_prompts_in_it(tiny_model_dir, teacher_dir):
    """The teacher's prompt is rendered by its own chat template (a chat prompt or a plain one), its answer is the text's tokens and the
    token that ends its answers; only a reference of distributions may bring its own tokenizer."""
    from pref.errors import PrefError
    from pref.interfaces import REFERENCE_LOGPS, ObjectiveNeeds
    from pref.models import answer_end_id, prompt_token_ids

    student, _, _ = student_teacher_batch(tiny_model_dir, teacher_dir)
    objective = objective_for(teacher_dir)
    objective.setup(student)
    teacher = objective.teacher_tokenizer
    teacher.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
    sequences, answers = objective.teacher_inputs([chat, "Name a fruit."], [" apple", " pear"])
    for row, prompt in enumerate([chat, "Name a fruit."]):
        ids, _, start = answers[row]
        assert start == len(prompt_token_ids(teacher, prompt)) and sequences.input_ids[row, :start].tolist() == prompt_token_ids(teacher, prompt)
        assert ids[-1] == answer_end_id(teacher) and teacher.decode(ids[:-1]) == [" apple", " pear"][row]
    with pytest.raises(PrefError, match="own_reference_tokenizer"):
        ObjectiveNeeds(reference=REFERENCE_LOGPS, own_reference_tokenizer=True)
