"""Measurement engine: the memory tracker (bytes by category), fake-tensor mode, device
facts (CUDA allocator, NVML, environment) and the runner that measures techniques.

``fake_mode`` is imported eagerly (``dbprofile.spec.validate_spec`` needs it); the runner
and tracker load on first use so importing the package stays cheap.
"""

from dbprofile.measure.fake import fake_mode, is_fake

__all__ = ["fake_mode", "is_fake", "measure", "run", "format_table", "Tracker", "environment"]


def __getattr__(name: str):
    if name in ("measure", "run", "format_table"):
        from dbprofile.measure import runner

        return getattr(runner, name)
    if name == "Tracker":
        from dbprofile.measure.tracker import Tracker

        return Tracker
    if name == "environment":
        from dbprofile.measure.device import environment

        return environment
    raise AttributeError(f"module 'dbprofile.measure' has no attribute {name!r}")
