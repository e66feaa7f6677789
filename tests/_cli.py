"""The CLI as the hardening tests drive it: ``invoke`` runs a command in-process, ``assert_refused`` checks
the contract for bad input (exit 2, one ``Error:`` paragraph, no traceback, the given fragments)."""

from __future__ import annotations

import re

from click.testing import CliRunner

from dbprofile.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result, *fragments) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and re.findall(r"(?m)^Error:", result.output) == ["Error:"], result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
