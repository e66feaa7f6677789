"""The verdict's data: the decision, its headline, the reasons (rules that fired, with their
numbers) and the technique to train with. The rules that produce it are in dbprofile.verdict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dbprofile.vocabulary import Decision


@dataclass(kw_only=True)
class Reason:
    """One rule that fired: its name, the sentence shown to people, and the numbers in it."""

    rule: str
    sentence: str
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class Verdict:
    """The decision, a one-sentence headline, the reasons behind it, and what to train with."""

    decision: Decision
    """adopt | not-worth-it | not-needed | inconclusive."""
    headline: str
    reasons: list[Reason] = field(default_factory=list)
    best_technique: str | None = None
    """The DiffusionBlocks configuration the rules compared (None when there is none)."""
    recommended: str | None = None
    """The technique to train with: the adopted DiffusionBlocks configuration, or the alternative
    (ckpt, e2e); None when nothing fits as asked."""
    recommended_micro_batch: int | None = None
    """The micro-batch to train ``recommended`` with (the batch itself when no accumulation is needed)."""
    recommended_accumulation_steps: int | None = None
    """Micro-batches per optimizer step for ``recommended`` (1: no gradient accumulation)."""
    batch_size: int | None = None
    """The batch size judged (a run's largest batch size with an e2e measurement; a plan's)."""
    capacity_bytes: int | None = None
    """The capacity the fit rules used (None: no target known)."""

    def __str__(self) -> str:
        return "\n".join([self.headline] + [f"- {r.sentence}" for r in self.reasons])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        """From a result file's JSON: the reasons back as ``Reason`` objects."""
        data = dict(data)
        data["reasons"] = [Reason(**r) for r in data.get("reasons", [])]
        return cls(**data)
