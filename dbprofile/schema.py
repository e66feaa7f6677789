"""Checking parsed JSON against dataclasses: every field present (or defaulted) and of the type
its annotation names, recursing into nested dataclasses, lists and dicts. The first wrong
field raises ``ResultSchemaError`` with its path, e.g. ``measurements[0].peak_bytes should be
an integer, but it is "lots"``. Generic: the result-specific rules are in
``dbprofile.results.check``."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from typing import Any


class ResultSchemaError(ValueError):
    """A result file's content does not have the fields and types of a RunResult."""


def check_fields(cls: type, data: dict, prefix: str) -> None:
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        where = f"{prefix}{f.name}"
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ResultSchemaError(f"the field {where} is missing. Pass a .json file written by `dbprofile run`.")
            continue
        check_value(data[f.name], hints[f.name], where)


def check_value(value: Any, hint: Any, where: str) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        (inner,) = [a for a in args if a is not type(None)]  # every union in the results is X | None
        try:
            check_value(value, inner, where)
        except ResultSchemaError:
            fail(where, f"{describe(inner)} or null", value)
        return
    if origin is typing.Literal:
        if value not in args:
            fail(where, "one of " + ", ".join(map(str, args)), value)
        return
    if isinstance(hint, type) and is_dataclass(hint):
        if not isinstance(value, dict):
            fail(where, "an object", value)
        check_fields(hint, value, f"{where}.")
    elif origin is list:
        if not isinstance(value, list):
            fail(where, describe(hint), value)
        for i, item in enumerate(value):
            check_value(item, args[0], f"{where}[{i}]")
    elif origin is dict:
        if not isinstance(value, dict):
            fail(where, "an object", value)
        for key, item in value.items():
            check_value(item, args[1], f"{where}.{key}")
    elif not is_instance(value, hint):
        fail(where, describe(hint), value)


def is_instance(value: Any, hint: type) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # JSON true is not a number
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, "an object")


def show(value: Any) -> str:
    if value is None:
        return "null"
    kind = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    text = json.dumps(value)
    return f"{kind.get(type(value), 'the number')} {text[:60]}{'...' if len(text) > 60 else ''}"


def fail(where: str, expected: str, value: Any) -> typing.NoReturn:
    raise ResultSchemaError(
        f"{where} should be {expected}, but it is {show(value)}. "
        "Fix that field, or re-run `dbprofile run` to write the file again."
    )
