"""The caching-allocator model's sequence of allocations and frees at the model's full depth, from
the sequences of three shallow traces (dbprofile.measure.depth), so that an extrapolated plan replays
the allocator exactly instead of estimating its reserved bytes.

Reserved memory is not affine in the depth: it comes in whole segments, and which cached block serves
a request depends on the order of every allocation before it. But the order itself repeats: the
sequence at depth m + 1 is the sequence at depth m with one more layer's events (one step of depth)
inserted at a few places (the forward, the backward, each per-parameter loop of the gradient clip
and the optimizer), and a free releases either a fixed event's allocation or one in a copy that is
fixed relative to its own copy or to the ends. So:

- each run of consecutive frees is put in the order its blocks were allocated
  (``in_allocation_order``: frees with no malloc between them commute in the allocator, and their
  recorded order need not repeat, as bf16 autocast's cache shows);
- the sequences at depths m1 and m2 are aligned by their events, (malloc, bytes) and (free, bytes
  of the block), as insertions only (``_sites``); an event whose size changes with the depth (the
  gradient clip's stacked norms, 4 bytes per parameter tensor) is aligned by the allocator's
  512-byte rounding and grows by its step per depth;
- each insertion is moved to the boundary of its run's first repeat (``_normalised``), so that the
  inserted copies stand for middle layers, not the first or the last;
- every free is then a rule (``_infer``): the same fixed allocation, or a copy of one insertion that
  is its own copy plus k, the mirror of it (forward and backward), or the k-th from either end,
  with the copies just outside the run mapping to the fixed events there. The rule must explain the
  frees of both m2 and m3;
- the sequence at m2 and at m3 is generated again from m1, the insertions and the rules, and must
  equal the traced one event for event; only then is the target depth's sequence generated.

Anything else raises NotAffine, and the caller estimates the reserved bytes as before. Checked against
full-depth replays in tests/test_event_extrapolation.py (Llama, ViT, DiT presets: e2e, ckpt, sac,
offload, db:1; peak reserved and allocated bytes and the segment count equal).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from dbprofile.measure.allocator import FREED, CachingAllocatorModel, replay, round_request
from dbprofile.measure.step_extrapolation import NotAffine

Event = tuple[int, int]
"""(handle, bytes) for a malloc, (handle, FREED) for a free: dbprofile.measure.allocator's events."""
Token = tuple[str, int]
"""('m', bytes) or ('f', bytes of the block it frees)."""
Slot = tuple
"""Where an event sits in a generated sequence: ('F', index in the base sequence) or
('S', insertion, copy, offset in the insertion's unit)."""

RULE_ORDER = {"F": 0, "same": 1, "rev": 2, "neg": 3, "start": 4, "end": 5}
"""The rules a free may follow, the simplest first (``_infer`` takes the first that explains it)."""
PLACEMENTS = ("first repeat", "leftmost", "last repeat", "rightmost")
"""Where ``_normalised`` puts the insertions; tried in this order until one explains every free."""


def in_allocation_order(events: Sequence[Event], split: int | None = None) -> list[Event]:
    """``events`` with each run of consecutive frees put in the order their blocks were allocated
    (a run also ends at position ``split``, where something is inserted later). Frees with no malloc
    between them commute in the allocator: the free blocks they leave (merged with their free
    neighbours), the bytes allocated and every peak are the same in any order, so the replay is
    unchanged. But their recorded order need not repeat with the depth (bf16 autocast empties its cache
    of cast weights in the cache's own order), where the allocation order does."""
    made: dict[int, int] = {}

    def allocated(event: Event) -> int:
        return made.get(event[0], -1)

    out: list[Event] = []
    run: list[Event] = []
    for i, (handle, nbytes) in enumerate(events):
        if i == split or nbytes != FREED:
            out += sorted(run, key=allocated)
            run = []
        if nbytes == FREED:
            run.append((handle, nbytes))
        else:
            made[handle] = i
            out.append((handle, nbytes))
    return out + sorted(run, key=allocated)


def _tokens(events: Sequence[Event]) -> tuple[list[Token], list[int | None]]:
    """Each event as a token, and for a free the index of the malloc it frees."""
    size: dict[int, int] = {}
    made: dict[int, int] = {}
    tokens: list[Token] = []
    arcs: list[int | None] = []
    for i, (handle, nbytes) in enumerate(events):
        if nbytes == FREED:
            j = made.pop(handle)
            tokens.append(("f", size[j]))
            arcs.append(j)
        else:
            made[handle], size[i] = i, nbytes
            tokens.append(("m", nbytes))
            arcs.append(None)
    return tokens, arcs


