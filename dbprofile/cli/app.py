"""The ``dbprofile`` command group and what its commands share: exit codes, one-paragraph
user errors, the output and model options, and small parsers. The commands live beside it
(``run_command``, ``plan_command``, ``report_commands``, ``tool_commands``); they parse options,
call the API and render. No measuring or planning logic lives in the CLI.

Every user mistake surfaces as one paragraph on stderr and exit code 2, never a traceback.
``exit_code`` is the one place that maps what happened to the exit status (README, "Exit
codes"); ``dbprofile.console`` decides where output goes (stdout, stderr, JSON, CSV, progress).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from dbprofile import units
from dbprofile.console import NORMAL, QUIET, VERBOSE, Output
from dbprofile.results import Plan, RunResult
from dbprofile.spec import SpecError
from dbprofile.version import __version__

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_NOTHING_FITS = 3
"""The question was answered (table and report written), but nothing fits or every technique failed."""
EXIT_INTERRUPTED = 130
"""128 + SIGINT, the shell's convention for Ctrl-C."""


def exit_code(answer: Any = None, *, interrupted: bool = False) -> int:
    """The exit status for what happened: EXIT_INTERRUPTED after Ctrl-C; EXIT_NOTHING_FITS when the
    answer holds nothing usable (a plan where no technique fits the target or none ran, a run or
    runs where every measurement failed, validation rows that all failed); EXIT_OK otherwise.
    ``answer``: a Plan, a RunResult, validation rows, or a list of those. Bad input never gets
    here: it is a UserError, which carries EXIT_BAD_INPUT."""
    if interrupted:
        return EXIT_INTERRUPTED
    if answer is None:
        return EXIT_OK
    return EXIT_OK if _usable(answer) else EXIT_NOTHING_FITS


def _usable(answer: Any) -> bool:
    if isinstance(answer, Plan):
        from dbprofile.planner import nothing_fits

        return not nothing_fits(answer)
    if isinstance(answer, RunResult):
        return any(m.ok for m in answer.measurements)
    if isinstance(answer, (list, tuple)):
        return any(_usable(item) for item in answer)
    return getattr(answer, "status", None) == "ok"  # a validation row


class UserError(click.ClickException):
    """A mistake in the input: printed as one paragraph, exit code 2."""

    exit_code = EXIT_BAD_INPUT

    def show(self, file=None) -> None:
        click.echo(f"Error: {self.message}", err=True)


EXIT_TERMINATED = 143
"""SIGTERM (128 + 15)."""
EXIT_BROKEN_PIPE = 141
"""The reader of stdout closed it (128 + SIGPIPE), as shells report for `yes | head`."""


