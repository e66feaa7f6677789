"""Where the ``dbprofile`` command's output goes: the answer on stdout (a table, or with ``--json``
one JSON document and nothing else), everything for people on stderr (the table under
``--json``, log lines, the progress display), ``--csv`` files, and how loud it is
(``-q`` warnings only, default info, ``-v`` every stage of the work).

The progress display is rich's: a spinner, the current stage ("db:4 @ batch 8: tracked step
(block 2 of 4)"), a bar over the measurements where their number is known, and the elapsed
time. rich rather than tqdm because rich redraws from its own thread: a model that takes a
minute to build or a step that takes a minute still shows a moving spinner and clock, where a
tqdm bar only redraws when the code calls it, which is exactly when nothing visible happens.
rich's logging handler also prints log lines above the live display instead of through it.
It is shown only when stderr is a terminal and the command is not ``-q``: in CI, pipes and
``2> file`` the stages appear as plain log lines with ``-v`` and not at all otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from dbprofile import progress

log = logging.getLogger("dbprofile")

QUIET, NORMAL, VERBOSE = -1, 0, 1
_LEVELS = {QUIET: logging.WARNING, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}


def standard_json(value: Any) -> Any:
    """``value`` as plain JSON data: dataclasses (a Verdict) as dicts, tuples as lists, and every
    non-finite float (a diverged loss) as None, so the document is standard JSON that strict
    parsers (jq, JavaScript) read, not Python's NaN extension."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return standard_json(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): standard_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [standard_json(v) for v in value]
    return value


class _ClickHandler(logging.Handler):
    """Log records to whatever stderr is at the time (click's test runner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


@dataclass
class Output:
    """One command's output settings: ``json_mode`` (the answer is JSON on stdout), ``csv_path``
    (also write the flat table there) and ``verbosity`` (QUIET, NORMAL, VERBOSE)."""

    json_mode: bool = False
    csv_path: Path | None = None
    verbosity: int = NORMAL
    answer_stream: Any = None
    """Where ``emit_json`` writes: stdout as it was before ``stdout_kept_for_answer``."""

    @property
    def interactive(self) -> bool:
        """Show a live progress display: stderr is a terminal and nobody asked for quiet."""
        return self.verbosity > QUIET and sys.stderr.isatty()

    def text(self, message: str) -> None:
        """Human-readable answer (a table, a verdict): stdout, or stderr when stdout carries JSON
        (then left out under -q)."""
        if not self.json_mode:
            click.echo(message)
        elif self.verbosity > QUIET:
            click.echo(message, err=True)

    def info(self, message: str) -> None:
        """Chatter about the work (files written, what is skipped): stderr, hidden by -q."""
        log.info(message)

    def emit_json(self, document: dict[str, Any] | list[dict[str, Any]]) -> None:
        """The whole answer as one JSON document on stdout (only with --json)."""
        if self.json_mode:
            click.echo(json.dumps(standard_json(document), indent=1, allow_nan=False), file=self.answer_stream)

    @contextlib.contextmanager
    def stdout_kept_for_answer(self) -> Iterator[None]:
        """With --json, stdout carries one JSON document and nothing else: for the block's
        duration whatever else prints to stdout (a model's ``print``, a library's banner) goes to
        stderr, and ``emit_json`` writes to the stdout kept aside."""
        if not self.json_mode:
            yield
            return
        self.answer_stream = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            yield

    def write_csv(self, make_frame: Callable[[], Any]) -> None:
        """With --csv FILE, write the pandas DataFrame ``make_frame()`` builds there (folders created);
        without it, build nothing (pandas is not even imported)."""
        if self.csv_path is None:
            return
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        make_frame().to_csv(self.csv_path, index=False)
        self.info(f"csv:     {self.csv_path}")

    @contextlib.contextmanager
    def logging_configured(self) -> Iterator[None]:
        """Route the ``dbprofile`` logger to stderr at this command's level for the block's duration;
        below -v, libraries' log records lose their tracebacks (``_quiet_libraries``)."""
        handler = _rich_handler() if self.interactive else _ClickHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        previous = (log.level, log.propagate)
        log.addHandler(handler)
        log.setLevel(_LEVELS[self.verbosity])
        log.propagate = False  # the command owns stderr; no second copy through a root handler
        try:
            with _quiet_libraries() if self.verbosity < VERBOSE else contextlib.nullcontext():
                yield
        finally:
            log.removeHandler(handler)
            log.setLevel(previous[0])
            log.propagate = previous[1]

    @contextlib.contextmanager
    def progress(self, title: str, total: int | None = None) -> Iterator[Callable[[], None]]:
        """A live display while the block runs; yields ``advance()`` for one finished item of
        ``total``. Stages (dbprofile.progress) update its text. Nothing when not interactive."""
        if not self.interactive:
            yield lambda: None
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        columns = [SpinnerColumn(), TextColumn("{task.description}")]
        if total is not None:
            columns += [BarColumn(bar_width=20), MofNCompleteColumn()]
        columns.append(TimeElapsedColumn())
        with Progress(*columns, console=_stderr_console(), transient=True) as display:
            task = display.add_task(title, total=total)

            def on_stage(text: str) -> None:
                display.update(task, description=f"{title}: {text}")

            with progress.reporting(on_stage):
                yield lambda: display.advance(task)


SILENCED_LOGGERS = ("torch._subclasses.fake_tensor",)
"""Loggers that report, with a traceback, an exception dbprofile catches and says in its own
paragraph (fake tensors log every op that fails before raising it): off below -v. Off by a filter,
not a level: the command may import torch after the block starts (the CLI does not import it until
a command needs it), and importing torch resets its loggers' levels."""


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """No library's log record prints a traceback on a user's terminal (dbprofile says what went
    wrong in one paragraph; -v keeps them for debugging): every record made while the block runs,
    by a logger that exists now or is made later (transformers, diffusers, timm), is made without
    its exception and stack; the loggers in SILENCED_LOGGERS print nothing."""
    make_record = logging.getLogRecordFactory()

    def without_traceback(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if not record.name.startswith("dbprofile"):
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return record

    def nothing(record: logging.LogRecord) -> bool:
        return False

    silenced = [logging.getLogger(name) for name in SILENCED_LOGGERS]
    logging.setLogRecordFactory(without_traceback)
    for logger in silenced:
        logger.addFilter(nothing)
    try:
        yield
    finally:
        logging.setLogRecordFactory(make_record)
        for logger in silenced:
            logger.removeFilter(nothing)


@functools.cache
def _stderr_console():
    """One rich console for the display and the log handler, so log lines print above the display."""
    from rich.console import Console

    return Console(stderr=True)


def _rich_handler() -> logging.Handler:
    from rich.highlighter import NullHighlighter
    from rich.logging import RichHandler

    return RichHandler(
        console=_stderr_console(),
        show_time=False,
        show_level=False,
        show_path=False,
        markup=False,
        highlighter=NullHighlighter(),
    )
