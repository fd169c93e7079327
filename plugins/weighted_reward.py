"""The `weighted` reward: a weighted sum of other rewards."""

from __future__ import annotations

from typing import Any

import torch

from pref.errors import PrefError
from pref.examples import Prompt
from pref.hookspecs import hookimpl
from pref.interfaces import RewardSource


class WeightedReward(RewardSource):
    """A weighted sum of other reward plugins: reward = sum of weight x that reward's `reward`.

    `--reward weighted --reward-option rewards='{repetition: 1.0, noun-diversity: 0.5}'`

    Options:
        rewards: reward name -> weight (at least one).
        options: reward name -> that reward's own options, e.g. `{repetition: {n: 3}}`, or `NAME.key` -> value
            (`--reward repetition --reward noun-diversity --reward-option repetition.n=3`).

    Scores: `reward`, and each part's scores as `NAME/SCORE` (`repetition/reward`, ...).
    Its default prompts are the parts' default prompts, in order. The parts are built
    from `registry`, which the host passes.
    """

    def __init__(self, rewards: dict[str, float], options: dict[str, dict[str, Any]] | None = None, registry: Any = None):
        if not isinstance(rewards, dict) or not rewards:
            raise PrefError("weighted: give the rewards to combine as a mapping of name to weight, e.g. rewards='{repetition: 1.0}'")
        options = options_by_reward(list(rewards), options or {})
        if registry is None:
            raise PrefError("weighted: build it through the plugin registry (registry.create), which passes registry=")
        self.weights: dict[str, float] = {}
        self.parts: dict[str, RewardSource] = {}
        for name, weight in rewards.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise PrefError(f"weighted: the weight of {name!r} must be a number, not {weight!r}")
            self.weights[name] = float(weight)
            self.parts[name] = registry.create("reward", name, options.get(name))
        self.default_prompts = list(dict.fromkeys(p for part in self.parts.values() for p in part.default_prompts))
        self.columns = tuple(dict.fromkeys(column for part in self.parts.values() for column in part.columns))
        self.reads_completion_ids = any(part.reads_completion_ids for part in self.parts.values())

    def score(self, prompts: list[Prompt], completions: list[str], **columns: list[Any]) -> dict[str, torch.Tensor]:
        """`reward` [B], the weighted sum, and every part's scores [B] under `NAME/SCORE`; each part gets the `columns` it reads.

        A part's NaN (a completion it left unscored, a function's None) is out of the sum, as in TRL; where every part
        left a completion unscored, its reward is NaN."""
        scores: dict[str, torch.Tensor] = {}
        for name, part in self.parts.items():
            given = [*part.columns, *(["completion_ids"] if part.reads_completion_ids else [])]
            part_scores = part.score(prompts, completions, **{key: columns[key] for key in given})
            if "reward" not in part_scores:
                raise PrefError(f"weighted: reward {name!r} gave no score named 'reward'")
            for key, values in part_scores.items():
                scores[f"{name}/{key}"] = values.detach().float().cpu()
        weighted = torch.stack([self.weights[name] * scores[f"{name}/reward"] for name in self.parts])
        total = weighted.nansum(dim=0)
        total[weighted.isnan().all(dim=0)] = torch.nan
        return {"reward": total, **scores}


    def at_step(self, step: int, steps: int) -> None:
        for part in self.parts.values():
            part.at_step(step, steps)

    def logged(self) -> tuple[dict[str, float], dict[str, list[Any]]]:
        """Every part's figures (a figure two parts log: their mean) and columns."""
        figures: dict[str, list[float]] = {}
        columns: dict[str, list[Any]] = {}
        for part in self.parts.values():
            part_figures, part_columns = part.logged()
            for key, value in part_figures.items():
                figures.setdefault(key, []).append(value)
            columns.update(part_columns)
        return {key: sum(values) / len(values) for key, values in figures.items()}, columns


def options_by_reward(names: list[str], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """NAME -> that reward's options, from `NAME.key` -> value or NAME -> {key: value} (a config file's
    `[reward_options.NAME]` table). Dashes and underscores in NAME are alike: `--reward-option` turns
    dashes into underscores, so `noun_diversity.n` is `noun-diversity`'s `n`.
    """
    by_key = {name.replace("-", "_"): name for name in names}
    parts: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        prefix, dot, option = key.partition(".")
        name = by_key.get(prefix.replace("-", "_"))
        if name is not None and dot and option:
            parts.setdefault(name, {})[option] = value
        elif name is not None and not dot and isinstance(value, dict):
            parts.setdefault(name, {}).update(value)
        elif not dot and isinstance(value, dict):
            raise PrefError(f"weighted: options given for {key}, which is not among the rewards ({', '.join(names)})")
        else:
            raise PrefError(f"--reward-option {key}: with several rewards, name the reward an option is for, "
                            f"e.g. --reward-option {names[0]}.{option or prefix}=VALUE (rewards: {', '.join(names)})")
    return parts


@hookimpl
def register_rewards(register):
    register("weighted", WeightedReward)
