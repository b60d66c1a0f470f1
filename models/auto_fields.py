"""Spec fields that take a number or "auto", with one clear error when they get neither.

A plain ``float | Literal["auto"]`` union reports one error per member ("should be greater
than 0"; "should be 'auto'"), at locations that name the member types. These types check
the value themselves and describe themselves in the JSON schema as either form:

    dropout: Annotated[float | Auto, AutoFloat(at_least=0.0, at_most=0.99)] = Field("auto")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

AUTO = "auto"
Auto = Literal["auto"]
T = TypeVar("T")


def decided(value: T | Auto) -> T:
    """A field's value once the recipe has decided it. The engine's plans replace every
    "auto" before training, so one still there is a bug, and says so."""
    if isinstance(value, str):
        raise ValueError('a spec field still "auto" reached training: the recipe must '
                         "decide it first")
    return value


def _bounds(above: float | None, at_least: float | None, at_most: float | None) -> str:
    parts = [f"> {above:g}" if above is not None else "",
             f">= {at_least:g}" if at_least is not None else "",
             f"<= {at_most:g}" if at_most is not None else ""]
    return " and ".join(p for p in parts if p)


def _checker(kind: type, above: float | None, at_least: float | None, at_most: float | None,
             nullable: bool) -> Any:
    noun = "a whole number" if kind is int else "a number"
    bounds = _bounds(above, at_least, at_most)
    expected = f'"auto"{", null" if nullable else ""} or {noun}{" " + bounds if bounds else ""}'

    def check(value: object) -> object:
        if value == AUTO or (value is None and nullable):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be {expected}")
        if not math.isfinite(value) or (kind is int and value != int(value)):
            raise ValueError(f"must be {expected}")
        if ((above is not None and value <= above) or (at_least is not None and value < at_least)
                or (at_most is not None and value > at_most)):
            raise ValueError(f"must be {expected}; got {value:g}")
        return kind(value)

    return check


def _schema(kind: type, above: float | None, at_least: float | None, at_most: float | None,
            nullable: bool) -> dict:
    number: dict = {"type": "integer" if kind is int else "number"}
    for key, bound in (("exclusiveMinimum", above), ("minimum", at_least),
                       ("maximum", at_most)):
        if bound is not None:
            number[key] = bound
    options = [number, {"type": "string", "enum": [AUTO]}]
    if nullable:
        options.append({"type": "null"})
    return {"anyOf": options}


@dataclass(frozen=True)
class AutoNumber:
    """Pydantic metadata for a field typed ``float | Literal["auto"]`` (or ``int``, or with
    ``None``): the annotation says the type to mypy and readers, this says the bounds, checks
    the value as one union and writes the schema."""

    kind: type
    above: float | None = None
    at_least: float | None = None
    at_most: float | None = None
    nullable: bool = False

    def __get_pydantic_core_schema__(self, source: Any,
                                     handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _checker(self.kind, self.above, self.at_least, self.at_most, self.nullable))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return _schema(self.kind, self.above, self.at_least, self.at_most, self.nullable)


def AutoFloat(*, above: float | None = None, at_least: float | None = None,
              at_most: float | None = None, nullable: bool = False) -> AutoNumber:
    return AutoNumber(float, above, at_least, at_most, nullable)


def AutoInt(*, at_least: int | None = None, at_most: int | None = None,
            nullable: bool = False) -> AutoNumber:
    return AutoNumber(int, None, at_least, at_most, nullable)
