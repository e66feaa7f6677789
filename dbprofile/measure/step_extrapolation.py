"""Extrapolating one tracked step to another depth (dbprofile.measure.depth): the traces of the
same step at three shallow depths are aligned point by point (the optimizer's per-parameter
loops repeat the same ops, so each point is keyed by its op and its byte deltas), every point
lies on a line in the depth, and the peak at the target depth is read off the extrapolated
trace. A term that is not affine raises ``NotAffine`` and the caller traces in full."""

from __future__ import annotations

from difflib import SequenceMatcher
from typing import Any

from dbprofile.measure.tracking import StepRecord, state_bytes
from dbprofile.vocabulary import CATEGORIES, PHASES


class NotAffine(ValueError):
    """The shallow traces do not line up (another structure, or bytes off the line at the check depth)."""


def _line(v1: list[int], v2: list[int], steps: int) -> list[int]:
    """The point ``steps`` depths past v1 on the line through v1 and v2 (one depth apart)."""
    return [a + (b - a) * steps for a, b in zip(v1, v2)]


def _with_deltas(tags: list, values: list[list[int]]) -> list[tuple]:
    out, before = [], [0] * len(values[0]) if values else []
    for tag, value in zip(tags, values):
        out.append((*tag, tuple(b - a for a, b in zip(before, value))))
        before = value
    return out


SHORT_MATCH = 4
"""Matching points between two mismatches up to this many are re-aligned with them (see _insertions)."""


def _insertions(fine1: list, fine2: list, coarse1: list, coarse2: list) -> list[tuple[int, int, int]]:
    """Where the deeper step's extra points go: (position in the shallow step, start in the deeper
    one, how many), aligning first by (phase, op, bytes added per category), which tells one
    parameter's optimizer update from another's; a point whose bytes change with depth (the vector
    of one norm per parameter that gradient clipping stacks) mismatches there, so each mismatched
    stretch is re-aligned by (phase, op) alone, its same-length replacements kept as the same
    instants (the line check decides)."""
    codes = SequenceMatcher(None, fine1, fine2, autojunk=False).get_opcodes()
    out: list[tuple[int, int, int]] = []
    i = 0
    while i < len(codes):
        op, i1, i2, j1, j2 = codes[i]
        if op == "equal":
            i += 1
            continue
        if op == "insert" and (i + 1 == len(codes) or codes[i + 1][0] == "equal"):
            out.append((i1, j1, j2 - j1))
            i += 1
            continue
        # a stretch of mismatches, with matches of at most SHORT_MATCH points between them
        k = i
        while k + 1 < len(codes) and (
            codes[k + 1][0] != "equal" or (codes[k + 1][2] - codes[k + 1][1] <= SHORT_MATCH and k + 2 < len(codes))
        ):
            k += 1
        a1, b1, a2, b2 = i1, codes[k][2], j1, codes[k][4]
        for sub, s1, e1, s2, e2 in SequenceMatcher(None, coarse1[a1:b1], coarse2[a2:b2], autojunk=False).get_opcodes():
            if sub == "insert":
                out.append((a1 + s1, a2 + s2, e2 - s2))
            elif sub == "delete" or (sub == "replace" and e1 - s1 != e2 - s2):
                raise NotAffine("a deeper step is not the shallow step with runs of points inserted")
        i = k + 1
    return out


def _same_run(run2: list[list[int]], runs3: list[list[int]], length: int) -> bool:
    """Whether the deeper step's two inserted runs change the bytes point by point as the second
    depth's one run does. Their tags alone cannot say it: a loop of identical ops (an offloaded
    block's host-to-device copies, ``aten._to_copy`` each) matches any stretch of the same length, and
    a run read from the wrong stretch would give its points wrong lines."""

    def steps(run: list[list[int]]) -> list[list[int]]:
        return [[b - a for a, b in zip(before, after)] for before, after in zip(run, run[1:])]

    return steps(run2) == steps(runs3[:length]) == steps(runs3[length:])


