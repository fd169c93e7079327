"""D2PO: relabel selection, gold ties, discriminator updates, checkpoint state and a short run."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from pref.config import build_config
from pref.errors import PrefError
from pref.interfaces import CandidatePool, Processes, RewardSource
from pref.plugins.d2po import D2PO, Candidate, Discriminator, DiscriminatorRelabeler, GoldPair, classifier_from, pick_for_relabeling
from pref.plugins.gold_rewards import BagOfWords
from pref.policy import HFPolicy
from pref.registry import load_registry
from pref.train import train, train_second_model
from test_lora import LoadReports  # tests/ is on sys.path


def candidates(gaps):
    return [Candidate("p", f"a{i}", f"b{i}", gap, 0.0) for i, gap in enumerate(gaps)]


def test_confidence_picks_the_smallest_score_gaps():
    pool = candidates([0.9, 0.1, 0.5, 0.05, 2.0])
    assert sorted(pick_for_relabeling(pool, 2, "confidence")) == [1, 3]
    assert pick_for_relabeling(pool, 10, "confidence") == [3, 1, 2, 0, 4]  # a budget above the pool takes all


def test_random_picks_a_uniform_sample():
    pool = candidates([0.0] * 10)
    torch.manual_seed(0)
    draws = [tuple(pick_for_relabeling(pool, 3, "random")) for _ in range(50)]
    assert all(len(set(d)) == 3 for d in draws)
    assert len(set(draws)) > 10  # not always the same, unlike confidence
    assert {i for d in draws for i in d} == set(range(10))


class FakeDiscriminator:
    """Scores are given per pool; `learn` records the fresh gold pairs of each finished round."""

    def __init__(self):
        self.updates = []

    def learn(self, fresh):
        self.updates.append(list(fresh))


class TableGold(RewardSource):
    """Gold reward read from a table: answer text -> score."""

    def __init__(self, table):
        self.table = table
        self.calls = 0

    def score(self, prompts, completions):
        self.calls += len(completions)
        return {"reward": torch.tensor([float(self.table[c]) for c in completions])}


def test_relabeling_a_hand_made_pool():
    """Four prompts, two answers each; discriminator scores and gold rewards:

    prompt 0: x0 0.9 / y0 0.1 (gap 0.8)   gold x0 1, y0 0: not picked (most confident)
    prompt 1: x1 0.4 / y1 0.6 (gap 0.2)   gold x1 1, y1 0: picked, the discriminator was wrong: flipped
    prompt 2: x2 0.5 / y2 0.45 (gap 0.05) gold 1 / 1: picked, a tie: dropped, the label still spent
    prompt 3: z / z, identical answers: no pair, never relabeled
    Budget 2 by confidence picks prompts 2 and 1; the one non-tie gold pair disagrees with
    the discriminator, so its accuracy on fresh gold pairs is 0.
    """
    gold = TableGold({"x0": 1, "y0": 0, "x1": 1, "y1": 0, "x2": 1, "y2": 1, "z": 0})
    discriminator = FakeDiscriminator()
    relabeler = DiscriminatorRelabeler(discriminator, gold, round_size=8, budget=2, selection="confidence", eval_gold=True)
    pool = CandidatePool(
        prompts=["p0", "p1", "p2", "p3"],
        completions=[["x0", "y0"], ["x1", "y1"], ["x2", "y2"], ["z", "z"]],
        scores={"reward": torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.5, 0.45], [0.3, 0.3]])},
    )
    selection = relabeler.select(pool)
    assert sorted(selection.pairs) == [(0, 0, 1), (1, 0, 1)]  # prompt 1 now follows the gold order
    metrics = selection.metrics
    assert metrics["gold/relabeled"] == 2 and metrics["gold/ties_dropped"] == 1 and metrics["gold/labels_spent"] == 2
    assert metrics["pools/identical"] == 1
    assert metrics["discriminator/accuracy"] == 0.0
    assert metrics["eval/gold_reward"] == 4 / 8
    assert discriminator.updates == [[GoldPair("p1", "x1", "y1")]]
    assert relabeler.gold_pairs == [GoldPair("p1", "x1", "y1")]


def test_a_gold_function_is_told_the_steps_and_its_figures_are_logged_as_gold(tmp_path):
    """A gold reward function reading TRL's `trainer_state` gets the steps the loop tells D2PO's reward (its discriminator), and what it
    logs with `log_metric` while labelling is the step's `gold/reward/NAME`."""
    (tmp_path / "gold.py").write_text("def longer(completions, trainer_state, log_metric):\n"
                                      "    log_metric('progress', trainer_state.global_step / trainer_state.max_steps)\n"
                                      "    return [float(len(c)) for c in completions]\n")
    objective = D2PO(gold=f"{tmp_path}/gold.py:longer", round_size=2, budget=1, registry=load_registry())
    objective.own_reward().at_step(1, 4)
    pool = CandidatePool(["p"], [["a", "bb"]], {"reward": torch.tensor([[0.2, 0.1]])})
    objective.discriminator.learn = lambda fresh: None  # no classifier here: the update is the loop's
    selection = objective.relabeler.select(pool)
    assert selection.pairs == [(0, 1, 0)]  # relabeled: the gold prefers the longer answer
    assert selection.metrics["gold/reward/progress"] == 0.25


