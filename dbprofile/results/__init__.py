"""Result data, the layer every other imports and that imports nothing above it: a run's
measurements (``run``), a plan's entries (``plan``), a verdict (``verdict``), and the hooks
through which the presentation layer shows them (``views``)."""

from dbprofile.results.plan import Plan, PlanEntry
from dbprofile.results.run import (
    SCHEMA_VERSION,
    BlockMeasurement,
    Measurement,
    RunResult,
    known_fields,
    model_info_of,
    per_sample,
    validate_result,
)
from dbprofile.results.verdict import Reason, Verdict
from dbprofile.schema import ResultSchemaError

__all__ = [
    "SCHEMA_VERSION",
    "BlockMeasurement",
    "Measurement",
    "Plan",
    "PlanEntry",
    "Reason",
    "ResultSchemaError",
    "RunResult",
    "Verdict",
    "known_fields",
    "model_info_of",
    "per_sample",
    "validate_result",
]