def _changing(base: list[Token], deeper: list[Token]) -> tuple[list[tuple], list[tuple]]:
    """Both sequences with every size that only one of them has made one token ('changing'): the
    event whose size changes with the depth, if its sizes occur nowhere else."""
    only_base = {n for _, n in base} - {n for _, n in deeper}
    only_deeper = {n for _, n in deeper} - {n for _, n in base}
    return (
        [(kind, "changing") if n in only_base else (kind, n) for kind, n in base],
        [(kind, "changing") if n in only_deeper else (kind, n) for kind, n in deeper],
    )


def _rounded(base: list[Token], deeper: list[Token]) -> tuple[list[tuple], list[tuple]]:
    """Both sequences by the allocator's rounded sizes (a changing size whose sizes occur elsewhere)."""
    return [(kind, round_request(n)) for kind, n in base], [(kind, round_request(n)) for kind, n in deeper]


def _opcodes(base: list[Token], deeper: list[Token]) -> list[tuple]:
    """difflib's opcodes on the exact tokens; a region that insertions alone do not explain (a size that
    changes with the depth) is aligned again with its changing sizes as one token, else by the
    allocator's rounded sizes, widened until insertions explain it."""
    ops = difflib.SequenceMatcher(None, base, deeper, autojunk=False).get_opcodes()
    k = 0
    while k < len(ops):
        if ops[k][0] in ("equal", "insert"):
            k += 1
            continue
        for width, coarse in ((w, c) for w in range(1, 6) for c in (_changing, _rounded)):
            lo, hi = max(0, k - width), min(len(ops), k + width + 1)
            i1, j1, i2, j2 = ops[lo][1], ops[lo][3], ops[hi - 1][2], ops[hi - 1][4]
            coarse_base, coarse_deeper = coarse(base[i1:i2], deeper[j1:j2])
            sub = difflib.SequenceMatcher(None, coarse_base, coarse_deeper, autojunk=False).get_opcodes()
            if all(op in ("equal", "insert") for op, *_ in sub):
                ops[lo:hi] = [(op, a + i1, b + i1, c + j1, d + j1) for op, a, b, c, d in sub]
                k = lo
                break
        else:
            raise NotAffine(f"the allocator events differ between depths (a {ops[k][0]} at event {ops[k][1]})")
    return ops


def _sites(base: list[Token], deeper: list[Token]) -> tuple[list[tuple[int, tuple]], dict[int, int]]:
    """The insertions (position in ``base``, unit) that make ``deeper`` of ``base``, and the base events
    whose size changes per step of depth ({index: bytes per step})."""
    sites: list[tuple[int, tuple]] = []
    grow: dict[int, int] = {}
    for op, i1, i2, j1, j2 in _opcodes(base, deeper):
        if op == "equal":
            grow.update(
                {i: deeper[j][1] - base[i][1] for i, j in zip(range(i1, i2), range(j1, j2)) if base[i] != deeper[j]}
            )
        else:
            sites.append((i1, tuple(deeper[j1:j2])))
    return sites, grow


def _shift_left(base: list[Token], pos: int, unit: tuple, limit: int, grow: dict) -> tuple[int, tuple]:
    while pos > limit and pos - 1 not in grow and base[pos - 1] == unit[-1]:
        pos, unit = pos - 1, (base[pos - 1], *unit[:-1])
    return pos, unit


def _normalised(base: list[Token], sites: list[tuple[int, tuple]], grow: dict, placement: str) -> list:
    """Each insertion moved as far left as the sequence allows (merging insertions that meet there),
    then right by as much as ``placement`` says: to its run's first repeat, not at all, to its last
    repeat, or as far as it goes. A run of identical layers allows every such place; which one makes
    every free a rule depends on where the first and last layers differ from the middle ones."""
    merged: list[tuple[int, tuple]] = []
    for pos, unit in sites:
        pos, unit = _shift_left(base, pos, unit, merged[-1][0] if merged else 0, grow)
        if merged and merged[-1][0] == pos:
            pos, unit = _shift_left(base, pos, merged.pop()[1] + unit, merged[-1][0] if merged else 0, grow)
        merged.append((pos, unit))
    out = []
    for k, (pos, unit) in enumerate(merged):
        limit = merged[k + 1][0] if k + 1 < len(merged) else len(base)
        room, p = 0, len(unit)
        while pos + room < limit and pos + room not in grow and base[pos + room] == unit[room % p]:
            room += 1
        shift = {
            "first repeat": p if room >= p else 0,
            "leftmost": 0,
            "last repeat": max(0, room - p),
            "rightmost": room,
        }[placement]
        out.append((pos + shift, unit[shift % p :] + unit[: shift % p]))
    return out


