"""Training techniques: end-to-end, activation checkpointing and DiffusionBlocks, each a
``Trainer`` (``base``) that ``make_trainer`` builds from a parsed technique
(``dbprofile.techniques``)."""

from dbprofile.methods.factory import make_trainer

__all__ = ["make_trainer"]
