"""The search space: a map from a spec path (``"optimizer.lr"``) to a distribution.

Distributions: ``{"log_uniform": [low, high]}``, ``{"uniform": [low, high]}``,
``{"int": [low, high]}`` (both ends included) and ``{"choice": [v1, v2, ...]}``.

Checked before anything runs: each path must name a field of the spec (a leaf, not a
section), and each distribution must fit that field. Fitting is tried, not guessed: the
spec is validated with the distribution's ends, a value between them (a float where the
field takes integers fails there) and every choice, in combination with the other
parameters' such values, so a sampled spec always validates.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from ftune.models.spec import FineTuneSpec, SpecError, parse_spec
from ftune.service.errors import InvalidInput

KINDS = ("log_uniform", "uniform", "int", "choice")
MAX_PARAMS = 16
MAX_CHOICES = 64
# Combinations of the parameters' test values validated at submit; beyond this many, a
# seeded sample of them (each value still appears in some combination).
MAX_COMBINATIONS = 512
# Set by the service or the sweep itself, never searched.
NOT_SEARCHABLE = frozenset({"weights_path", "time_budget_s"})


@dataclass(frozen=True)
class Param:
    path: str
    kind: str  # one of KINDS
    values: tuple  # (low, high) for ranges, the choices for "choice"

    def test_values(self) -> list:
        """Values a sample may take that together show whether the field accepts them."""
        if self.kind == "choice":
            return list(self.values)
        low, high = self.values
        if self.kind == "int":
            return sorted({low, high, (low + high) // 2})
        middle = math.sqrt(low * high) if self.kind == "log_uniform" else (low + high) / 2
        return [low, middle, high]

    @property
    def grid(self) -> list | None:
        """Every value the parameter can take, when that is a short list."""
        if self.kind == "choice":
            return list(self.values)
        if self.kind == "int" and self.values[1] - self.values[0] < MAX_CHOICES:
            return list(range(self.values[0], self.values[1] + 1))
        return None


def parse_space(space: object) -> list[Param]:
    """The parameters, in the order given; 422 naming the path for anything malformed."""
    if not isinstance(space, dict) or not space:
        raise InvalidInput("space: must be a non-empty object of spec path -> distribution",
                           loc=["space"])
    if len(space) > MAX_PARAMS:
        raise InvalidInput(f"space: at most {MAX_PARAMS} parameters", loc=["space"])
    return [_param(path, dist) for path, dist in space.items()]


def _param(path: str, dist: object) -> Param:
    def bad(message: str) -> InvalidInput:
        return InvalidInput(f"space.{path}: {message}", loc=["space", path],
                            kind="invalid_space")

    _check_path(path, bad)
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in KINDS:
        raise bad(f"must be one distribution: {{kind: values}} with kind one of "
                  f"{', '.join(KINDS)}")
    kind, values = next(iter(dist.items()))
    if not isinstance(values, list):
        raise bad(f"{kind} takes a list")
    if kind == "choice":
        if not 1 <= len(values) <= MAX_CHOICES:
            raise bad(f"choice takes 1 to {MAX_CHOICES} values")
        if not all(v is None or isinstance(v, (str, int, float, bool)) for v in values):
            raise bad("choice values must be strings, numbers, booleans or null")
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise bad("choice values must be finite numbers")
        if len({repr(v) for v in values}) != len(values):
            raise bad("choice values must be different from each other")
        return Param(path, kind, tuple(values))
    if len(values) != 2 or not all(_is_number(v) for v in values):
        raise bad(f"{kind} takes [low, high], two finite numbers")
    low, high = values
    if kind == "int" and not all(isinstance(v, int) for v in values):
        raise bad("int takes two integers")
    if not low < high:
        raise bad(f"{kind}: low ({low}) must be below high ({high})")
    if kind == "log_uniform" and low <= 0:
        raise bad("log_uniform: low must be above 0")
    return Param(path, kind, (low, high))


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _check_path(path: str, bad: Callable[[str], InvalidInput]) -> None:
    """The path names a leaf field of the spec."""
    if not isinstance(path, str) or not path or len(path) > 100:
        raise bad("not a spec path")
    model: type[BaseModel] | None = FineTuneSpec
    parts = path.split(".")
    for depth, part in enumerate(parts):
        fields = model.model_fields if model is not None else {}
        if part not in fields:
            known = ", ".join(sorted(fields)) if fields else "nothing (not a section)"
            raise bad(f"no such spec field; {'.'.join(parts[:depth]) or 'the spec'} has "
                      f"{known}")
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(
            annotation, BaseModel) else None
    if model is not None:
        raise bad("names a section of the spec, not a field; use one of "
                  f"{', '.join(f'{path}.{name}' for name in model.model_fields)}")
    if parts[0] in NOT_SEARCHABLE:
        raise bad("cannot be searched")


def apply_params(base: dict, params: dict[str, Any]) -> dict:
    """The base spec (JSON) with each parameter's value at its path."""
    spec = _copy(base)
    for path, value in params.items():
        *parents, leaf = path.split(".")
        target = spec
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return spec


def _copy(data: dict) -> dict:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def check_space(base: dict, params: list[Param], validate: Callable[[dict], object],
                seed: int = 0) -> None:
    """Every combination of the parameters' test values gives a spec ``validate`` accepts
    (a seeded sample of them when there are too many); 422 names the parameters at fault."""
    for combination in _combinations(params, seed):
        values = dict(zip([p.path for p in params], combination, strict=True))
        spec = apply_params(base, values)
        try:
            parse_spec(spec)
            validate(spec)
        except SpecError as exc:
            raise _unfit(params, values, str(exc)) from exc
        except InvalidInput as exc:
            raise _unfit(params, values, exc.detail) from exc


def _combinations(params: list[Param], seed: int) -> Iterator[tuple]:
    pools = [p.test_values() for p in params]
    total = math.prod(len(pool) for pool in pools)
    if total <= MAX_COMBINATIONS:
        yield from itertools.product(*pools)
        return
    rng = random.Random(seed)
    longest = max(len(pool) for pool in pools)
    for i in range(MAX_COMBINATIONS):
        # Every value of every pool appears at least once, then random combinations.
        yield tuple(pool[i % len(pool)] if i < longest else rng.choice(pool)
                    for pool in pools)


def _unfit(params: list[Param], values: dict, message: str) -> InvalidInput:
    """The parameter the spec's error names, else all of them in this combination."""
    named = [p.path for p in params if message.startswith(p.path) or f" {p.path}" in message
             or message.startswith(p.path.split(".")[-1])]
    path = named[0] if named else ", ".join(values)
    shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
    return InvalidInput(f"space.{path}: a sampled spec ({shown}) does not validate: "
                        f"{message}", loc=["space", path], kind="invalid_space")
