"""A cache of the planner's fake runs on disk, so a repeated plan, or the largest-batch search of the
next one, reads a trace instead of running it again.

Each entry is one fake measurement (``depth.measure_fake``, or one simulated rank of
``depth.simulate_fake``), or a whole plan (a plan asked again reads its answer without even
checking the model on fake tensors), under a key made of everything that decides it: the model (``spec_key``:
every field of the ModelSpec, its functions by their code, the source files of the functions and
of the classes and functions they name, and the values they close over; a changed model file is
another key, never a stale entry), the technique, batch size, micro-batches, precision, optimizer,
the CUDA target's corrections (512-byte rounding, allocator replay, compute capability), the
sharding, the depth path asked for, and the versions of dbprofile (with a hash of its own source),
torch, the model libraries and Python (``environment_key``, which reads the libraries' versions from
their installed metadata and imports none of them). The command line's warm plans
(dbprofile.cli.warm_plan) are entries of no one spec, keyed by the question alone. An entry is a pickle behind a header and its SHA-256; it is written to a temporary
file and moved into place (``os.replace``), so a reader never sees half an entry, and one that is
cut short or corrupt (a killed process, a full disk) fails its checksum, is ignored and is traced
again. Location: ``$DBPROFILE_CACHE_DIR``, else ``$XDG_CACHE_HOME/dbprofile``, else
``~/.cache/dbprofile``; ``dbprofile plan --no-cache`` (``plan(cache=False)``) neither reads nor writes.

Known limitations: code the model reaches only indirectly (a helper module that the model's module
imports, and that no function of the spec names) is covered by the versions above, not by its
source; delete the cache directory after editing such a file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import inspect
import os
import pickle
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from dbprofile.results import Measurement
from dbprofile.version import __version__

MAGIC = b"dbprofile-trace-cache 1\n"
ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
"""A default repr's memory address: different in every process, so left out of keys."""
MAX_DEPTH = 4
"""How deep ``_value_key`` follows closures, partials and object attributes."""


def cache_dir() -> Path:
    """Where entries live (module docstring)."""
    explicit = os.environ.get("DBPROFILE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dbprofile"


def _file_hash(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


LIBRARIES = ("torch", "transformers", "diffusers", "timm")
"""The libraries whose versions are part of every key: torch, and the ones model sources load."""


def library_version(name: str) -> str:
    """``name``'s installed version, read from its metadata without importing it ('-' when absent)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def environment_key() -> str:
    """dbprofile's version and a hash of its own source, Python's version and the versions of torch and
    the model libraries installed (``LIBRARIES``). Imports none of them: the command line computes it
    before torch is imported (dbprofile.cli.warm_plan), and the planner's keys use the same text."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(_file_hash(str(path)).encode())
    libraries = [f"{name} {library_version(name)}" for name in LIBRARIES]
    return f"{__version__}|{digest.hexdigest()}|{sys.version}|{libraries}"


def _source_file(obj: Any) -> str:
    try:
        path = inspect.getsourcefile(obj)
    except (TypeError, OSError):
        return ""
    return f"{path}:{_file_hash(path)}" if path else ""


def _value_key(value: Any, depth: int = 0) -> str:
    """A text that changes when ``value`` would build, batch or score another model (module docstring)."""
    if depth > MAX_DEPTH:
        return type(value).__qualname__
    deeper = functools.partial(_value_key, depth=depth + 1)
    if isinstance(value, functools.partial):
        return f"partial({deeper(value.func)}, {[deeper(a) for a in value.args]}, {deeper(value.keywords)})"
    if inspect.ismethod(value):
        return f"method({deeper(value.__func__)}, {deeper(value.__self__)})"
    if inspect.isfunction(value):
        code = value.__code__
        named = [value.__globals__.get(name) for name in code.co_names]
        sources = sorted({_source_file(obj) for obj in named if inspect.isclass(obj) or inspect.isfunction(obj)})
        cells = [deeper(cell.cell_contents) for cell in value.__closure__ or () if _filled(cell)]
        return (
            f"function({value.__module__}.{value.__qualname__}, {_source_file(value)}, {code.co_code.hex()}, "
            f"{deeper(code.co_consts)}, {deeper(value.__defaults__)}, {cells}, {sources})"
        )
    if inspect.isclass(value):
        return f"class({value.__module__}.{value.__qualname__}, {[_source_file(c) for c in value.__mro__[:-1]]})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{deeper(k)}: {deeper(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}({[deeper(v) for v in value]})"
    if type(value).__repr__ is object.__repr__ and hasattr(value, "__dict__"):
        return f"{type(value).__qualname__}({deeper(vars(value))}, {_source_file(type(value))})"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return f"{type(value).__qualname__}({deeper(vars(value))})"
    return ADDRESS.sub("", repr(value))


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def spec_key(spec: Any) -> str:
    """Every field of the ModelSpec (``_value_key``): what model the planner traces."""
    return _value_key({f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)})


class TraceCache:
    """Fake measurements on disk by key; ``None`` directory: a cache that keeps nothing. ``spec``
    None: entries of no one model, whose parts must say everything that decides them (the command
    line's warm plans, dbprofile.cli.warm_plan, keyed before any spec is loaded)."""

    def __init__(self, spec: Any, directory: Path | None) -> None:
        self.directory = directory
        model = spec_key(spec) if spec is not None else "no spec"
        self._model = hashlib.sha256(f"{environment_key()}|{model}".encode()).hexdigest() if directory else ""

    def _path(self, parts: dict[str, Any]) -> Path | None:
        if self.directory is None:
            return None
        key = hashlib.sha256(f"{self._model}|{sorted((k, repr(v)) for k, v in parts.items())}".encode()).hexdigest()
        return self.directory / key[:2] / f"{key}.trace"

    def get(self, parts: dict[str, Any], kind: type = Measurement) -> Any:
        """The entry for ``parts`` (a ``kind``), or None: missing, cut short, corrupt or of another format."""
        path = self._path(parts)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except OSError:
            return None
        header = len(MAGIC) + 64
        if not data.startswith(MAGIC) or len(data) < header:
            return None
        payload = data[header:]
        if hashlib.sha256(payload).hexdigest().encode() != data[len(MAGIC) : header]:
            return None
        try:
            value = pickle.loads(payload)
        except Exception:  # noqa: BLE001 - an entry that does not load is retraced, never trusted
            return None
        return value if isinstance(value, kind) else None

    def put(self, parts: dict[str, Any], value: Any) -> None:
        """Store ``value``: a measurement that ran (a failure may be this machine's, and is traced
        again), a run's attention decisions (planner.entries), or a whole plan (``plan`` stores only
        plans whose every technique ran)."""
        path = self._path(parts)
        if path is None or (isinstance(value, Measurement) and not value.ok):
            return
        payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        data = MAGIC + hashlib.sha256(payload).hexdigest().encode() + payload
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            pass  # a cache that cannot be written only costs the next plan its time
