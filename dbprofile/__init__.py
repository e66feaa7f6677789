"""dbprofile: measure whether DiffusionBlocks block-wise training saves memory that matters."""

from dbprofile.results import BlockMeasurement, Measurement, RunResult, format_bytes
from dbprofile.loading import load_spec, validate_spec
from dbprofile.spec import ModelSpec, SpecError

__version__ = "0.1.0"

__all__ = [
    "BlockMeasurement",
    "Measurement",
    "ModelSpec",
    "RunResult",
    "SpecError",
    "format_bytes",
    "load_spec",
    "validate_spec",
    "__version__",
]