def _layout(base_len: int, sites: list[tuple[int, tuple]], copies: int) -> list[Slot]:
    """The slot of every event of the sequence with ``copies`` copies of each insertion."""
    out: list[Slot] = []
    k = 0
    for i in range(base_len + 1):
        while k < len(sites) and sites[k][0] == i:
            for c in range(copies):
                out += [("S", k, c, o) for o in range(len(sites[k][1]))]
            k += 1
        if i < base_len:
            out.append(("F", i))
    return out


class _Rules:
    """Which allocation each free releases, as a rule per free (module docstring)."""

    def __init__(self, base: list[Token], sites: list[tuple[int, tuple]]) -> None:
        self.base, self.sites = base, sites
        self.rules: dict[tuple, tuple[tuple, dict[int, int]]] = {}
        self._counted: dict[tuple[int, int], int] = {}

    def _periods(self, site: int, side: int) -> int:
        """How many whole periods of the site's unit lie just before (-1) or after (+1) it in the base:
        the run goes on there, so copy -1, -2... (``copies``, ``copies`` + 1...) are those fixed events."""
        if (site, side) not in self._counted:
            pos, unit = self.sites[site]
            p, n = len(unit), 0
            while True:
                lo = pos - (n + 1) * p if side < 0 else pos + n * p
                if lo < 0 or lo + p > len(self.base) or tuple(self.base[lo : lo + p]) != unit:
                    break
                n += 1
            self._counted[site, side] = n
        return self._counted[site, side]

    def _as_copies(self, dst: Slot, copies: int) -> list[Slot]:
        """``dst`` as a copy: an inserted one, or a fixed event in a whole period next to a site."""
        if dst[0] == "S":
            return [dst]
        out = []
        for s, (pos, unit) in enumerate(self.sites):
            p, i = len(unit), dst[1]
            if pos - self._periods(s, -1) * p <= i < pos:
                out.append(("S", s, -((pos - i - 1) // p) - 1, (i - pos) % p))
            if pos <= i < pos + self._periods(s, +1) * p:
                out.append(("S", s, copies + (i - pos) // p, (i - pos) % p))
        return out

    def _candidates(self, src: Slot, dst: Slot, copies: int) -> set[tuple]:
        found: set[tuple] = {("F", dst[1])} if dst[0] == "F" else set()
        for _, s2, c2, o2 in self._as_copies(dst, copies):
            found |= {("start", s2, o2, c2), ("end", s2, o2, copies - 1 - c2)}
            if src[0] == "S":
                c = src[2]
                found |= {("same", s2, o2, c2 - c), ("rev", s2, o2, c2 - (copies - 1 - c)), ("neg", s2, o2, c2 + c)}
        return found

    def target(self, rule: tuple, copies: int, src: Slot) -> Slot:
        """Where ``rule`` points from ``src``: a slot, or ('out', how far beyond the run)."""
        if rule[0] == "F":
            return ("F", rule[1])
        kind, s2, o2, k = rule
        c = src[2] if src[0] == "S" else 0
        c2 = {"same": c + k, "rev": copies - 1 - c + k, "neg": k - c, "start": k, "end": copies - 1 - k}[kind]
        pos, unit = self.sites[s2]
        if 0 <= c2 < copies:
            return ("S", s2, c2, o2)
        if c2 < 0 and -c2 <= self._periods(s2, -1):
            return ("F", pos + c2 * len(unit) + o2)
        if c2 >= copies and c2 - copies < self._periods(s2, +1):
            return ("F", pos + (c2 - copies) * len(unit) + o2)
        return ("out", c2 if c2 < 0 else c2 - copies)

    def _explains(self, rule: tuple, seen: list, depths: int) -> dict[int, int] | None:
        """The fixed events ``rule`` points to beyond the run, if it explains every free seen at
        ``depths`` traced depths. The rule must point into the run (or a whole period next to it) at two
        depths: one fits it, the other checks it. A free beyond the run must release the same fixed
        event at two depths, or, with four depths or more, only at depths shallower than every one the
        rule points into the run at (a run too short to hold the copy yet; with three, that would leave
        the rule checked nowhere but where it was fitted)."""
        beyond: dict[int, int] = {}
        outside: dict[int, set[int]] = {}
        inside: set[int] = set()
        for copies, src, dst in seen:
            at = self.target(rule, copies, src)
            if at[0] != "out":
                if at != dst:
                    return None
                inside.add(copies)
            elif dst[0] != "F" or beyond.setdefault(at[1], dst[1]) != dst[1]:
                return None
            else:
                outside.setdefault(at[1], set()).add(copies)
        if rule[0] == "F":
            return beyond
        if len(inside) < 2:
            return None
        for at_depths in outside.values():
            if len(at_depths) < 2 and not (depths >= 4 and max(at_depths) < min(inside)):
                return None
        return beyond

    def infer(self, observed: dict[int, tuple[list[Token], list[int | None]]]) -> None:
        """A rule for every free of the traced sequences ({copies: (tokens, arcs)})."""
        seen: dict[tuple, list] = {}
        for copies, (tokens, arcs) in observed.items():
            layout = _layout(len(self.base), self.sites, copies)
            if len(layout) != len(tokens):
                raise NotAffine("the allocator events do not grow by the same insertions at every depth")
            for i, j in enumerate(arcs):
                if j is not None:
                    seen.setdefault(_key(layout[i]), []).append((copies, layout[i], layout[j]))
        for key, frees in seen.items():
            candidates = set().union(*(self._candidates(src, dst, copies) for copies, src, dst in frees))
            for rule in sorted(candidates, key=lambda r: (RULE_ORDER[r[0]], abs(r[-1]), str(r))):
                beyond = self._explains(rule, frees, len(observed))
                if beyond is not None:
                    self.rules[key] = (rule, beyond)
                    break
            else:
                raise NotAffine("a free in the allocator events follows no rule of the depth")

    def generate(self, grow: dict[int, int], copies: int) -> list[Event]:
        """The event sequence with ``copies`` copies of each insertion (handles: malloc positions)."""
        layout = _layout(len(self.base), self.sites, copies)
        where = {slot: i for i, slot in enumerate(layout)}
        events: list[Event] = []
        for i, slot in enumerate(layout):
            kind, nbytes = self.base[slot[1]] if slot[0] == "F" else self.sites[slot[1]][1][slot[3]]
            if kind == "m":
                events.append((i, nbytes + copies * grow.get(slot[1], 0) if slot[0] == "F" else nbytes))
                continue
            rule, beyond = self.rules[_key(slot)]
            dst = self.target(rule, copies, slot)
            if dst[0] == "out":
                if dst[1] not in beyond:
                    raise NotAffine("a free in the allocator events points beyond what the traces show")
                dst = ("F", beyond[dst[1]])
            events.append((where[dst], FREED))
        return events


def _key(slot: Slot) -> tuple:
    """A free's rule is shared by its copies: the slot without the copy."""
    return ("F", slot[1]) if slot[0] == "F" else ("S", slot[1], slot[3])


class EventExtension:
    """The repeating structure of three or more traced sequences of allocator events (one step of depth
    apart), found once (``extrapolate_events`` for one depth): ``at(steps)`` generates the sequence
    ``steps`` steps past the first. NotAffine where they do not follow one (module docstring)."""

    def __init__(self, traced: Sequence[Sequence[Event]], reorder_frees: bool = True) -> None:
        # ``reorder_frees=False``: the caller put the runs of frees in order itself (block_replay splits
        # a run where the state goes).
        traced = [in_allocation_order(events) if reorder_frees else list(events) for events in traced]
        observed = dict(enumerate(_tokens(events) for events in traced))
        self.base = observed[0][0]
        sites, self.grow = _sites(self.base, observed[1][0])
        failure = NotAffine("no allocator events")
        for placement in PLACEMENTS:
            self.rules = _Rules(self.base, _normalised(self.base, sites, self.grow, placement))
            try:
                self.rules.infer(observed)
                for copies, traced_tokens in observed.items():
                    if _tokens(self.at(copies)) != traced_tokens:
                        raise NotAffine(f"the allocator events generated {copies} steps deeper differ from the trace")
                return
            except NotAffine as err:
                failure = err
        raise failure

    def at(self, steps: int) -> list[Event]:
        return self.rules.generate(self.grow, steps)


def extrapolate_events(traced: Sequence[Sequence[Event]], steps: int) -> list[Event]:
    """The allocator events ``steps`` steps of depth past the first of three or more traced sequences
    (one step apart); NotAffine where they do not follow one repeating structure (module docstring)."""
    return EventExtension(traced).at(steps)


def without_allocator_figures(not_affine: list[str]) -> list[str]:
    """``not_affine`` less the allocator model's figures (``extra.allocator_model``): off the line in the
    shallow traces, exact once the allocator's events are replayed at the full depth."""
    return [name for name in not_affine if not name.startswith("extra.allocator_model")]


def replayed(events: Sequence[Event]) -> dict[str, int]:
    """The allocator model's figures after ``events`` (as dbprofile.measure.steps records them)."""
    alloc = CachingAllocatorModel()
    replay(alloc, list(events), {})
    return alloc.stats.figures()
