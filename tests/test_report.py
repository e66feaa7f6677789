"""Tests of the HTML reports: structure (verdict first, one bar per technique), the numbers
shown against the JSON's, escaping of user strings, no external URLs, comparisons of
uneven runs, and a real headless-Chromium render when Chromium is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from dbprofile.report import charts, render_comparison, render_run, write_comparison, write_run_report
from dbprofile.report.page import show_bytes
from dbprofile.results import BlockMeasurement, Measurement, Reason, RunResult, Verdict
from dbprofile.units import format_bytes
from dbprofile.verdict import judge_into
from dbprofile.vocabulary import CATEGORIES

MiB = 1024**2
PARAMS = 2_761_728  # a 6-layer ViT-tiny-ish model
P_BYTES = PARAMS * 4


def _shares(activations: int, temporaries: int, params: int = P_BYTES, optimizer: bool = True) -> dict[str, int]:
    return {
        "parameters": params,
        "buffers": 0,
        "gradients": params,
        "optimizer_state": 2 * params if optimizer else 0,
        "activations": activations,
        "temporaries": temporaries,
        "inputs": 393_344,
    }


def _timeline(activation_peak: int) -> dict:
    cats = list(CATEGORIES[:8])  # the 8 values per point below (later categories are all 0 here)
    points = []
    for i in range(12):  # forward: activations grow
        points.append([0, P_BYTES, 0, P_BYTES * i // 12, 2 * P_BYTES, activation_peak * i // 11, 1_048_576, 393_344, 0])
    for i in range(12):  # backward: activations freed, gradients appear
        points.append([1, P_BYTES, 0, P_BYTES, 2 * P_BYTES, activation_peak * (11 - i) // 11, 2_097_152, 393_344, 0])
    points.append([2, P_BYTES, 0, P_BYTES, 2 * P_BYTES, 0, 4_194_304, 393_344, 0])
    return {"categories": cats, "phases": ["forward", "backward", "optimizer"], "points": points}


def _measurement(technique: str, activations: int, temporaries: int, **kw) -> Measurement:
    shares = kw.pop("shares", None) or _shares(activations, temporaries)
    return Measurement(
        technique=technique,
        batch_size=kw.pop("batch_size", 64),
        shares=shares,
        peak_bytes=sum(shares.values()),
        num_parameters=PARAMS,
        **kw,
    )


def make_run(
    model: str = "vit-tiny",
    batch_size: int = 64,
    cuda: bool = False,
    oom: str | None = None,
    techniques: tuple[str, ...] = ("e2e", "ckpt", "db:3"),
) -> RunResult:
    """A realistic hand-built run: e2e, ckpt, and DiffusionBlocks with per-block figures."""
    device = "cuda:0" if cuda else "cpu"
    scale = batch_size / 64
    ms: list[Measurement] = []
    for tech in techniques:
        if tech == oom:
            ms.append(
                Measurement(
                    technique=tech,
                    batch_size=batch_size,
                    device=device,
                    status="oom",
                    error="CUDA out of memory. Tried to allocate 2.00 GiB <in block 0>",
                )
            )
            continue
        if tech == "e2e":
            m = _measurement(
                "e2e",
                int(188 * MiB * scale),
                int(12 * MiB * scale),
                batch_size=batch_size,
                device=device,
                peak_phase="backward",
                timeline=_timeline(int(188 * MiB * scale)),
                step_time_s=0.0507,
                step_time_spread_s=[0.0498, 0.0531],
            )
        elif tech == "ckpt":
            m = _measurement(
                "ckpt",
                int(41 * MiB * scale),
                int(30 * MiB * scale),
                batch_size=batch_size,
                device=device,
                peak_phase="backward",
                timeline=_timeline(int(41 * MiB * scale)),
                step_time_s=0.0688,
                step_time_spread_s=[0.0671, 0.0702],
            )
        else:
            blocks = []
            for b, (layers, act) in enumerate([([0, 1], 78), ([2, 3], 74), ([4, 5], 76)]):
                sh = _shares(int(act * MiB * scale), int(9 * MiB * scale), params=P_BYTES + 221_184)
                blocks.append(
                    BlockMeasurement(
                        block=b,
                        layers=layers,
                        peak_bytes=sum(sh.values()),
                        shares=sh,
                        peak_phase="backward",
                        step_time_s=0.0181 + 0.0004 * b,
                    )
                )
            worst = max(blocks, key=lambda x: x.peak_bytes)
            m = Measurement(
                technique=tech,
                batch_size=batch_size,
                device=device,
                peak_bytes=worst.peak_bytes,
                shares=dict(worst.shares),
                peak_phase="backward",
                peak_block=worst.block,
                blocks=blocks,
                timeline=_timeline(int(78 * MiB * scale)),
                step_time_s=0.0189,
                step_time_spread_s=[0.0179, 0.0195],
                block_steps_time_s=0.0555,
                num_parameters=PARAMS,
                extra_parameters=55_296,
                extra={"ratio_vs_full_depth_adaln": 0.334, "ratio_vs_plain_e2e": 0.43},
            )
        if cuda:
            m.cuda = {
                "max_memory_allocated": m.peak_bytes + 3_584,
                "max_memory_reserved": m.peak_bytes + 44 * MiB,
                "nvml_used_bytes": m.peak_bytes + 44 * MiB + 517 * MiB,
            }
        ms.append(m)
    return RunResult(
        model=model,
        model_info={"family": "vit", "task": "classification", "num_layers": 6, "parameters": PARAMS},
        environment={
            "torch": "2.11.0+cu130" if cuda else "2.13.0+cpu",
            "python": "3.11.2",
            "dbprofile": "0.1.0",
            "device_name": "NVIDIA H100 80GB HBM3" if cuda else "cpu",
            "driver": "580.65" if cuda else None,
        },
        command=f"dbprofile run {model} --batch-size {batch_size} --techniques {','.join(techniques)}",
        created="2026-01-05T10:00:00",
        measurements=ms,
    )


class _Tree(HTMLParser):
    """Collects elements (tag, attrs, text) and section order from a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[dict] = []
        self.stack: list[dict] = []
        self.sections: list[str] = []

    def handle_starttag(self, tag, attrs):
        el = {"tag": tag, "attrs": dict(attrs), "text": ""}
        self.elements.append(el)
        if tag == "section":
            self.sections.append(el["attrs"].get("id"))
        if tag not in ("br", "meta", "path", "use", "rect", "stop"):
            self.stack.append(el)

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i]["tag"] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        for el in self.stack:
            el["text"] += data


