"""Training techniques: end-to-end, activation checkpointing and DiffusionBlocks."""

from dbprofile.methods.techniques import (
    DEFAULT_TECHNIQUES,
    Technique,
    check_technique_fits,
    make_trainer,
    parse_technique,
    parse_techniques,
)

__all__ = [
    "DEFAULT_TECHNIQUES",
    "Technique",
    "check_technique_fits",
    "make_trainer",
    "parse_technique",
    "parse_techniques",
]