def test_rounds_collect_pairs_across_steps_and_budget_zero_is_frozen():
    gold = TableGold({"a": 1, "b": 0, "c": 0, "d": 1})
    pool_1 = CandidatePool(["p"], [["a", "b"]], {"reward": torch.tensor([[0.2, 0.1]])})
    pool_2 = CandidatePool(["q"], [["c", "d"]], {"reward": torch.tensor([[0.9, 0.1]])})
    discriminator = FakeDiscriminator()
    relabeler = DiscriminatorRelabeler(discriminator, gold, round_size=4, budget=1, eval_gold=False)
    first = relabeler.select(pool_1)  # 2 samples: the round goes on
    assert first.pairs == [(0, 0, 1)] and first.metrics["gold/labels_spent"] == 0 and gold.calls == 0
    assert "eval/gold_reward" not in first.metrics
    second = relabeler.select(pool_2)  # 4 samples: the least confident pair of the round is the first step's
    assert second.pairs == [(0, 0, 1)]  # that step is past; this step keeps the discriminator's order
    assert relabeler.gold_pairs == [GoldPair("p", "a", "b")] and second.metrics["discriminator/accuracy"] == 1.0
    assert relabeler.samples_in_round == 0 and relabeler.round == []

    frozen = DiscriminatorRelabeler(FakeDiscriminator(), TableGold({"a": 1, "b": 0}), round_size=1, budget=0, eval_gold=False)
    for _ in range(3):
        frozen.select(pool_1)
    assert frozen.labels_spent == 0 and frozen.discriminator.updates == []


GOLD_PAIRS = [
    GoldPair("Name a fruit.", "apple", "chair"),
    GoldPair("What color is the sky?", "the sky is blue .", "the sky is green ."),
    GoldPair("Name an animal.", "dog", "the table"),
    GoldPair("Say something kind.", "you are a good friend .", "go away ."),
    GoldPair("What is the capital of france?", "paris", "rome"),
    GoldPair("What is your name?", "i am pref , a helpful assistant .", "i am tiny , a small assistant ."),
]


def tiny_discriminator(tiny_model_dir, **options):
    policy = HFPolicy.load(tiny_model_dir)
    torch.manual_seed(0)
    classifier = HFPolicy(classifier_from(policy.model, policy.tokenizer.pad_token_id), policy.tokenizer)
    return policy, Discriminator(classifier, **options)


def test_discriminator_starts_from_the_policy_weights(tiny_model_dir):
    policy, discriminator = tiny_discriminator(tiny_model_dir)
    for name, value in policy.model.base_model.state_dict().items():
        assert torch.equal(value, discriminator.model.base_model.state_dict()[name])
    assert discriminator.model.config.num_labels == 1
    assert discriminator.model.config.pad_token_id == policy.tokenizer.pad_token_id


def train_as_the_loop_does(discriminator):
    optimizer = torch.optim.AdamW(discriminator.model.parameters(), lr=discriminator.lr)
    return train_second_model(discriminator, optimizer, Processes())


def test_discriminator_update_learns_its_gold_pairs(tiny_model_dir):
    _, discriminator = tiny_discriminator(tiny_model_dir, lr=3e-3, epochs=15, batch_size=3)
    before = discriminator.accuracy(GOLD_PAIRS)
    assert train_as_the_loop_does(discriminator) == {}  # no round has ended: nothing to train on
    discriminator.learn(GOLD_PAIRS)
    metrics = train_as_the_loop_does(discriminator)
    assert discriminator.gold_pairs == GOLD_PAIRS and not discriminator.fresh
    assert metrics["discriminator/train_accuracy"] == discriminator.accuracy(GOLD_PAIRS) == 1.0
    assert before < 1.0
    assert metrics["discriminator/loss"] < 0.6931  # below log 2, the loss of no preference