def parse(page: str) -> _Tree:
    tree = _Tree()
    tree.feed(page)
    tree.close()
    return tree


def _numbers_table(tree: _Tree) -> list[dict]:
    return [el for el in tree.elements if el["tag"] == "td" and "data-bytes" in el["attrs"]]


def test_verdict_section_comes_first_and_sections_follow_the_reading_order():
    tree = parse(render_run(make_run(cuda=True)))
    assert tree.sections == [
        "verdict",
        "peaks",
        "phase",
        "timelines",
        "blocks",
        "times",
        "numbers",
        "cuda",
        "environment",
        "reproduce",
    ]
    verdict = next(el for el in tree.elements if el["attrs"].get("id") == "verdict")
    assert "verdict" in verdict["text"].lower()


def test_without_verdict_module_the_page_leads_with_measured_facts(monkeypatch):
    monkeypatch.setitem(sys.modules, "dbprofile.verdict", None)  # makes the import fail as if absent
    result = make_run()
    tree = parse(render_run(result))
    verdict = next(el for el in tree.elements if el["attrs"].get("id") == "verdict")
    assert "No verdict available" in verdict["text"]
    e2e = result.get("e2e")
    assert f"e2e peaks at {format_bytes(e2e.peak_bytes)}" in verdict["text"]
    db = result.get("db:3")
    assert f"db:3 peaks at {format_bytes(db.peak_bytes)}" in verdict["text"]
    assert "all 3 block-steps 1.09x" in verdict["text"]  # 0.0555 / 0.0507


def _judged(result: RunResult, decision: str, headline: str, sentence: str) -> RunResult:
    """``result`` with a stored verdict of our choosing (pages show the verdict a run stored)."""
    reason = Reason(rule="activations-dominate", sentence=sentence, numbers={"fraction": 0.78})
    result.verdict = Verdict(decision=decision, headline=headline, reasons=[reason])
    return result


