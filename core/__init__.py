"""pref: preference optimization of causal language models."""

from pref.examples import LabeledExample, PreferenceExample, Prompt, TextExample
from pref.hookspecs import hookimpl
from pref.interfaces import (
    Adapter,
    CandidatePool,
    Embedder,
    Evaluator,
    LabeledBatch,
    MetricsLogger,
    Minibatch,
    Objective,
    ObjectiveNeeds,
    PairBatch,
    PairSelector,
    Policy,
    Processes,
    Reference,
    RewardSource,
    Rollout,
    Samples,
    SamplingConfig,
    ScoredBatch,
    SecondModel,
    Selection,
)
from pref.errors import PrefError, RunInterrupted
from pref.sequences import Logps, Sequences

__version__ = "0.1.0"

__all__ = [
    "Adapter", "CandidatePool", "Embedder", "Evaluator", "LabeledBatch", "LabeledExample", "Logps", "MetricsLogger", "Minibatch", "Objective", "ObjectiveNeeds", "PairBatch",
    "PairSelector", "Policy", "Processes", "PrefError", "PreferenceExample", "Prompt", "Reference",
    "RewardSource", "Rollout", "RunInterrupted", "Samples", "SamplingConfig", "ScoredBatch", "SecondModel", "Selection", "Sequences", "TextExample", "hookimpl",
]
