"""Technique names and their parsing: ``e2e``, ``ckpt``, ``ckpt:k``, ``db:B``, ``db:B+ckpt``,
``db:B+offload``, ``db:B+interleaved`` (causal LMs: the flash-attention-compatible token
layout), variants combinable. One parsed ``Technique`` is what the runner, the planner and the reports
pass around; ``make_trainer`` turns it into a ready ``Trainer``."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from dbprofile.spec import ModelSpec, SpecError

_PATTERN = re.compile(r"^(e2e|ckpt|db)(?::(\d+))?((?:\+(?:ckpt|offload|interleaved))*)$")

DEFAULT_TECHNIQUES = ("e2e", "ckpt", "db:2", "db:3", "db:4")
HELP = "e2e, ckpt, ckpt:K (K checkpointed segments), db:B, db:B+ckpt, db:B+offload, db:B+interleaved (causal LMs)"


@dataclass(frozen=True)
class Technique:
    """A parsed technique name."""

    kind: str  # "e2e" | "ckpt" | "db"
    blocks: int | None = None  # B for db
    segments: int | None = None  # k for ckpt:k (None = every layer)
    ckpt: bool = False  # db:B+ckpt
    offload: bool = False  # db:B+offload
    interleaved: bool = False  # db:B+interleaved: causal-lm tokens interleaved under the plain causal mask

    @property
    def name(self) -> str:
        if self.kind == "e2e":
            return "e2e"
        if self.kind == "ckpt":
            return "ckpt" if self.segments is None else f"ckpt:{self.segments}"
        return (
            f"db:{self.blocks}"
            + ("+ckpt" if self.ckpt else "")
            + ("+offload" if self.offload else "")
            + ("+interleaved" if self.interleaved else "")
        )

    @property
    def lm_layout(self) -> str:
        """DiffusionBlocks' causal-lm token layout: ``interleaved`` or the default ``concatenated``."""
        return "interleaved" if self.interleaved else "concatenated"

    @property
    def is_diffusion_blocks(self) -> bool:
        return self.kind == "db"

    def __str__(self) -> str:
        return self.name


def parse_technique(text: str) -> Technique:
    """Parse one technique name; raise SpecError with the accepted forms when it is wrong."""
    raw = text.strip()
    match = _PATTERN.match(raw)
    if not match:
        raise SpecError(f"Unknown technique {text!r}. Techniques are: {HELP}.")
    kind, number, suffix = match.group(1), match.group(2), match.group(3)
    extras = [s for s in suffix.split("+") if s]
    if kind != "db" and extras:
        raise SpecError(f"Unknown technique {text!r}: '+ckpt', '+offload' and '+interleaved' apply to db:B only. Techniques are: {HELP}.")
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
        "db", blocks=blocks, ckpt="ckpt" in extras, offload="offload" in extras, interleaved="interleaved" in extras
    )


def parse_techniques(texts: str | list[str] | tuple[str, ...]) -> list[Technique]:
    """Parse a comma-separated string or a list of names; duplicates are dropped in order."""
    if isinstance(texts, str):
        texts = [t for t in texts.split(",") if t.strip()]
    seen: dict[str, Technique] = {}
    for text in texts:
        tech = parse_technique(text) if not isinstance(text, Technique) else text
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
    if tech.kind == "db" and tech.blocks > num_layers:
        raise SpecError(
            f"Technique {tech.name!r} asks for B={tech.blocks} blocks but the model has {num_layers} "
            f"layers; use db:B with 1 <= B <= {num_layers}."
        )


def make_trainer(
    tech: Technique,
    spec: ModelSpec,
    device: torch.device,
    precision: str = "fp32",
    optimizer: str = "adamw",
    lr: float = 1e-3,
):
    """Build the model and wrap it for ``tech``; returns a Trainer on ``device``."""
    if tech.kind in ("e2e", "ckpt"):
        from dbprofile.methods.checkpointing import CheckpointTrainer
        from dbprofile.methods.e2e import EndToEndTrainer

        cls = EndToEndTrainer if tech.kind == "e2e" else CheckpointTrainer
        return cls.create(tech, spec, device, precision=precision, optimizer=optimizer, lr=lr)
    from dbprofile.methods.diffusion_blocks import DiffusionBlocksTrainer

    return DiffusionBlocksTrainer.create(tech, spec, device, precision=precision, optimizer=optimizer, lr=lr)