def test_verdict_is_rendered_first_with_its_reasons_escaped():
    args = ("adopt", "Adopt db:3: it cuts the peak by 46% <b>", "activations are 78% of the e2e peak")
    page = render_run(_judged(make_run(), *args))
    tree = parse(page)
    assert tree.sections[0] == "verdict"
    box = next(el for el in tree.elements if el["tag"] == "div" and "verdict" in el["attrs"].get("class", ""))
    assert box["attrs"]["class"] == "verdict adopt"
    assert "Adopt DiffusionBlocks" in box["text"]
    assert "Adopt db:3: it cuts the peak by 46% <b>" in box["text"] and "&lt;b&gt;" in page
    assert "activations are 78% of the e2e peak" in box["text"] and "activations-dominate" in box["text"]
    cmp_tree = parse(render_comparison([_judged(make_run(), *args), _judged(make_run(batch_size=128), *args)]))
    summary = next(el for el in cmp_tree.elements if el["attrs"].get("id") == "summary")
    assert summary["text"].count("Verdict: Adopt DiffusionBlocks") == 2


def test_a_failing_verdict_does_not_hide_the_measurements(monkeypatch):
    import dbprofile.verdict.decide as decide

    monkeypatch.setattr(decide, "judge", lambda result: 1 / 0)
    result = decide.judge_into(make_run())
    assert result.verdict is None and result.measurements
    tree = parse(render_run(result))
    verdict = next(el for el in tree.elements if el["attrs"].get("id") == "verdict")
    assert "could not be computed (ZeroDivisionError" in verdict["text"]
    assert "peaks" in tree.sections


def test_one_stacked_bar_per_completed_technique_with_fixed_category_colours():
    result = make_run(techniques=("e2e", "ckpt", "db:3", "db:3+offload"), oom="db:3+offload")
    page = render_run(result)
    ids = set(re.findall(r'id="peak-bar-(\d+)-(\w+)"', page))
    assert {int(i) for i, _ in ids} == {0, 1, 2}  # the OOM measurement (index 3) has no bar
    assert {c for _, c in ids} == {"parameters", "gradients", "optimizer_state", "activations", "temporaries", "inputs"}
    # Each segment is drawn in its category's colour.
    seg = re.search(r'<g id="peak-bar-0-activations">\s*<path[^>]*fill: (#[0-9a-f]{6})', page)
    assert seg.group(1) == charts.CATEGORY_COLOURS["activations"].lower()
    assert "OOM: no peak measured" in page


def test_numbers_shown_equal_the_json_values():
    result = make_run(cuda=True)
    reloaded = RunResult.from_dict(RunResult.from_dict(result.to_dict()).to_dict())
    tree = parse(render_run(reloaded))
    cells = _numbers_table(tree)
    unit = charts.pick_unit(max(m.peak_bytes for m in result.measurements))
    assert unit == "MiB"
    shown = {(int(c["attrs"]["data-bytes"]), c["text"]) for c in cells}
    for m in result.measurements:
        assert (m.peak_bytes, format_bytes(m.peak_bytes, unit)) in shown
        for n in m.shares.values():
            if n:
                assert (n, format_bytes(n, unit)) in shown
        for b in m.blocks:
            block_unit = charts.pick_unit(max(x.peak_bytes for x in m.blocks))
            assert (b.peak_bytes, format_bytes(b.peak_bytes, block_unit)) in shown
        for key in ("max_memory_allocated", "max_memory_reserved", "nvml_used_bytes"):
            assert any(int(c["attrs"]["data-bytes"]) == m.cuda[key] for c in cells)
    for c in cells:  # exact bytes on hover
        assert c["attrs"]["title"] == f"{int(c['attrs']['data-bytes']):,} bytes"


def test_amounts_too_small_for_the_table_unit_keep_their_own_unit():
    assert show_bytes(3_112, "MiB") == format_bytes(3_112) == "3.04 KiB"
    assert show_bytes(0, "MiB") == "0 B"
    assert show_bytes(393_344, "MiB") == format_bytes(393_344, "MiB") == "0.38 MiB"
    result = make_run(techniques=("e2e", "ckpt"))
    result.measurements[1].shares["buffers"] = 3_112
    result.measurements[1].shares["inputs"] -= 3_112
    cells = {int(c["attrs"]["data-bytes"]): c["text"] for c in _numbers_table(parse(render_run(result)))}
    assert cells[3_112] == "3.04 KiB" and cells[0] == "0 B"