def friendly_errors(func):
    """Turn SpecError / ValueError from the API into UserError (no traceback), a file that
    cannot be read or written into one paragraph, and Ctrl-C / SIGTERM into exit 130 / 143."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from dbprofile.measure.limits import Terminated, sigterm_as_interrupt

        try:
            with sigterm_as_interrupt():
                return func(*args, **kwargs)
        except (SpecError, ValueError) as err:
            raise UserError(str(err)) from None
        except BrokenPipeError:
            # The reader went away (`dbprofile models | head -1`): stop quietly, as `yes | head` does,
            # and keep Python from complaining again when it flushes stdout at exit.
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_BROKEN_PIPE)
        except OSError as err:
            where = f" {str(err.filename)!r}" if err.filename else ""
            raise UserError(
                f"Cannot use{where}: {err.strerror or err}. Check that the path exists, is a file where a file is "
                "expected, and that you may read or write it."
            ) from None
        except KeyboardInterrupt as err:
            what = f" {err}" if str(err) else ""
            click.echo(f"Interrupted{what}. A run's result JSON keeps every measurement that finished.", err=True)
            sys.exit(EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED)

    return wrapper


def check_writable(path: Path, option: str) -> None:
    """Fail before any work, not after it: the folder exists or can be made (its nearest
    existing ancestor is a writable folder), and an existing file there may be replaced.
    Creates nothing, so --dry-run leaves no trace."""
    if path.is_dir():
        raise UserError(f"{option} {str(path)!r} is a folder; give a file path such as {path / 'result.json'}.")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(
            f"Cannot write {option} {str(path)!r}: {str(ancestor)!r} is a file, not a folder. Choose another {option}."
        )
    try:
        if ancestor == path.parent:  # it exists: try it for real (permissions, read-only mounts, /proc)
            fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".dbprofile-write-check-")
            os.close(fd)
            os.unlink(probe)
        elif not os.access(ancestor, os.W_OK | os.X_OK):
            raise PermissionError(13, "permission denied")
    except OSError as err:
        raise UserError(
            f"Cannot write {option} {str(path)!r}: the folder {str(ancestor)!r} is not writable "
            f"({err.strerror or err}). Choose another {option}."
        ) from None
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(
            f"Cannot write {option} {str(path)!r}: the file exists and may not be changed (read-only or immutable). "
            f"Choose another {option}, or make the file writable."
        )


def check_outputs(outputs: list[tuple[str, Path]], inputs: list[tuple[str, Path]] | None = None) -> None:
    """Every file a command will write, checked before any work: each one writable
    (``check_writable``), none the same file as another (one option's file must never replace
    another's, as ``--csv r.json`` beside ``-o r.json`` would) and none a file the command reads."""
    owners: dict[tuple, str] = {}
    for what, path in inputs or []:
        owners.setdefault(_file_identity(path), what)
    for what, path in outputs:
        key = _file_identity(path)
        if key in owners:
            raise UserError(
                f"{what} {str(path)!r} would overwrite {owners[key]} (the same file). Give {what} another path."
            )
        owners[key] = what
    for what, path in outputs:
        check_writable(path, what)


def _file_identity(path: Path) -> tuple:
    """The same key for two spellings of one file: its device and inode when it exists (hard and
    symbolic links), else its absolute path with links resolved."""
    try:
        st = path.stat()
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", str(path.resolve()))


def parse_size(text: str | None) -> int | None:
    """A size the user wrote (dbprofile.units.parse_size), or None when not given."""
    if text is None:
        return None
    try:
        return units.parse_size(text)
    except ValueError as err:
        raise UserError(str(err)) from None


def parse_int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers such as 32 or 16,32,64; got {text!r}.") from None
    if not values:
        raise UserError(f"{option} needs at least one value.")
    return list(dict.fromkeys(values))  # a repeated value (-b 2,2) is measured once


def freeze_startup_objects() -> None:
    """Move every object alive now (torch's modules, the model registry) out of the garbage
    collector's reach. The runner collects garbage between techniques, because trainers leave
    reference cycles that hold tensors; without this each collection walks torch's hundreds of
    thousands of long-lived objects (0.16 s a time, measured), which was half the wall time
    of the default run. Only this command's own process is affected."""
    gc.collect()
    gc.freeze()


OPTIMIZER_HELP = (
    "adamw, sgd or adafactor in PyTorch's default implementation for the device (foreach on CUDA and in "
    "plans for a GPU, the for-loop on the CPU), or with it named: adamw-loop, adamw-foreach, adamw-fused "
    "(likewise sgd-..., adafactor-loop / -foreach)."
)


FROM_CHECKPOINT_HELP = (
    "The team must continue from an existing end-to-end checkpoint: the verdict rules "
    "DiffusionBlocks out (it trains from scratch). Default: training from scratch."
)


def reproduce_command() -> str:
    return "dbprofile " + " ".join(shlex.quote(a) for a in sys.argv[1:])


class _Commands(click.Group):
    """The command group; Ctrl-C anywhere in a command exits EXIT_INTERRUPTED with one line, not
    click's "Aborted!" and exit 1. A run has already saved every measurement that finished."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("Interrupted. A run's result JSON keeps every measurement that finished.", err=True)
            ctx.exit(exit_code(interrupted=True))


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="dbprofile")
def main() -> None:
    """Measure whether DiffusionBlocks block-wise training saves memory that matters.

    Exit codes: 0 success; 2 bad input; 3 answered, but nothing fits or every technique failed
    (the table and the report are still written); 130 interrupted."""


def output_options(func):
    """--json, --csv FILE, -q and -v for a command; it receives ``console`` (a console.Output) and
    runs with the ``dbprofile`` logger routed to stderr at the chosen level."""

    @click.option(
        "--json",
        "json_mode",
        is_flag=True,
        help="Print the full answer as JSON on stdout; the human-readable text goes to stderr.",
    )
    @click.option(
        "--csv",
        "csv_path",
        default=None,
        type=click.Path(dir_okay=False),
        help="Also write the flat table (one row per measurement or technique) as CSV to this file.",
    )
    @click.option("--quiet", "-q", is_flag=True, help="No progress display and no notes, warnings only.")
    @click.option("--verbose", "-v", is_flag=True, help="Log every stage of the work (builds, warm-ups, steps).")
    @functools.wraps(func)
    def wrapper(*args, json_mode: bool, csv_path: str | None, quiet: bool, verbose: bool, **kwargs):
        if quiet and verbose:
            raise UserError("--quiet and --verbose contradict each other; pass one of them.")
        console = Output(
            json_mode=json_mode,
            csv_path=Path(csv_path) if csv_path else None,
            verbosity=QUIET if quiet else VERBOSE if verbose else NORMAL,
        )
        with console.logging_configured(), console.stdout_kept_for_answer():
            return func(*args, console=console, **kwargs)

    return wrapper


def model_options(func):
    """--set, --seq-len, --image-size and --masking-schedule: the model's config and shapes, for run and plan."""
    from dbprofile.vocabulary import MASKING_SCHEDULES

    func = click.option(
        "--masking-schedule",
        type=click.Choice(MASKING_SCHEDULES),
        default=None,
        help="Masking schedule of a masked diffusion LM (MD4): linear, the model's default, or cosine.",
    )(func)
    func = click.option(
        "--image-size",
        default=None,
        help="Image side of a vision model (a DiT's latent side); several comma-separated values sweep it (run).",
    )(func)
    func = click.option(
        "--seq-len",
        default=None,
        help="Sequence length of a language model; several comma-separated values sweep it (run), e.g. 256,512,1024.",
    )(func)
    func = click.option(
        "--set",
        "set_options",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a config field of an hf:, diffusers: or timm: model (repeatable), "
        "e.g. --set num_hidden_layers=4.",
    )(func)
    return func


def load_models(model, set_options, seq_len, image_size, masking_schedule=None):
    """(swept shape or None, specs) for MODEL with the --set / --seq-len / --image-size /
    --masking-schedule options."""
    from dbprofile.loading import load_sweep
    from dbprofile.models.overrides import parse_set_options

    # "" is a mistake (an unset shell variable), not "the default": parse_int_list refuses it.
    seq_lens = parse_int_list(seq_len, "--seq-len") if seq_len is not None else None
    image_sizes = parse_int_list(image_size, "--image-size") if image_size is not None else None
    return load_sweep(model, parse_set_options(set_options), seq_lens, image_sizes, masking_schedule)


def model_inputs(model: str | None) -> list[tuple[str, Path]]:
    """The model file a command reads (``file.py`` or ``file.py:name``), for ``check_outputs``:
    no output may replace it."""
    if model is None or model.startswith(("hf:", "diffusers:", "timm:")):
        return []
    path = Path(model.partition(":")[0])
    return [("the model file", path)] if path.is_file() else []


def concat_frames(frames: list):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def rows_frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows)
