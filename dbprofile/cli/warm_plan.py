"""A repeated ``dbprofile plan`` of a built-in preset, answered from the trace cache before torch is
imported (issue 28: importing torch alone takes 1.3-2.7 s, more than a warm plan's whole budget).

A whole plan asked before is kept by ``plan()`` under a key that holds its model spec
(dbprofile.planner.trace_cache), and a spec takes torch to load. This module keeps the command
line's answer under the question as it was typed (``question``: the model argument and every
option that shapes the answer, not the output options) beside what every trace-cache key holds
(``trace_cache.environment_key``: the versions of dbprofile with a hash of its own source, of torch
and the model libraries read from their metadata, and of Python). What is kept (``PlanAnswer``) is
what the command shows: the plan (a ``Plan`` unpickles without torch) and the lines that came from
the spec. Entries go through TraceCache's files (atomic, checksummed; a corrupt one is ignored and
the plan made again).

Only built-in presets (and the default model) are kept (``keeps``): their code is all in
dbprofile's source, which the key hashes. Not kept, and why: a model file (its code, and what it
imports, can change under the same path; ``plan()`` keys it by its source, which takes loading it),
hf:, diffusers: and timm: names (their configs come from the Hub or its local cache, which can
change under the same name), --set (refused for presets anyway) and a sweep (several --seq-len or
--image-size values; a single value is part of the key, as typed). The question is looked up for
any model argument: one that was never kept is a miss (one file not found), and the plan is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dbprofile.planner.trace_cache import TraceCache, cache_dir
from dbprofile.results import Plan

OUTPUT_OPTIONS = ("html", "no_cache", "workers", "json_mode", "csv_path", "quiet", "verbose")
"""``dbprofile plan``'s options that change where the answer goes or how it is made, not what it is:
left out of the question (every other option is in it)."""


@dataclass(frozen=True, kw_only=True)
class PlanAnswer:
    """What ``dbprofile plan`` shows of one planned model: the plan and the lines taken from its spec."""

    plan: Plan
    heading: str
    """The model and its parameter count: ``'<name> (<description>): <N> parameters'``."""
    experts: str | None = None
    """A mixture-of-experts model's experts in one sentence (dbprofile.report.experts); None otherwise."""


def question(params: dict[str, Any]) -> dict[str, Any]:
    """The key of a plan asked on the command line: the command's parameters as click parsed them
    (the model argument and every option, ``click.Context.params``) but the ``OUTPUT_OPTIONS``. An
    option added to the command later is part of the key unless it is named there."""
    asked = {name: value for name, value in params.items() if name not in OUTPUT_OPTIONS}
    return {"run": "command-line plan", **asked}


def keeps(model: str | None, swept: str | None, planned: list[Plan]) -> bool:
    """Whether the answer to this plan is kept for the fast path: a built-in preset (module docstring),
    one plan, and every technique ran (a failure may be this machine's, as ``plan()`` says of its own)."""
    # load_spec's own rules (these modules import torch, which the normal path has loaded already).
    from dbprofile.loading import is_ecosystem_source, names_file
    from dbprofile.models import PRESETS

    preset = model is None or (model in PRESETS and not is_ecosystem_source(model) and not names_file(model))
    return preset and swept is None and len(planned) == 1 and all(e.ok for e in planned[0].entries)


def _answers() -> TraceCache:
    return TraceCache(None, cache_dir())


def read(asked: dict[str, Any]) -> PlanAnswer | None:
    """The answer kept for ``asked`` (``question``), or None: never asked, or an entry that is corrupt."""
    return _answers().get(asked, PlanAnswer)


def keep(asked: dict[str, Any], answer: PlanAnswer) -> None:
    """Keep ``answer`` for the next time ``asked`` comes (after ``keeps`` said yes)."""
    _answers().put(asked, answer)
