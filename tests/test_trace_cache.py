"""The trace cache (dbprofile.planner.trace_cache): a repeated plan reads its fake runs instead of
tracing them, with the same bytes; a changed model file, or a corrupt or half-written entry, is traced
again; --no-cache neither reads nor writes; the directory is where the docs say."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dbprofile.measure import depth
from dbprofile.models import get_preset
from dbprofile.planner import plan
from dbprofile.planner.trace_cache import MAGIC, cache_dir

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom_resmlp.py"


@pytest.fixture
def traced(monkeypatch):
    """The fake runs a plan really traced (not read from the cache)."""
    calls: list[str] = []
    original = depth.measure_fake

    def counting(spec, tech, *args, **kwargs):
        calls.append(tech.name)
        return original(spec, tech, *args, **kwargs)

    monkeypatch.setattr(depth, "measure_fake", counting)
    return calls


def _plan(spec, techniques=("e2e",), **kwargs):
    return plan(spec, 2, device="H100-80GB", techniques=list(techniques), search_max_batch=False, **kwargs)


def _figures(p):
    return [(e.technique, e.peak_bytes, e.shares, e.training_flops, e.corrections) for e in p.entries]


def _entries() -> list[Path]:
    return sorted(cache_dir().rglob("*.trace"))


def test_a_repeated_plan_reads_its_traces_with_the_same_bytes(traced):
    spec = get_preset("llama-tiny").at_depth(4)
    first = _plan(spec, ["e2e", "db:2"])
    assert traced == ["e2e", "db:2"] and len(_entries()) == 5  # two traces, their attention decisions, the plan
    again = _plan(get_preset("llama-tiny").at_depth(4), ["e2e", "db:2"])
    assert traced == ["e2e", "db:2"]  # nothing traced the second time
    assert _figures(again) == _figures(first)
    searched = plan(get_preset("llama-tiny").at_depth(4), 2, device="cpu", techniques=["e2e"], search_max_batch=False)
    assert traced == ["e2e", "db:2", "e2e"]  # the CPU target's trace is another program
    # Another plan over the same traces reads them (its own answer is a new entry).
    assert _figures(_plan(spec, ["e2e", "db:2"], min_micro_batch=2)) == _figures(first)
    assert traced == ["e2e", "db:2", "e2e"] and searched.entries[0].ok


@pytest.mark.parametrize(
    ("precision", "gpus", "retraced"),
    [
        ("fp32", ["H100-80GB", "A100-80GB"], False),  # memory-efficient attention on both
        ("bf16", ["A100-80GB", "L40S-48GB"], False),  # flash on both (compute capability 8.0 and 8.9)
        ("bf16", ["H100-80GB", "A100-80GB"], True),  # cuDNN attention on the H100, flash on the A100
    ],
)
def test_a_plan_for_another_gpu_reads_the_runs_whose_attention_picks_the_same_kernels(
    traced, precision, gpus, retraced
):
    """The compute capability reaches a fake run only through the attention backend each call picks,
    so a run traced for one GPU is read for another where every call picks the same one; its figures
    are the ones that GPU's own trace gives (a plan without the cache)."""
    spec = get_preset("llama-tiny").at_depth(4)
    techniques = ["e2e", "db:2"]

    def planned(gpu, **kwargs):
        return plan(spec, 2, gpu, techniques=techniques, precision=precision, search_max_batch=False, **kwargs)

    planned(gpus[0])
    assert traced == techniques
    second = planned(gpus[1])
    assert traced == techniques * (2 if retraced else 1)
    assert _figures(second) == _figures(planned(gpus[1], cache=False))
    assert second.model_info["attention_backends"] == planned(gpus[1], cache=False).model_info["attention_backends"]


def test_a_plan_in_another_parallel_layout_is_planned_not_read():
    """The layout (tensor-parallel degree, pipeline) is part of what a cached plan answered."""
    spec = get_preset("llama-tiny").at_depth(4)
    plain = _plan(spec, world_size=2)
    split = _plan(get_preset("llama-tiny").at_depth(4), world_size=2, tp=2)
    assert (plain.tensor_parallel, split.tensor_parallel) == (1, 2)
    assert split.entries[0].tensor_parallel == 2
    assert split.entries[0].shares["parameters"] < plain.entries[0].shares["parameters"]


def test_no_cache_neither_reads_nor_writes(traced):
    spec = get_preset("llama-tiny").at_depth(4)
    _plan(spec, cache=False)
    assert _entries() == []
    _plan(spec)
    _plan(spec, cache=False)
    assert traced == ["e2e"] * 3


def test_a_changed_model_file_never_hits_a_stale_entry(traced, tmp_path):
    model = tmp_path / "resmlp.py"
    shutil.copy(EXAMPLE, model)
    before = _plan(str(model))
    model.write_text(model.read_text().replace("WIDTH = 64", "WIDTH = 96"))
    after = _plan(str(model))
    assert traced == ["e2e"] * 2
    assert after.entries[0].shares["parameters"] > before.entries[0].shares["parameters"]


def test_a_corrupt_or_half_written_entry_is_ignored_and_traced_again(traced):
    spec = get_preset("llama-tiny").at_depth(4)
    first = _plan(spec)
    entries = _entries()  # the trace, its attention decisions (planner.entries._read) and the plan
    assert len(entries) == 3
    damage = {
        "cut short": lambda data: data[: len(data) // 2],
        "a flipped byte": lambda data: data[:-10] + bytes([data[-10] ^ 1]) + data[-9:],
        "empty": lambda data: b"",
        "another format": lambda data: b"not a trace",
    }
    for spoil in damage.values():
        for entry in entries:
            entry.write_bytes(spoil(entry.read_bytes()))
        assert _figures(_plan(spec)) == _figures(first)
        assert all(entry.read_bytes().startswith(MAGIC) and len(entry.read_bytes()) > 200 for entry in entries)
    assert traced == ["e2e"] * (1 + len(damage))
    _plan(spec)
    assert traced == ["e2e"] * (1 + len(damage))  # and read the next time


def test_the_cache_lives_under_xdg_cache_home_unless_dbprofile_cache_dir_says(monkeypatch, tmp_path):
    monkeypatch.delenv("DBPROFILE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "dbprofile"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "dbprofile"
    monkeypatch.setenv("DBPROFILE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_plan_no_cache_on_the_command_line(traced):
    from _cli import invoke

    args = ["plan", "gpt-tiny", "-b", "2", "-t", "e2e", "--gpu", "cpu", "--json"]
    assert invoke(*args, "--no-cache").exit_code == 0
    assert _entries() == []
    assert invoke(*args).exit_code == 0 and invoke(*args).exit_code == 0
    # The trace, the plan and the command line's answer (dbprofile.cli.warm_plan); the heading's parameter
    # count comes from the plan's model facts, nothing of its own.
    assert traced == ["e2e"] * 2 and len(_entries()) == 3
