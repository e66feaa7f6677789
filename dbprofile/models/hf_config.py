"""Resolving a Hugging Face configuration without weights or network: ``transformers`` itself
(required only for ``hf:`` sources), its warnings kept quiet, and a model's config from the
local cache or a config.json path, with ``--set`` overrides applied and checked."""

from __future__ import annotations

import contextlib
import difflib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dbprofile.models.overrides import parse_value, unknown_key
from dbprofile.spec import SpecError


def require_transformers() -> Any:
    """Import transformers, or stop with how to install it."""
    try:
        import transformers
    except ImportError:
        raise SpecError(
            "hf: models need the transformers package, which is not installed. Install it with "
            "`pip install 'dbprofile[hf]'` (or `pip install transformers`), then run again."
        ) from None
    return transformers


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' logging (config sanity warnings about token ids of random-size
    vocabularies) while a config or model is built."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SpecError(f"Cannot read the model config {str(path)!r}: {err}. Pass a valid config.json.") from None


def _no_config_in(name: str, path: Path) -> SpecError:
    inside = sorted(p.name for p in path.iterdir())[:5]
    holds = f"it holds {', '.join(inside)}" if inside else "it is empty"
    return SpecError(
        f"hf:{name} is a directory without config.json ({holds}). Pass a directory holding the model's "
        "config.json, or the config file's own path."
    )


def raw_config(name: str) -> tuple[dict[str, Any], str]:
    """(the config as a dict, where it came from) for ``hf:NAME``, offline; SpecError otherwise.
    A diffusers config (it has ``_class_name``) is returned as is for the caller to route."""
    transformers = require_transformers()
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return _read_json(path / "config.json"), f"{path / 'config.json'}"
    if path.is_dir():  # transformers would read it as a cache entry with an empty config
        raise _no_config_in(name, path)
    if path.is_file():
        return _read_json(path), str(path)
    if path.suffix == ".json" or name.startswith((".", "/", "~")):
        raise SpecError(f"hf:{name}: no such file or directory. Pass a directory holding config.json, or its path.")
    from transformers import PretrainedConfig

    try:
        with quiet_transformers():
            data, _ = PretrainedConfig.get_config_dict(name, local_files_only=True)
        return data, f"the local Hugging Face cache ({name})"
    except Exception:  # noqa: BLE001 - not cached (or not a hub id): try a model_type next
        pass
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if name in CONFIG_MAPPING_NAMES:
        return {"model_type": name}, f"transformers' {name} defaults"
    close = difflib.get_close_matches(name, list(CONFIG_MAPPING_NAMES), n=3, cutoff=0.6)
    hint = f" Close model types: {', '.join(close)}." if close else ""
    hub = (
        f" If {name!r} is a hub id, its config is not in the local cache and dbprofile never downloads at run "
        f"time: fetch it with `huggingface-cli download {name} config.json` (or save the config.json and pass "
        "its directory)."
        if "/" in name
        else ""
    )
    raise SpecError(
        f"hf:{name} is not a local config, a cached hub id or a model_type transformers "
        f"{transformers.__version__} knows.{hint}{hub} A local directory holding config.json also works."
    )


def make_config(data: dict[str, Any], overrides: dict[str, str], source: str) -> Any:
    """The transformers config from ``data`` with ``--set`` overrides typed by the config's own
    field types; unknown keys and unparsable values raise SpecError."""
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise SpecError(f"The config from {source} has no model_type; transformers cannot tell which model it is.")
    with quiet_transformers():
        try:
            base = AutoConfig.for_model(model_type, **data)
        except (ValueError, KeyError) as err:
            raise SpecError(f"transformers cannot build a {model_type!r} config from {source}: {err}") from None
        typed = {}
        for key, text in overrides.items():
            if key == "attn_implementation":  # the attention kernel: sdpa (default), eager, ...
                typed[key] = text
                continue
            if not hasattr(base, key):
                fields = set(base.to_dict()) | set(getattr(base, "attribute_map", {}))
                raise unknown_key(key, sorted(fields), f"the {model_type} config")
            typed[key] = parse_value(key, text, getattr(base, key))
        try:
            return AutoConfig.for_model(model_type, **{**data, **typed})
        except (ValueError, TypeError) as err:
            raise SpecError(f"The {model_type} config rejects these --set values: {err}") from None