def extrapolate_step(records: list[StepRecord], depths: tuple[int, ...], target: int) -> StepRecord:
    """One unit's tracked step at ``target`` (layers per unit) from its traces at three consecutive
    ``depths``. Raises NotAffine when the traces do not line up or the check depth is off the line.

    The tracked points are tagged (phase, op). The deeper trace is the shallowest one with runs of
    points inserted, one run per loop over the layers (the forward, the backward, and the optimizer's
    loops over parameters); the third depth must be the same with each run inserted twice, and every
    point outside the runs must lie on one line through the three depths. At the target those points
    are extrapolated along their lines, and each loop's inserted runs hold bytes affine in their
    index, so the first and the last run (from the runs at the second and third depth) are the
    loop's extremes; the peak is the largest of all these points, the first in time on a tie."""
    m1, m2, m3 = depths
    if not (m2 == m1 + 1 and m3 == m2 + 1):
        raise ValueError(f"the trace depths must be three consecutive integers; got {depths}")
    tags = [[(point[0], op) for op, point in (r.trace or [])] for r in records]
    values = [[point[1:] for _, point in (r.trace or [])] for r in records]
    (t1, t2, t3), (v1, v2, v3) = tags, values
    if not t1:
        raise NotAffine("the tracked steps recorded no points")
    inserts = _insertions(_with_deltas(t1, v1), _with_deltas(t2, v2), t1, t2)
    # Walk t1 in time order, building t3's expected tags (each run twice) and the candidates.
    expected3: list = []
    where3: dict[int, int] = {}
    candidates: list[tuple[str, int, int, int]] = []  # ("point", j, j2, j3) or ("run", j2, j3, length)
    shift2 = 0
    pending = list(inserts)
    for j in range(len(t1) + 1):
        while pending and pending[0][0] == j:
            _, start2, length = pending.pop(0)
            candidates.append(("run", start2, len(expected3), length))
            expected3 += t2[start2 : start2 + length] * 2
            shift2 += length
        if j < len(t1):
            where3[j] = len(expected3)
            candidates.append(("point", j, j + shift2, len(expected3)))
            expected3.append(t1[j])
    if expected3 != t3:
        raise NotAffine("the third depth is not the shallow step with each run inserted twice")
    for kind, start2, start3, length in candidates:
        if kind == "run" and not _same_run(v2[start2 : start2 + length], v3[start3 : start3 + 2 * length], length):
            raise NotAffine("an inserted run's points do not repeat at the third depth")
    grow = target - m1
    best: list[int] | None = None
    best_phase = -1
    state_peak = 0
    for kind, a, b, c in candidates:
        if kind == "point":
            if _line(v1[a], v2[b], 2) != v3[c]:
                raise NotAffine(f"the bytes in phase {phase_name(t1[a][0])} are not affine in the depth")
            points = [(t1[a][0], _line(v1[a], v2[b], grow))]
        else:
            start2, start3, length = a, b, c
            last = grow - 1  # index of the last inserted run at the target
            points = []
            for k in (0, last) if last > 0 else (0,):
                for o in range(length):
                    at2, at3, next3 = v2[start2 + o], v3[start3 + o], v3[start3 + length + o]
                    # run k at the target: run 0 at depth m2, moved along the depth, plus k rep steps
                    points.append(
                        (
                            t2[start2 + o][0],
                            [x2 + (x3 - x2) * (target - m2) + (y3 - x3) * k for x2, x3, y3 in zip(at2, at3, next3)],
                        )
                    )
        for phase, value in points:
            if min(value) < 0:
                raise NotAffine("a share would be negative at full depth")
            state_peak = max(state_peak, state_bytes(value))
            # strictly larger: the tracker's peak is the first instant that reaches the maximum
            if best is None or sum(value) > sum(best):
                best, best_phase = value, phase
    assert best is not None
    shares: dict[str, int] = {name: best[i] for i, name in enumerate(CATEGORIES)}
    return StepRecord(
        peak_bytes=sum(best), shares=shares, peak_phase=phase_name(best_phase), timeline={}, state_peak=state_peak
    )


def phase_name(index: int) -> str | None:
    return PHASES[index] if 0 <= index < len(PHASES) else None


def extrapolate_value(a: Any, b: Any, c: Any, grow: int, path: str, not_affine: list[str]) -> Any:
    """Integer leaves on the line through depths m1, m2 (checked at m3); others as at m2."""
    if isinstance(b, bool) or b is None:
        return b
    if isinstance(b, int) and isinstance(a, int) and isinstance(c, int):
        if a + (b - a) * 2 != c:
            not_affine.append(path)
            return None
        return a + (b - a) * grow
    if isinstance(b, dict) and isinstance(a, dict) and isinstance(c, dict):
        return {k: extrapolate_value(a.get(k), v, c.get(k), grow, f"{path}.{k}", not_affine) for k, v in b.items()}
    if isinstance(b, list) and isinstance(a, list) and isinstance(c, list) and len(a) == len(b) == len(c):
        return [
            extrapolate_value(x, y, z, grow, f"{path}[{i}]", not_affine) for i, (x, y, z) in enumerate(zip(a, b, c))
        ]
    return b