def test_times_show_block_steps_and_their_ratio_to_e2e():
    page = render_run(make_run())
    tree = parse(page)
    times = next(el for el in tree.elements if el["attrs"].get("id") == "times")
    assert "db:3 (3 block-steps)" in times["text"]
    assert "55.5 ms" in times["text"] and "1.09x" in times["text"]  # 0.0555 / 0.0507
    assert "18.9 ms" in times["text"] and "0.37x" in times["text"]  # one block-step
    numbers = next(el for el in tree.elements if el["attrs"].get("id") == "numbers")
    assert "ratio vs plain e2e" in numbers["text"] and "0.430" in numbers["text"]


def test_cuda_section_explains_the_allocator_and_nvml_gap():
    tree = parse(render_run(make_run(cuda=True)))
    cuda = next(el for el in tree.elements if el["attrs"].get("id") == "cuda")
    assert "caching allocator" in cuda["text"] and "CUDA context" in cuda["text"]
    assert "cuda" not in parse(render_run(make_run())).sections
    assert "differs from the allocator" not in cuda["text"]  # make_run's figures agree within 2%


def test_cuda_section_warns_when_the_tracker_misses_allocated_memory():
    result = make_run(cuda=True)
    e2e = result.get("e2e")
    e2e.cuda["max_memory_allocated"] = int(e2e.peak_bytes * 1.4)
    tree = parse(render_run(result))
    cuda = next(el for el in tree.elements if el["attrs"].get("id") == "cuda")
    assert "-28.57%" in cuda["text"]  # 1/1.4 - 1
    assert "more than 2% for e2e:" in cuda["text"]


def test_script_named_model_and_hostile_strings_are_escaped_everywhere():
    evil = "<script>alert(1)</script>"
    result = make_run(model=evil, oom="ckpt")
    result.command = f"dbprofile run '{evil}' \"--x\""
    result.measurements[1].error = '<img src=x onerror="alert(2)">'
    result.measurements[2].technique = f"db:3{evil}"
    result.environment["device_name"] = evil
    page = render_run(result)
    cmp_page = render_comparison([result, make_run(model=evil + "2")])
    for p in (page, cmp_page):
        assert "<script" not in p.lower()
        assert "<img" not in p.lower()
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in p
    tree = parse(page)
    assert tree.elements[0]["tag"] == "html"
    assert evil in next(el for el in tree.elements if el["tag"] == "h1")["text"]  # shown, as text
    assert any(evil in el["text"] for el in tree.elements if el["tag"] == "code")


def test_chart_text_that_looks_like_markup_stays_text():
    name = 'x onload="alert(1)" javascript:alert(2) $\\alpha$ </svg>'
    result = make_run(techniques=("e2e", "db:2"))
    result.measurements[1].technique = name
    tree = parse(render_run(result))
    svg_texts = [el["text"] for el in tree.elements if el["tag"] == "text"]
    assert name in svg_texts  # drawn literally: no math parsing, no markup
    assert not any(a.startswith("on") for el in tree.elements for a in el["attrs"])


def test_no_external_urls_and_no_javascript():
    pages = [render_run(make_run(cuda=True)), render_comparison([make_run(), make_run(batch_size=128)])]
    for page in pages:
        tree = parse(page)
        for el in tree.elements:
            assert el["tag"] not in ("script", "link", "iframe", "img", "object")
            for name, value in el["attrs"].items():
                if name in ("src", "href", "xlink:href", "action"):
                    assert value.startswith("#"), (el["tag"], name, value)
                assert not name.startswith("on"), (el["tag"], name)
        assert "url(http" not in page and "@import" not in page


def test_compare_renders_runs_with_different_technique_sets_and_an_oom():
    a = make_run(batch_size=64, techniques=("e2e", "ckpt", "db:3"))
    b = make_run(batch_size=256, techniques=("e2e", "db:2", "db:3"), oom="e2e", cuda=True)
    page = render_comparison([a, b])
    tree = parse(page)
    assert tree.sections == ["summary", "peaks", "numbers", "runs"]
    th = [el["text"] for el in tree.elements if el["tag"] == "th"]
    assert "cpu · batch 64" in th and "cuda:0 · batch 256" in th  # what differs names the series
    numbers = next(el for el in tree.elements if el["attrs"].get("id") == "numbers")
    assert "OOM" in numbers["text"] and "not run" in numbers["text"]
    cells = _numbers_table(tree)
    assert {int(c["attrs"]["data-bytes"]) for c in cells} == {
        m.peak_bytes for r in (a, b) for m in r.measurements if m.ok
    }
    # One grouped bar per completed (series, technique): a has 3, b has 3 minus the OOM.
    assert len(set(re.findall(r'id="cmp-bar-(\d+)-(\d+)"', page))) == 5