def test_state_dict_round_trip(tiny_model_dir):
    policy = HFPolicy.load(tiny_model_dir)
    objective = D2PO(gold=BagOfWords(words=["sea"]), round_size=2, budget=1)
    objective.setup(policy)
    objective.relabeler.gold_pairs = GOLD_PAIRS[:2]
    objective.relabeler.labels_spent = 3
    objective.relabeler.round = candidates([0.5])
    objective.discriminator.learn(GOLD_PAIRS[:2])
    train_as_the_loop_does(objective.discriminator)
    state = objective.state_dict()

    restored = D2PO(gold=BagOfWords(words=["sea"]), round_size=2, budget=1)
    restored.setup(policy)
    restored.load_state_dict(state)
    assert restored.relabeler.gold_pairs == GOLD_PAIRS[:2] and restored.relabeler.labels_spent == 3
    assert restored.relabeler.round == candidates([0.5])
    assert restored.discriminator.gold_pairs == GOLD_PAIRS[:2]
    assert "model" not in state  # the discriminator's weights and optimizer are the loop's to checkpoint


def test_a_discriminator_started_from_a_causal_lm_loads_without_a_notice_of_its_new_score_head(tiny_model_dir):
    policy = HFPolicy.load(tiny_model_dir)
    objective = D2PO(gold=BagOfWords(words=["sea"]), discriminator=tiny_model_dir)  # a causal LM, not a sequence classifier
    with LoadReports() as reports:  # transformers' "score.weight | MISSING" report: the run trains that head from scratch
        objective.setup(policy)
    assert reports == []
    assert objective.discriminator.model.config.num_labels == 1


def test_d2po_run_writes_discriminator_and_gold_metrics(tmp_path, tiny_model_dir):
    config = build_config(flags={
        "objective": "d2po", "model": tiny_model_dir, "steps": 3, "batch_size": 2, "max_new_tokens": 6, "device": "cpu",
        "save_every": 2, "output_dir": str(tmp_path / "run"),
        "objective_options": {"round_size": 4, "budget": 2, "gold": "bag-of-words", "gold_options": {"words": ["the", "is"]}},
    })
    out = train(config, load_registry())
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in lines] == [1, 2, 3]
    # 2 prompts x 2 samples = one round per draw, at most 2 labels each (fewer when answers were identical)
    spent = [m["gold/labels_spent"] for m in lines]
    draws = [i + 1 + sum(m["samples/redraws"] for m in lines[: i + 1]) for i in range(3)]
    assert 0 < spent[0] and spent == sorted(spent) and all(s <= 2 * d for s, d in zip(spent, draws))
    assert {"eval/gold_reward", "discriminator/accuracy", "discriminator/loss", "rewards/accuracies"} <= set(lines[-1])

    path = os.path.join(out, "discriminator")
    gold_pairs = [json.loads(line) for line in open(os.path.join(path, "gold_pairs.jsonl"))]
    assert all(set(p) == {"prompt", "chosen", "rejected"} for p in gold_pairs)
    reward = load_registry().create("reward", "reward-model", {"model": path, "device": "cpu"})
    assert reward.score(["Name a fruit."], ["apple"])["reward"].shape == (1,)
    assert AutoModelForCausalLM.from_pretrained(os.path.join(out, "final")) is not None

    extra = torch.load(os.path.join(out, "checkpoint-000002", "extra.pt"), weights_only=True)
    [objective_state] = extra["objective"]  # one process
    assert objective_state["counters"]["labels_spent"] == lines[1]["gold/labels_spent"]
    assert {"gold_pairs", "round", "discriminator_pairs"} <= set(objective_state)
    assert "score.weight" in extra["second_model"]  # the discriminator, a sequence classifier
    assert extra["second_optimizer"]["state"]  # AdamW moments of the discriminator


def test_gold_pairs_from_an_earlier_labelling_are_kept(tmp_path, tiny_model_dir):
    path = tmp_path / "gold.jsonl"
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n" for p in GOLD_PAIRS[:3]))
    objective = D2PO(gold=BagOfWords(words=["sea"]), gold_pairs=str(path))
    objective.setup(HFPolicy.load(tiny_model_dir))
    assert objective.relabeler.gold_pairs == GOLD_PAIRS[:3] and objective.relabeler.labels_spent == 0
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p"}\n')
    with pytest.raises(PrefError, match="prompt, chosen and rejected"):
        D2PO(gold=BagOfWords(), gold_pairs=str(tmp_path / "bad.jsonl"))


def test_bad_options_fail_before_the_model_loads():
    for options, message in [({"selection": "greedy"}, "unknown D2PO selection"), ({"budget": -1}, "budget"), ({"round_size": 0}, "round_size")]:
        with pytest.raises(PrefError, match=message):
            D2PO(gold=BagOfWords(), **options)
    with pytest.raises(PrefError, match="bag-of-word"):
        load_registry().create("objective", "d2po", {"gold": "bag-of-word"}, registry=load_registry())
