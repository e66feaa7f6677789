"""The ``dbprofile`` command line (entry point ``dbprofile.cli:main``). Importing the package
registers every command on the group (``app.main``)."""

from dbprofile.cli import plan_command, report_commands, run_command, tool_commands  # noqa: F401  (registers the commands)
from dbprofile.cli.app import (
    EXIT_BAD_INPUT,
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_NOTHING_FITS,
    EXIT_OK,
    EXIT_TERMINATED,
    exit_code,
    freeze_startup_objects,
    main,
)

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_BROKEN_PIPE",
    "EXIT_INTERRUPTED",
    "EXIT_NOTHING_FITS",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "exit_code",
    "freeze_startup_objects",
    "main",
]
