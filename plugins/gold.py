"""GOLD: distillation from a teacher with another tokenizer (TRL 1.16's experimental `GOLDTrainer`).

The policy learns from `--reference-model TEACHER`, a model of any family: its tokenizer may split the same text into other
tokens. Each step trains, as GKD's (`distill`'s `lmbda`), on the policy's own samples (with probability `lmbda`, 0.5) or on
the rows' own answers (`answer_column`). The teacher reads the prompt (in its own chat template when it has one) and the
answer's text, encoded with its own tokenizer, so both models predict the same text.

The loss is Universal Logit Distillation (ULD, Boizard et al. 2024, https://arxiv.org/abs/2402.12030), as TRL's `ULDLoss`:
the two answers' tokens are grouped where the tokenizers agree on a boundary (their UTF-8 byte offsets, `align_by_bytes`);
a group of several tokens gets the distribution of one position times the probabilities of the others' actual tokens
(`uld_token_merge_strategy`); and the policy's and the teacher's distributions, each sorted by probability, are compared by
their L1 distance, so no token of one vocabulary has to match one of the other. `uld_use_hybrid_loss` compares the tokens
both vocabularies share directly (their generalized JSD), and sorts only the others. Each answer's loss is the mean over
its groups, the batch's the mean over answers. With `use_extended_uld` False, positions are compared one to one (the
original ULD) and no tokenizer needs to be byte-level BPE.

A teacher with the policy's tokenizer is trained on with distill's generalized JSD (GKD's), unless `uld` is True.

Neither model's [B, T, V] logits are held: the heads run on the groups' positions a few at a time (`over_chunks`).
Not offered: TRL's `seq_kd` (answers sampled from the teacher), its vLLM generation, vision-language teachers.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from functools import lru_cache
from typing import Any

import torch

from pref.errors import PrefError
from pref.examples import Prompt
from pref.hookspecs import hookimpl
from pref.interfaces import Minibatch, Policy, Reference, ScoredBatch
from pref.models import answer_end_id, load_tokenizer, prompt_token_ids
from pref.plugins.distill import Distill, over_chunks
from pref.plugins.grpo import completion_metrics
from pref.sequences import OutputHead, Sequences

EPSILON = 1e-8  # the floor of a merged token's probability, and of a probability whose log the hybrid loss takes (TRL's)
MERGE_STRATEGIES = ("observed", "bayesian")


# -- text as bytes: where two tokenizers agree ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, the character a ByteLevel BPE piece writes -> the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def is_byte_level(tokenizer: Any) -> bool:
    """Whether `tokenizer` is a fast byte-level BPE one (Llama 3, Qwen, SmolLM, GPT-2, pref's default model), whose pieces are bytes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in repr(backend.pre_tokenizer) + repr(backend.decoder)


def piece_bytes(tokenizer: Any, ids: list[int]) -> list[bytes]:
    """The bytes each token of a byte-level tokenizer stands for; an added token (`<|im_end|>`) its text's."""
    added, table = tokenizer.added_tokens_decoder, byte_of_char()
    return [added[i].content.encode() if i in added else bytes(table[c] for c in piece)
            for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids))]


def byte_spans(pieces: list[bytes]) -> list[tuple[int, int]]:
    """Each piece's (start, end) in the bytes of the pieces one after the other."""
    spans, at = [], 0
    for piece in pieces:
        spans.append((at, at + len(piece)))
        at += len(piece)
    return spans