def test_compare_labels_name_what_differs_between_runs():
    a = make_run(model="vit-tiny")
    b = make_run(model="gpt-small")
    tree = parse(render_comparison([a, b]))
    th = [el["text"] for el in tree.elements if el["tag"] == "th"]
    assert "vit-tiny" in th and "gpt-small" in th
    same = parse(render_comparison([make_run(), make_run()]))
    th = [el["text"] for el in same.elements if el["tag"] == "th"]
    assert "run 1" in th and "run 2" in th


def test_run_with_several_batch_sizes_labels_each_bar_with_its_batch():
    a, b = make_run(batch_size=64), make_run(batch_size=128)
    merged = RunResult(model="vit-tiny", measurements=a.measurements + b.measurements, command=a.command)
    page = render_run(merged)
    assert "e2e @ batch 128" in page
    assert len({i for i, _ in re.findall(r'id="peak-bar-(\d+)-(\w+)"', page)}) == 6


def test_failed_and_empty_runs_still_render():
    result = make_run(techniques=("e2e", "db:2"))
    result.measurements[1] = Measurement(
        technique="db:2", batch_size=64, status="nan", error="loss is nan at step 3", step_time_s=float("nan")
    )
    tree = parse(render_run(result))
    numbers = next(el for el in tree.elements if el["attrs"].get("id") == "numbers")
    assert "nan" in numbers["text"] and "loss is nan at step 3" in numbers["text"]
    assert "db:2 (one block-step)" not in render_run(result)
    empty = parse(render_run(RunResult(model="empty")))
    assert empty.sections == ["verdict", "environment", "reproduce"]


def test_comparison_shows_the_command_that_rebuilds_it():
    tree = parse(render_comparison([make_run()], command="dbprofile compare a.json b.json -o c.html"))
    assert tree.sections[-1] == "reproduce"
    assert any(el["text"] == "dbprofile compare a.json b.json -o c.html" for el in tree.elements if el["tag"] == "code")


def test_write_functions_create_folders_and_files(tmp_path):
    out = write_run_report(make_run(), tmp_path / "reports" / "run.html")
    assert out.read_text().startswith("<!DOCTYPE html>")
    out = write_comparison([make_run(), make_run(batch_size=32)], tmp_path / "cmp.html")
    assert "dbprofile comparison" in out.read_text()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_headless_chromium_renders_the_report_to_png(tmp_path):
    page = write_run_report(make_run(cuda=True), tmp_path / "run.html")
    png = tmp_path / "run.png"
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--hide-scrollbars",
            "--window-size=1100,2400",
            f"--screenshot={png}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # A blank page compresses to almost nothing; charts and tables do not.
    assert len(data) > 60_000


def test_distributed_runs_label_each_rank():
    rows = [_measurement("e2e", 100 * MiB, 10 * MiB, extra={"rank": r, "world_size": 2}) for r in (0, 1)]
    page = render_run(RunResult(model="m", measurements=rows))
    assert "e2e rank 0" in page and "e2e rank 1" in page


def test_memory_against_compute_follows_the_verdict_when_flops_were_counted():
    result = make_run(cuda=True)
    assert "tradeoff" not in parse(render_run(result)).sections  # nothing counted: no chart
    for m, per_sample in zip(result.measurements, (100e9, 122e9, 101e9)):
        m.training_flops = int(per_sample * m.batch_size)
    judge_into(result)  # as the runner does when a run ends
    page = render_run(result)
    tree = parse(page)
    assert tree.sections[:2] == ["verdict", "tradeoff"]
    assert page.count('id="mc-point-') == 3
    assert ">1.22x<" in page and ">1.01x<" in page and ">122.0<" in page  # units.format_gflop, as the text table
    from dbprofile.verdict import judge

    recommended = judge(result).recommended
    assert ('id="mc-recommended"' in page) == (recommended is not None)
