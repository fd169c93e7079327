"""`--kind` of `pref list-plugins` and `pref new-plugin`: the registry's kind names, and their other spellings."""

from __future__ import annotations

from typing import Any

import click

from pref.registry import KIND_ALIASES


class KindChoice(click.Choice):
    """A choice of kind names (pref.registry.KINDS) that also takes their aliases, as the name: `selector` is `pair-selector`.

    Help and errors list the names only, so each kind is shown one way.
    """

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return super().convert(KIND_ALIASES.get(value, value), param, ctx)
