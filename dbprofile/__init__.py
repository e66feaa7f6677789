"""dbprofile: measure whether DiffusionBlocks block-wise training saves memory that matters.

The front door:

>>> import dbprofile
>>> result = dbprofile.run("vit-tiny", ["e2e", "ckpt", "db:2"], batch_sizes=[8])   # measured here
>>> result.verdict.decision                    # computed once, stored with the result
>>> plan = dbprofile.plan("llama-7b", 2, device="H100-80GB")                      # predicted, no GPU
>>> plan.fits("A100-40GB"), plan.verdict.headline
>>> dbprofile.judge(result, capacity_bytes=24 * 2**30)                            # ask again

Importing the package also installs the text and notebook views of results
(``dbprofile.report.text``, ``dbprofile.report.notebook``) and the planner's answer to
``Plan.fits`` (``dbprofile.planner``), so ``repr(plan)`` is its table; every ``dbprofile.X``
import runs this first, so a result is never made without them. It does not import torch:
``run``, ``plan``, ``load_spec``, ``validate_spec`` and ``judge`` are imported when first used
(PEP 562), so a warm ``dbprofile plan`` answers from the trace cache without it
(dbprofile.cli.warm_plan).
"""

import importlib
from typing import TYPE_CHECKING, Any

from dbprofile import planner as _planner  # noqa: F401  (installs Plan.fits)
from dbprofile.report import notebook as _notebook_views  # noqa: F401  (installs the HTML views)
from dbprofile.report import text as _text_views  # noqa: F401  (installs the text views)
from dbprofile.results import BlockMeasurement, Measurement, Plan, PlanEntry, RunResult, Verdict
from dbprofile.settings import RunSettings
from dbprofile.spec import ModelSpec, SpecError
from dbprofile.units import format_bytes
from dbprofile.version import __version__

if TYPE_CHECKING:
    from dbprofile.loading import load_spec, validate_spec
    from dbprofile.measure.runner import run
    from dbprofile.planner import plan
    from dbprofile.verdict import judge

LAZY = {
    "load_spec": "dbprofile.loading",
    "validate_spec": "dbprofile.loading",
    "run": "dbprofile.measure.runner",
    "plan": "dbprofile.planner",
    "judge": "dbprofile.verdict",
}
"""The front door's functions that import torch, each by the module it lives in."""


def __getattr__(name: str) -> Any:
    if name not in LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(LAZY[name]), name)
    globals()[name] = value  # asked once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(LAZY))


__all__ = [
    "BlockMeasurement",
    "Measurement",
    "ModelSpec",
    "Plan",
    "PlanEntry",
    "RunResult",
    "RunSettings",
    "SpecError",
    "Verdict",
    "__version__",
    "format_bytes",
    "judge",
    "load_spec",
    "plan",
    "run",
    "validate_spec",
]
