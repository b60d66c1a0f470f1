"""The record of a run's auto choices: each field's value and the reason, as made.

Every choice, wherever it is made (at submit, or by the engine once it knows the data or the
model), is kept here and reported from here. What leaves, to the ``on_resolved`` callback,
the checkpoint and the job, is ``to_dict()``: ``{name: {"value": ..., "why": "..."}}``.
No torch here: the API resolves the static choices with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ftune.models.recipe.rules import Choice

Resolved = dict[str, dict]  # field -> {"value": ..., "why": "..."}


class Choices:
    """The auto choices made so far, by field name, in the order they were made.

    Recording and reporting are apart: each report is a database write in the worker, so a
    step that makes several choices records them all, then reports once (``notify``)."""

    def __init__(self, made: Mapping[str, Mapping[str, Any]] | None = None,
                 on_resolved: Callable[[dict], None] | None = None) -> None:
        # Copies: a caller's dict (the job's stored choices) is never changed through this.
        self._made: Resolved = {name: dict(choice) for name, choice in (made or {}).items()}
        self.on_resolved = on_resolved

    def record(self, name: str, choice: Choice) -> Any:
        """Keep ``choice`` under ``name``, replacing an earlier one; returns its value."""
        self._made[name] = choice.to_dict()
        return choice.value

    def notify(self) -> None:
        """Report every choice made so far to ``on_resolved``."""
        if self.on_resolved is not None:
            self.on_resolved(self.to_dict())

    def __contains__(self, name: object) -> bool:
        return name in self._made

    def value(self, name: str) -> Any:
        return self._made[name]["value"]

    def choice(self, name: str) -> Choice:
        """The choice recorded under ``name`` (made by this run or given to it)."""
        made = dict(self._made[name])
        value, why = made.pop("value"), made.pop("why")
        return Choice(value, why, made or None)

    def to_dict(self) -> Resolved:
        return {name: dict(choice) for name, choice in self._made.items()}
