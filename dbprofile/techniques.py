"""Technique names and their one parser: ``e2e``, ``ckpt``, ``ckpt:k``, ``sac`` / ``sac:alt``
(selective activation checkpointing), ``offload`` (activation offloading to host memory),
``db:B``, ``db:B+ckpt``, ``db:B+offload``, ``db:B+interleaved`` (causal LMs: the
flash-attention-compatible token layout), variants combinable, and ``db:B+parallel`` (one block
per device). One parsed
``Technique`` is what the runner, the planner, the distributed measurement, the verdict and
the reports pass around; ``dbprofile.methods.make_trainer`` turns it into a ready trainer.
This module is a leaf: it imports nothing of dbprofile but the error type."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

from dbprofile.spec import SpecError

_PATTERN = re.compile(r"^(e2e|ckpt|db)(?::(\d+))?((?:\+(?:ckpt|offload|interleaved|parallel))*)$")
_SAC_PATTERN = re.compile(r"^sac(?::([A-Za-z0-9_-]*))?$")

SAC_POLICIES = {
    "all": "save the outputs of every matmul, attention and convolution op; recompute the rest",
    "alt": "the same, but recompute every second matmul (torchtitan's op-level policy)",
}
"""Selective checkpointing policies (dbprofile.methods.selective has the op lists): ``sac`` is
``sac:all``, ``sac:alt`` the alternating one."""

PARALLEL_SUFFIX = "+parallel"

DEFAULT_TECHNIQUES = ("e2e", "ckpt", "db:2", "db:3", "db:4")
PLAN_DEFAULT_TECHNIQUES = ("e2e", "ckpt", "sac", "offload", "db:2", "db:3", "db:4")
"""A plan's verdict weighs DiffusionBlocks against what a team runs first, so a plan adds selective
checkpointing and activation offloading (fake runs cost seconds); a CPU run keeps the shorter list."""
HELP = (
    "e2e, ckpt, ckpt:K (K checkpointed segments), sac, sac:alt (selective checkpointing), offload (activations to "
    "host memory), db:B, db:B+ckpt, db:B+offload, db:B+interleaved (causal LMs), db:B+parallel (one block per device)"
)


@dataclass(frozen=True)
class Technique:
    """A parsed technique name."""

    kind: str  # "e2e" | "ckpt" | "sac" | "offload" | "db"
    blocks: int | None = None  # B for db
    segments: int | None = None  # k for ckpt:k (None = every layer)
    ckpt: bool = False  # db:B+ckpt
    offload: bool = False  # db:B+offload
    interleaved: bool = False  # db:B+interleaved: causal-lm tokens interleaved under the plain causal mask
    parallel: bool = False  # db:B+parallel: one block per device (B devices)
    policy: str | None = None  # sac: the SAC_POLICIES key ("all" for plain sac)

    @property
    def name(self) -> str:
        if self.kind == "e2e":
            return "e2e"
        if self.kind == "ckpt":
            return "ckpt" if self.segments is None else f"ckpt:{self.segments}"
        if self.kind == "sac":
            return "sac" if self.policy in (None, "all") else f"sac:{self.policy}"
        if self.kind == "offload":
            return "offload"
        return (
            f"db:{self.blocks}"
            + ("+ckpt" if self.ckpt else "")
            + ("+offload" if self.offload else "")
            + ("+interleaved" if self.interleaved else "")
            + (PARALLEL_SUFFIX if self.parallel else "")
        )

    @property
    def variants(self) -> list[str]:
        """The ``+`` variants in the name's order, e.g. ``['ckpt']`` for db:4+ckpt."""
        return self.name.split("+")[1:]

    def on_one_device(self) -> Technique:
        """The same technique without ``+parallel``: what each device of a block-parallel run trains."""
        return dataclasses.replace(self, parallel=False)

    @property
    def lm_layout(self) -> str:
        """DiffusionBlocks' causal-lm token layout: ``interleaved`` or the default ``concatenated``."""
        return "interleaved" if self.interleaved else "concatenated"

    @property
    def is_diffusion_blocks(self) -> bool:
        return self.kind == "db"

    @property
    def recomputes(self) -> bool:
        """Recomputes (part of) the forward in the backward: ckpt, sac, db:B+ckpt."""
        return self.kind in ("ckpt", "sac") or self.ckpt

    def __str__(self) -> str:
        return self.name