def text_tokens(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`text` encoded by a byte-level `tokenizer` without special tokens, and each token's (start, end) in the text's UTF-8 bytes
    (as TRL's `encode_with_byte_offsets`). A space the tokenizer puts before the text (a `Prepend` normalizer) takes no byte."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = piece_bytes(tokenizer, ids)
    if pieces and sum(map(len, pieces)) == len(text.encode()) + 1 and pieces[0][:1] == b" ":
        pieces[0] = pieces[0][1:]  # (a text that starts with a space then starts with a token of no byte: TRL's refuses it)
    return ids, byte_spans(pieces)


def align_by_bytes(ours: list[tuple[int, int]], theirs: list[tuple[int, int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Group two tokenizations of one text where both end a token at the same byte: the groups of each side's token indices, pairwise.

    Walks both, advancing the side whose token ends first; tokens left over at the end form one last group (TRL's
    `_align_by_byte_offsets`). "abc" as [ab][c] and [a][bc] is one group of two tokens on each side; [ab][c] and [a][b][c]
    are the groups [[0], [1]] and [[0, 1], [2]].
    """
    our_groups, their_groups = [], []
    i = j = i0 = j0 = 0
    while i < len(ours) and j < len(theirs):
        if ours[i][1] < theirs[j][1]:
            i += 1
        elif ours[i][1] > theirs[j][1]:
            j += 1
        else:
            i, j = i + 1, j + 1
            our_groups.append(list(range(i0, i)))
            their_groups.append(list(range(j0, j)))
            i0, j0 = i, j
    if i < len(ours) or j < len(theirs):
        our_groups.append(list(range(i0, len(ours))))
        their_groups.append(list(range(j0, len(theirs))))
    return our_groups, their_groups


# -- the loss on merged, aligned distributions ---------------------------------------------------------------------------------


def sorted_l1(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """[G]: the L1 distance between each row's probabilities [G, V_s] and [G, V_t], each sorted from the largest, the shorter
    padded with zeros (ULD's distance, blind to which token is which)."""
    student, teacher = student.sort(dim=-1, descending=True).values, teacher.sort(dim=-1, descending=True).values
    width = max(student.shape[-1], teacher.shape[-1])
    pad = torch.nn.functional.pad
    return (pad(student, (0, width - student.shape[-1])) - pad(teacher, (0, width - teacher.shape[-1]))).abs().sum(-1)


def probability_jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    """[G]: the generalized JSD (distill's `beta`) between probabilities [G, M] that need not sum to 1, as TRL's
    `generalized_jsd_loss(..., logits_are_probs=True)`: each floored at 1e-8 before its log, no renormalisation."""
    log_s, log_t = student.clamp_min(EPSILON).log(), teacher.clamp_min(EPSILON).log()
    if beta == 0.0:
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if beta == 1.0:
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
    return (beta * log_t.exp() * (log_t - log_m) + (1 - beta) * log_s.exp() * (log_s - log_m)).sum(-1)


@dataclasses.dataclass
class Alignment:
    """The groups of a micro-batch's answers, flattened over its rows: for each side (student, teacher), the flat position
    [G] whose distribution is each group's base, and the flat positions, actual tokens and groups [S] of the probabilities
    the base is multiplied by; `row` [G], the row of each group."""

    base: tuple[list[int], list[int]]
    scalar: tuple[list[int], list[int]]
    scalar_token: tuple[list[int], list[int]]
    scalar_group: tuple[list[int], list[int]]
    row: list[int]


class Gold(Distill):
    """GOLD (TRL's experimental `GOLDTrainer`): distillation from `--reference-model TEACHER` of any tokenizer, by ULD.

    Options (`-o KEY=VALUE`), TRL's names and defaults:
        lmbda: the share of steps that sample from the policy (0.5); the others train on the rows' `answer_column` ("completion").
        beta: the generalized JSD's (0.5): of the hybrid loss's shared tokens, and of the loss with a same-tokenizer teacher.
        temperature: that JSD's (default: the sampling temperature, `--temperature`).
        uld: the ULD loss: None (default) when the teacher's tokenizer is not the policy's, True always, False never (distill's JSD).
        uld_token_merge_strategy: "observed" (default): a group's distribution is its first position's, times the probabilities
            of the later positions' tokens, each position's distribution read at the position itself (TRL's default);
            "bayesian": its last position's, times the earlier tokens' probabilities, each distribution read one position before
            (the one that predicts the token: the chain rule).
        use_extended_uld: True (default): groups by byte offsets (byte-level BPE tokenizers); False: position i with position i.
        uld_use_hybrid_loss: the tokens both vocabularies hold (the same text) compared directly by the JSD, the others sorted (False).
        uld_hybrid_matched_weight, uld_hybrid_unmatched_weight: the two parts' weights (both None: the share of the teacher's
            vocabulary that is shared, and the rest).
        uld_crossentropy_weight: adds this times the policy's NLL of the answer tokens (0.0).
        uld_distillation_weight: the ULD term's weight (1.0).
        uld_student_temperature, uld_teacher_temperature: the distributions' temperatures (1.0).
        uld_skip_student_eos, uld_skip_teacher_eos: leave each answer's last token out (True).
    """

    def __init__(self, beta: float = 0.5, temperature: float | None = None, lmbda: float = 0.5, answer_column: str = "completion",
                 reference_model: str | None = None, uld: bool | None = None, uld_token_merge_strategy: str = "observed",
                 use_extended_uld: bool = True, uld_use_hybrid_loss: bool = False, uld_hybrid_matched_weight: float | None = None,
                 uld_hybrid_unmatched_weight: float | None = None, uld_crossentropy_weight: float = 0.0, uld_distillation_weight: float = 1.0,
                 uld_student_temperature: float = 1.0, uld_teacher_temperature: float = 1.0, uld_skip_student_eos: bool = True,
                 uld_skip_teacher_eos: bool = True):
        if not reference_model:
            raise PrefError("gold learns a teacher's distributions: pass --reference-model TEACHER (a hub id or folder of a causal LM, "
                            "of any tokenizer)")
        if uld_token_merge_strategy not in MERGE_STRATEGIES:
            raise PrefError(f"gold: uld_token_merge_strategy must be observed or bayesian, not {uld_token_merge_strategy!r}")
        if min(uld_crossentropy_weight, uld_distillation_weight) < 0:
            raise PrefError("gold: uld_crossentropy_weight and uld_distillation_weight must be 0 or more")
        if not min(uld_student_temperature, uld_teacher_temperature) > 0:
            raise PrefError("gold: uld_student_temperature and uld_teacher_temperature must be above 0")
        weights = (uld_hybrid_matched_weight, uld_hybrid_unmatched_weight)
        if (weights[0] is None) != (weights[1] is None) or min((w for w in weights if w is not None), default=0) < 0:
            raise PrefError("gold: give both uld_hybrid_matched_weight and uld_hybrid_unmatched_weight (0 or more), or neither "
                            "(weights from the vocabularies' overlap)")
        super().__init__(beta=beta, temperature=temperature, lmbda=lmbda, answer_column=answer_column, reference_model=reference_model)
        # dropout off, as TRL's GOLDConfig (disable_dropout True)
        self.needs = dataclasses.replace(self.needs, own_reference_tokenizer=uld is not False, dropout=False)
        self.teacher_name, self.uld_option = reference_model, uld
        self.merge, self.extended, self.hybrid, self.hybrid_weights = uld_token_merge_strategy, use_extended_uld, uld_use_hybrid_loss, weights
        self.crossentropy_weight, self.distillation_weight = uld_crossentropy_weight, uld_distillation_weight
        self.student_temperature, self.teacher_temperature = uld_student_temperature, uld_teacher_temperature
        self.skip_student_eos, self.skip_teacher_eos = uld_skip_student_eos, uld_skip_teacher_eos
        self.uld = bool(uld)  # decided in `setup`, once both tokenizers are known

    def setup(self, policy: Policy) -> None:
        """Read the teacher's tokenizer; check what the ULD loss asks of the two; find the tokens both vocabularies hold (hybrid)."""
        self.student_tokenizer = policy.tokenizer
        try:
            self.teacher_tokenizer = load_tokenizer(self.teacher_name)
        except PrefError as exc:
            raise PrefError(f"gold encodes the answers for the teacher with its own tokenizer, and --reference-model {self.teacher_name} "
                            f"has none that loads: {exc}") from None
        self.uld = self.teacher_tokenizer.get_vocab() != policy.tokenizer.get_vocab() if self.uld_option is None else self.uld_option
        tokenizer = policy.tokenizer  # its special tokens (the end of an answer) are no text for the teacher
        self.special_ids = set(tokenizer.all_special_ids) | {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        if not self.uld:
            return
        for tokenizer, whose in ((policy.tokenizer, "the policy's"), (self.teacher_tokenizer, "the teacher's")):
            if self.extended and not is_byte_level(tokenizer):
                raise PrefError(f"gold: {whose} tokenizer is not byte-level BPE, so the two answers cannot be aligned by bytes; "
                                "pass -o use_extended_uld=false to compare positions one to one")
        if self.hybrid:
            theirs = self.teacher_tokenizer.get_vocab()
            shared = sorted((theirs[text], ours) for text, ours in policy.tokenizer.get_vocab().items() if text in theirs)
            self.shared = torch.tensor(shared, dtype=torch.long).reshape(-1, 2)  # [M, 2]: (teacher id, student id), by teacher id

    def loss_items(self, batch: Minibatch) -> int | None:
        """ULD's loss is a mean over answers in each micro-batch (TRL's); the JSD's a mean over all tokens (distill's)."""
        return None if self.uld else super().loss_items(batch)

    def loss(self, policy: Policy, reference: Reference | None, batch: Minibatch) -> tuple[torch.Tensor, dict[str, float]]:
        """ULD's loss (plus `uld_crossentropy_weight` x the answers' NLL), or, with a same-tokenizer teacher, distill's JSD. Metrics:
        `uld/distillation_loss` (the ULD term, weighted), `uld/aligned_groups` (groups per answer), `uld/crossentropy_loss`,
        the hybrid's TRL `matched_loss` and `unmatched_loss`, and TRL's `completions/*`."""
        if not self.uld:
            return super().loss(policy, reference, batch)
        if reference is None:
            raise PrefError("gold compares the policy with its teacher, the reference: do not pass --reference none")
        samples: ScoredBatch = batch.prepared(self, policy, reference)
        sequences = samples.sequences
        ours = self.answers(sequences)
        texts = [self.answer_text(ids) for ids, _ in ours]
        teacher_sequences, theirs = self.teacher_inputs(samples.prompts, texts)
        student = policy.hidden_states(sequences)
        teacher = reference.hidden_states(teacher_sequences).to(student.device)
        student_rows = [(ids, byte_spans(piece_bytes(self.student_tokenizer, ids)), start) for ids, start in ours]
        alignment = self.align(student_rows, theirs, student.shape[1], teacher.shape[1])
        figures = self.aligned_losses(student.reshape(-1, student.shape[-1]), policy.output_head(), teacher.reshape(-1, teacher.shape[-1]),
                                      reference.output_head(), alignment)
        device = student.device
        rows = torch.tensor(alignment.row, dtype=torch.long, device=device)
        groups = torch.zeros(len(ours), device=device).index_add(0, rows, torch.ones_like(rows, dtype=torch.float))
        per_row = torch.zeros(len(figures), len(ours), device=device).index_add(1, rows, figures) / groups.clamp_min(1)
        distillation = self.distillation_weight * per_row[0].mean()
        metrics = {"uld/distillation_loss": distillation.item(), "uld/aligned_groups": groups.mean().item(), **completion_metrics(samples)}
        if self.hybrid:
            metrics.update({"matched_loss": per_row[1].mean().item(), "unmatched_loss": per_row[2].mean().item()})
        if not self.crossentropy_weight:
            return distillation, metrics
        where = sequences.completion_mask.to(device).bool()
        where[:, 0] = False
        logps = over_chunks(lambda logits, y: torch.log_softmax(logits, -1).gather(-1, y[:, None]).T, student[:, :-1][where[:, 1:]],
                            policy.output_head(), None, None, sequences.input_ids.to(device)[where])[0]
        crossentropy = self.crossentropy_weight * -logps.sum() / max(logps.numel(), 1)
        metrics["uld/crossentropy_loss"] = crossentropy.item()
        return crossentropy + distillation, metrics

    def aligned_losses(self, student: torch.Tensor, student_head: OutputHead, teacher: torch.Tensor, teacher_head: OutputHead,
                       alignment: Alignment) -> torch.Tensor:
        """[F, G]: `group_losses` of every group of `alignment`, from the two models' last hidden states, flattened ([B x T, H])."""
        factors = []  # each group's log of the probabilities its base distribution is multiplied by
        for side, (hidden, head, temperature) in enumerate(((student, student_head, self.student_temperature),
                                                            (teacher, teacher_head, self.teacher_temperature))):
            positions, tokens, group = (torch.tensor(x[side], dtype=torch.long, device=student.device)
                                        for x in (alignment.scalar, alignment.scalar_token, alignment.scalar_group))
            with torch.no_grad() if side else nullcontext():
                picked = over_chunks(lambda logits, y, t=temperature: torch.log_softmax(logits / t, -1).gather(-1, y[:, None]).T,
                                     hidden[positions], head, None, None, tokens)[0]
            factors.append(torch.zeros(len(alignment.row), device=student.device).index_add(0, group, picked.clamp_min(math.log(EPSILON))))
        bases = [torch.tensor(x, dtype=torch.long, device=student.device) for x in alignment.base]
        return over_chunks(self.group_losses, student[bases[0]], student_head, teacher[bases[1]], teacher_head, *factors, trim=False)

    def group_losses(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_factor: torch.Tensor,
                     teacher_factor: torch.Tensor) -> torch.Tensor:
        """[1, G] each group's ULD distance, given its base positions' logits and the log of the probabilities they are multiplied
        by; with the hybrid loss [3, G]: the weighted sum, the shared tokens' JSD and the other tokens' sorted distance."""
        student = torch.softmax(student_logits / self.student_temperature, -1) * student_factor.exp()[:, None]
        teacher = torch.softmax(teacher_logits / self.teacher_temperature, -1) * teacher_factor.exp()[:, None]
        if not self.hybrid:
            return sorted_l1(student, teacher)[None]
        shared = self.shared.to(student.device)
        apart = [torch.ones(p.shape[-1], dtype=torch.bool, device=p.device).index_fill(0, ids, False)
                 for p, ids in ((student, shared[:, 1]), (teacher, shared[:, 0]))]
        matched = probability_jsd(student[:, shared[:, 1]], teacher[:, shared[:, 0]], self.beta) if len(shared) else student.new_zeros(len(student))
        unmatched = sorted_l1(student[:, apart[0]], teacher[:, apart[1]]) if apart[0].any() and apart[1].any() else student.new_zeros(len(student))
        weight, other = self.hybrid_weights if self.hybrid_weights[0] is not None else (len(shared) / teacher.shape[-1], 1 - len(shared) / teacher.shape[-1])
        return torch.stack([weight * matched + other * unmatched, matched, unmatched])

    def answer_text(self, ids: list[int]) -> str:
        """The text the teacher reads for the policy's answer tokens `ids`: their bytes, special tokens left out (an undecodable
        byte, as of an answer cut inside a character, becomes U+FFFD)."""
        pieces = piece_bytes(self.student_tokenizer, ids) if self.extended else None
        if pieces is None:
            return self.student_tokenizer.decode([i for i in ids if i not in self.special_ids], clean_up_tokenization_spaces=False)
        return b"".join(p for i, p in zip(ids, pieces) if i not in self.special_ids).decode(errors="replace")

    @staticmethod
    def answers(sequences: Sequences) -> list[tuple[list[int], int]]:
        """Each row's answer tokens and the position of the first."""
        rows = []
        for ids, mask in zip(sequences.input_ids.tolist(), sequences.completion_mask.tolist()):
            start = mask.index(1) if 1 in mask else len(mask)
            rows.append((ids[start : start + sum(mask)], start))
        return rows

    def teacher_inputs(self, prompts: list[Prompt], texts: list[str]) -> tuple[Sequences, list[tuple[list[int], list[tuple[int, int]], int]]]:
        """The teacher's rows: each prompt in the teacher's chat template (its plain text without one), the answer's text in its tokens
        and the token that ends its answers; and each row's answer tokens, their byte spans in the text, and the first one's position.
        The answer's end takes no byte (TRL's `build_teacher_inputs_from_texts`)."""
        tokenizer, rows, answers = self.teacher_tokenizer, [], []
        end = answer_end_id(tokenizer)
        for prompt, text in zip(prompts, texts):
            prompt_ids = prompt_token_ids(tokenizer, prompt)
            if prompt_ids and prompt_ids[-1] == tokenizer.eos_token_id:
                prompt_ids = prompt_ids[:-1]
            if self.extended:
                ids, spans = text_tokens(tokenizer, text)
            else:
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                spans = [(0, 0)] * len(ids)
            if end is not None:
                ids, spans = ids + [end], spans + [(len(text.encode()),) * 2]
            rows.append((prompt_ids, ids))
            answers.append((ids, spans, len(prompt_ids)))
        width = max(len(p) + len(a) for p, a in rows)

        def padded(row: list[int], value: int) -> list[int]:
            return row + [value] * (width - len(row))

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return Sequences(torch.tensor([padded(p + a, pad) for p, a in rows]), torch.tensor([padded([1] * (len(p) + len(a)), 0) for p, a in rows]),
                         torch.tensor([padded([0] * len(p) + [1] * len(a), 0) for p, a in rows])), answers

    def align(self, ours: list[tuple[list[int], list[tuple[int, int]], int]], theirs: list[tuple[list[int], list[tuple[int, int]], int]],
              our_width: int, their_width: int) -> Alignment:
        """The groups of each row's answers (TRL's `ULDLoss._compute_distillation_loss`): each side's last token dropped
        (`uld_skip_*_eos`), with "bayesian" a leading group no position predicts dropped, then grouped by bytes (extended) or
        position by position; a group that is empty on either side is left out."""
        alignment = Alignment(([], []), ([], []), ([], []), ([], []), [])
        bayesian = self.merge == "bayesian"

        def grouped(answers: list[tuple[list[int], list[tuple[int, int]], int]]) -> tuple[list[list[int]], list[list[int]]]:
            if self.extended:
                return align_by_bytes(answers[0][1], answers[1][1])
            shared = min(len(ids) for ids, _, _ in answers)
            return [[i] for i in range(shared)], [[i] for i in range(shared)]

        for row, sides in enumerate(zip(ours, theirs)):
            answers = [(ids[: len(ids) - skip], spans[: len(ids) - skip], start)
                       for (ids, spans, start), skip in zip(sides, (self.skip_student_eos, self.skip_teacher_eos))]
            if min(len(ids) for ids, _, _ in answers) <= 0:
                continue
            groups = grouped(answers)
            if bayesian and min(start for _, _, start in answers) == 0:  # no position predicts an answer's first token: drop the first group
                drop = [len(g[0]) if g else 0 for g in groups] if self.extended else [1, 1]
                answers = [(ids[d:], spans[d:], start + d) for (ids, spans, start), d in zip(answers, drop)]
                if min(len(ids) for ids, _, _ in answers) <= 0:
                    continue
                groups = grouped(answers)
            for pair in zip(*groups):
                if not all(pair):
                    continue
                for side, (group, (ids, _, start), width) in enumerate(zip(pair, answers, (our_width, their_width))):
                    base = group[-1] if bayesian else group[0]
                    shift = start - 1 if bayesian else start  # the position whose distribution is read for answer token i
                    alignment.base[side].append(row * width + shift + base)
                    for i in group:
                        if i != base:
                            alignment.scalar[side].append(row * width + shift + i)
                            alignment.scalar_token[side].append(ids[i])
                            alignment.scalar_group[side].append(len(alignment.row))
                alignment.row.append(row)
        return alignment


@hookimpl
def register_objectives(register):
    register("gold", Gold)
