"""dbprofile: measure whether DiffusionBlocks block-wise training saves memory that matters.

The front door:

>>> import dbprofile
>>> result = dbprofile.run("vit-tiny", ["e2e", "ckpt", "db:2"], batch_sizes=[8])   # measured here
>>> result.verdict.decision                    # computed once, stored with the result
>>> plan = dbprofile.plan("llama-7b", 2, device="H100-80GB")                      # predicted, no GPU
>>> plan.fits("A100-40GB"), plan.verdict.headline
>>> dbprofile.judge(result, capacity_bytes=24 * 2**30)                            # ask again

Importing the package also installs the text and notebook views of results
(``dbprofile.report.text``, ``dbprofile.report.notebook``), so ``repr(plan)`` is its table.
"""

from dbprofile.loading import load_spec, validate_spec
from dbprofile.measure.runner import run
from dbprofile.planner import plan
from dbprofile.report import notebook as _notebook_views  # noqa: F401  (installs the HTML views)
from dbprofile.report import text as _text_views  # noqa: F401  (installs the text views)
from dbprofile.results import BlockMeasurement, Measurement, Plan, PlanEntry, RunResult, Verdict
from dbprofile.settings import RunSettings
from dbprofile.spec import ModelSpec, SpecError
from dbprofile.units import format_bytes
from dbprofile.verdict import judge
from dbprofile.version import __version__

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