def parse_technique(text: str | Technique) -> Technique:
    """Parse one technique name (a parsed one passes through); raise SpecError with the accepted
    forms when it is wrong."""
    if isinstance(text, Technique):
        return text
    if not isinstance(text, str):
        raise SpecError(f"A technique is a name such as 'e2e' or 'db:4'; got {type(text).__name__} {text!r}.")
    raw = text.strip()
    if raw == "offload":
        return Technique("offload")
    if raw.startswith("sac"):
        return _parse_sac(raw, text)
    match = _PATTERN.match(raw)
    if not match:
        raise SpecError(f"Unknown technique {text!r}. Techniques are: {HELP}.")
    kind, number, suffix = match.group(1), match.group(2), match.group(3)
    extras = [s for s in suffix.split("+") if s]
    if "parallel" in extras and (kind != "db" or "ckpt" in extras or "offload" in extras):
        raise SpecError(
            f"Technique {raw!r}: '+parallel' (one DiffusionBlocks block per device) applies to plain db:B only, "
            "e.g. db:4+parallel on 4 devices (under torchrun, 4 processes)."
        )
    if kind != "db" and extras:
        raise SpecError(
            f"Unknown technique {text!r}: '+ckpt', '+offload' and '+interleaved' apply to db:B only. Techniques are: {HELP}."
        )
    if len(set(extras)) != len(extras):
        raise SpecError(f"Technique {text!r} repeats a variant.")
    if kind == "e2e":
        if number is not None:
            raise SpecError(f"Unknown technique {text!r}: e2e takes no number. Techniques are: {HELP}.")
        return Technique("e2e")
    if kind == "ckpt":
        if number is not None and int(number) < 1:
            raise SpecError(f"Technique {text!r}: ckpt:K needs K >= 1 segments.")
        return Technique("ckpt", segments=int(number) if number is not None else None)
    if number is None:
        raise SpecError(f"Technique {text!r} needs a block count: db:B, e.g. db:4.")
    blocks = int(number)
    if blocks < 1:
        raise SpecError(f"Technique {text!r}: DiffusionBlocks needs B >= 1 blocks.")
    return Technique(
        "db",
        blocks=blocks,
        ckpt="ckpt" in extras,
        offload="offload" in extras,
        interleaved="interleaved" in extras,
        parallel="parallel" in extras,
    )


def _parse_sac(raw: str, text: str) -> Technique:
    match = _SAC_PATTERN.match(raw)
    policy = match.group(1) if match else None
    if match is None or (policy is not None and policy not in SAC_POLICIES):
        known = "; ".join(f"sac:{name}: {what}" for name, what in SAC_POLICIES.items())
        raise SpecError(
            f"Unknown selective checkpointing technique {text!r}. Policies: {known} (plain sac is sac:all). "
            f"Techniques are: {HELP}."
        )
    return Technique("sac", policy=policy or "all")


def parse_techniques(texts: str | Sequence[str | Technique]) -> list[Technique]:
    """Parse a comma-separated string or a list of names; duplicates are dropped in order."""
    if isinstance(texts, str):
        texts = [t for t in texts.split(",") if t.strip()]
    elif not isinstance(texts, Sequence):
        raise SpecError(f"Techniques are a list of names or one comma-separated string; got {texts!r}.")
    seen: dict[str, Technique] = {}
    for text in texts:
        tech = parse_technique(text)
        seen.setdefault(tech.name, tech)
    if not seen:
        raise SpecError(f"No technique given. Techniques are: {HELP}.")
    return list(seen.values())


def check_technique_fits(tech: Technique, num_layers: int) -> None:
    """Layer-count checks that need the model: ckpt:k and db:B cannot exceed the layers."""
    if tech.kind == "ckpt" and tech.segments is not None and tech.segments > num_layers:
        raise SpecError(
            f"Technique {tech.name!r} asks for {tech.segments} checkpointed segments but the model has "
            f"{num_layers} layers; use ckpt:K with 1 <= K <= {num_layers}."
        )
    if tech.kind == "db" and tech.blocks is not None and tech.blocks > num_layers:
        raise SpecError(
            f"Technique {tech.name!r} asks for B={tech.blocks} blocks but the model has {num_layers} "
            f"layers; use db:B with 1 <= B <= {num_layers}."
        )
