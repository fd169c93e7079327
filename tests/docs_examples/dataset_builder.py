"""The `tab-separated` dataset builder: preference pairs from `prompt<TAB>chosen<TAB>rejected` lines."""

from __future__ import annotations

import os

from pref import Policy, PrefError, PreferenceExample, hookimpl


class TabSeparatedPairs:
    """Preference pairs from a text file with one `prompt<TAB>chosen<TAB>rejected` per line.

    Options:
        path: the file to read.
        limit: read at most this many pairs (default: all).
    """

    def __init__(self, path: str, limit: int | None = None):
        # checked here, before the model loads, so a typo fails at once
        if not os.path.isfile(path):
            raise PrefError(f"tab-separated: no such file {path!r}")
        self.path = path
        self.limit = limit

    def build(self, policy: Policy | None = None) -> list[PreferenceExample]:
        """Read the pairs, before the model loads (`policy` has its tokenizer, no model yet).

        This data is fixed; a builder that samples its data from `policy.generate` is built again after the model loads.
        """
        examples = []
        with open(self.path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                fields = line.rstrip("\n").split("\t")
                if len(fields) != 3:
                    raise PrefError(f"{self.path} line {number}: expected prompt, chosen and rejected separated by tabs")
                examples.append(PreferenceExample(*fields))
                if self.limit is not None and len(examples) == self.limit:
                    break
        return examples


@hookimpl
def register_dataset_builders(register):
    register("tab-separated", TabSeparatedPairs)
