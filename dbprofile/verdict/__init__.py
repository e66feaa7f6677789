"""Adoption rules: should this team train with DiffusionBlocks, and if so with how many blocks?

``judge`` reads a measured ``RunResult`` or a predicted ``Plan`` the same way (one row per
technique: status, tracked peak and its shares, the device memory it needs, training FLOPs
per sample, measured times, extra parameters) together with the team's situation (training
from scratch or keeping an end-to-end checkpoint; how many devices) and applies a small rule
set whose thresholds are the module constants below (docs/verdict.md gives each one's
source). Each rule that fires adds a ``Reason``: a sentence with its numbers, the numbers
themselves, and the rule's name. The decision is one of

- ``not-needed``: end-to-end training fits the target with headroom;
- ``adopt``: training from scratch, e2e does not fit (or only without headroom), a
  DiffusionBlocks configuration of acceptable quality risk fits, and it trains a sample with
  at least COMPUTE_MARGIN fewer FLOPs than checkpointing (or checkpointing does not fit);
- ``not-worth-it``: the team must keep a checkpoint, the peak is state plain DiffusionBlocks
  keeps resident, no DiffusionBlocks configuration fits, the fitting ones carry high quality
  risk, or checkpointing trains a sample as cheaply (the head and, for language models, the
  doubled sequence make DiffusionBlocks' FLOPs per sample larger);
- ``inconclusive``: too little was measured (every run failed, or no DiffusionBlocks run).

``recommended`` names the technique to train with (a DiffusionBlocks configuration, ckpt or
e2e), or None when nothing fits as asked. The quality figures are the paper's block-count
ablations (METHOD.md), the only evidence about quality dbprofile has.
"""

from dbprofile.verdict.decide import judge, judge_into
from dbprofile.verdict.reasons import quality_risk, ratio_is_clear
from dbprofile.verdict.thresholds import (
    ACTIVATION_BOUND_SHARE,
    COMPUTE_MARGIN,
    HIGH_RISK_MIN_BLOCKS,
    LOW_RISK_MAX_BLOCKS,
    MAX_RATIO_NOISE,
    MIN_SAVING_FRACTION,
    NOT_NEEDED_HEADROOM,
    STATE_BOUND_SHARE,
)

__all__ = [
    "ACTIVATION_BOUND_SHARE",
    "COMPUTE_MARGIN",
    "HIGH_RISK_MIN_BLOCKS",
    "LOW_RISK_MAX_BLOCKS",
    "MAX_RATIO_NOISE",
    "MIN_SAVING_FRACTION",
    "NOT_NEEDED_HEADROOM",
    "STATE_BOUND_SHARE",
    "judge",
    "judge_into",
    "quality_risk",
    "ratio_is_clear",
]
