"""``--set KEY=VALUE`` for ecosystem models: parse the options, and type each value by the
config field it overrides (an int field takes an int, a bool field true/false, ...), so a typo
or a wrong type stops with one message instead of a model built from a string."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from typing import Any

from dbprofile.spec import SpecError

_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def parse_set_options(items: Iterable[str]) -> dict[str, str]:
    """['n_layer=4', 'n_embd=128'] -> {'n_layer': '4', 'n_embd': '128'}; later keys win."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set takes KEY=VALUE (e.g. --set num_hidden_layers=4); got {item!r}.")
        out[key.strip()] = value.strip()
    return out


def parse_value(key: str, text: str, current: Any) -> Any:
    """``text`` as the type of the field's ``current`` value; SpecError when it does not parse."""

    def wrong(kind: str) -> SpecError:
        return SpecError(f"--set {key}={text}: {key} takes {kind} (it is {current!r} now).")

    if isinstance(current, bool):
        lowered = text.lower()
        if lowered not in _TRUE + _FALSE:
            raise wrong("true or false")
        return lowered in _TRUE
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise wrong("an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise wrong("a number") from None
    if isinstance(current, str):
        return text
    # None, lists and dicts: JSON (null, [1, 2], {"a": 1}); a bare word stays a string for None.
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if current is None:
            return text
        raise wrong(f"JSON of a {type(current).__name__}") from None
    if isinstance(current, tuple) and isinstance(value, list):
        return _as_tuples(value, current)  # JSON has no tuples: a list stands for one (Swin's depths)
    if current is not None and not isinstance(value, type(current)):
        raise wrong(f"a {'list' if isinstance(current, tuple) else type(current).__name__} in JSON")
    return value


def _as_tuples(value: list, like: tuple) -> tuple:
    """``value`` as a tuple, its inner lists as tuples where ``like``'s items are (nested configs)."""
    inner = like[0] if like else None
    return tuple(_as_tuples(v, inner) if isinstance(v, list) and isinstance(inner, tuple) else v for v in value)


def unknown_key(key: str, fields: list[str], where: str) -> SpecError:
    """The message for a --set key the config does not have, with close names."""
    close = difflib.get_close_matches(key, fields, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return SpecError(f"--set {key}=...: {where} has no field {key!r}.{hint}")
