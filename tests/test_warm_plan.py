"""The warm plan's fast path (dbprofile.cli.warm_plan): a built-in preset's plan asked again on the
command line is answered from the trace cache without importing torch, with the same output; another
option is another question; a corrupt entry is ignored; and the package imports without torch."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import dbprofile
from dbprofile.cli import main, warm_plan
from dbprofile.planner.trace_cache import MAGIC, cache_dir

ROOT = Path(dbprofile.__file__).resolve().parent.parent
PLAN = ["plan", "vit-tiny", "-b", "2", "-t", "e2e", "--gpu", "cpu"]
TORCH_AT_EXIT = (
    "import atexit, sys; "
    "atexit.register(lambda: sys.stderr.write(f'torch imported: {\"torch\" in sys.modules}\\n')); "
    "from dbprofile.cli import main; main()"
)
"""``dbprofile`` as its entry point runs it, saying at exit whether torch was imported."""


def _python(*args: str) -> subprocess.CompletedProcess:
    """A fresh interpreter on this checkout (the environment carries the test's trace cache)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def _dbprofile(*args: str) -> subprocess.CompletedProcess:
    return _python("-c", TORCH_AT_EXIT, *args)


@pytest.fixture
def reads(monkeypatch) -> list[bool]:
    """Whether each in-process ``dbprofile plan`` was answered from a kept answer (True) or planned."""
    seen: list[bool] = []
    original = warm_plan.read

    def recording(asked):
        kept = original(asked)
        seen.append(kept is not None)
        return kept

    monkeypatch.setattr(warm_plan, "read", recording)
    return seen


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def _without_elapsed(document: str) -> dict:
    """The JSON answer but the plan's wall time (the fast path's is its own)."""
    answer = json.loads(document)
    assert isinstance(answer.pop("elapsed_s"), float)
    return answer


def _kept_answers() -> list[Path]:
    """The trace-cache files that hold a command line's answer (``warm_plan.PlanAnswer``)."""
    found = []
    for path in cache_dir().rglob("*.trace"):
        data = path.read_bytes()
        if isinstance(pickle.loads(data[len(MAGIC) + 64 :]), warm_plan.PlanAnswer):
            found.append(path)
    return found


def test_the_command_line_and_the_results_import_without_torch():
    modules = "dbprofile, dbprofile.cli, dbprofile.cli.warm_plan, dbprofile.results, dbprofile.report.text"
    done = _python("-c", f"import sys, {modules}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_front_door_names_still_resolve_lazily():
    from dbprofile.loading import load_spec
    from dbprofile.planner.predict import plan

    assert dbprofile.plan is plan and dbprofile.load_spec is load_spec
    assert set(dbprofile.__all__) <= set(dir(dbprofile))
    assert repr(dbprofile.Plan(model="m")) != "Plan('m', 0 rows)"  # the text view is installed
    with pytest.raises(AttributeError):
        dbprofile.no_such_name  # noqa: B018


def test_a_repeated_preset_plan_prints_the_same_without_torch(reads, tmp_path):
    first = _invoke(*PLAN)
    assert first.exit_code == 0, first.output
    assert reads == [False] and len(_kept_answers()) == 1

    # In a fresh process: the same bytes on stdout, and torch never imported.
    again = _dbprofile(*PLAN)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    assert "torch imported: False" in again.stderr
    as_json = _dbprofile(*PLAN, "--json")
    assert "torch imported: False" in as_json.stderr

    # The JSON, CSV and HTML are what the normal path writes (here reading plan()'s own entry).
    outputs = {way: ["--csv", str(tmp_path / f"{way}.csv"), "--html", str(tmp_path / f"{way}.html")] for way in "ab"}
    fast = _invoke(*PLAN, "--json", *outputs["a"])
    assert reads == [False, True] and fast.exit_code == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(warm_plan, "read", lambda asked: None)
        normal = _invoke(*PLAN, "--json", *outputs["b"])
    assert normal.exit_code == 0
    documents = [_without_elapsed(answer.stdout) for answer in (as_json, fast, normal)]
    assert documents[0] == {**documents[1], "files": {}}
    assert documents[1] == {**documents[2], "files": {"html": str(tmp_path / "a.html")}}
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    assert (tmp_path / "a.html").read_text() == (tmp_path / "b.html").read_text()


def test_another_option_is_another_question_and_nothing_fits_exits_3(reads, monkeypatch):
    assert _invoke(*PLAN).exit_code == 0
    assert _invoke(*PLAN, "-q").exit_code == 0  # an output option: the same question
    small = [*PLAN[:-1], "1MiB"]  # another target, where nothing fits
    first, again = _invoke(*small), _invoke(*small)
    assert (first.exit_code, again.exit_code) == (3, 3) and again.stdout == first.stdout
    assert reads == [False, True, False, True]

    class Planned(Exception):
        pass

    def planning(*args, **kwargs):
        raise Planned

    monkeypatch.setattr(dbprofile.planner, "plan", planning)
    assert isinstance(_invoke(*PLAN, "--no-cache").exception, Planned)
    assert len(reads) == 4  # --no-cache never reads a kept answer: it plans


def test_no_answer_is_kept_for_a_model_file_or_a_sweep(reads):
    model = str(ROOT / "examples" / "custom_resmlp.py")
    assert _invoke("plan", model, "-b", "2", "-t", "e2e", "--gpu", "cpu").exit_code == 0
    sweep = _invoke("plan", "gpt-tiny", "-b", "1", "-t", "e2e", "--gpu", "cpu", "--seq-len", "16,32")
    assert sweep.exit_code == 0, sweep.output
    assert _kept_answers() == []


def test_a_corrupt_kept_answer_is_ignored_and_planned_again(reads):
    first = _invoke(*PLAN)
    (kept,) = _kept_answers()
    data = kept.read_bytes()
    kept.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    again = _invoke(*PLAN)
    assert again.exit_code == 0 and again.stdout == first.stdout
    assert reads == [False, False]  # the flipped byte failed the checksum: planned again
    assert _invoke(*PLAN).stdout == first.stdout and reads == [False, False, True]  # and kept again
