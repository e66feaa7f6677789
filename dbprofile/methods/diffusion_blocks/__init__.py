"""DiffusionBlocks (METHOD.md): block-wise training of a residual network, each block a
denoiser for one range of noise levels. ``schedule`` holds the partition and weightings (EDM's formulas are in ``dbprofile.edm``), ``conditioning`` the
sigma embedder and AdaLN-Zero wrappers, ``blockwise`` the block-wise model, ``trainer`` the
training step, ``sampler`` the Euler chain and ``activations`` the saved-bytes check."""

from dbprofile.methods.diffusion_blocks.blockwise import BlockwiseModel
from dbprofile.methods.diffusion_blocks.sampler import predict_classes, sample
from dbprofile.methods.diffusion_blocks.schedule import (
    DEFAULT_GAMMA,
    DEFAULT_WEIGHTING,
    WEIGHTINGS,
    block_ranges,
    equiprobable_boundaries,
    inference_sigmas,
    noise_ranges,
    uniform_log_boundaries,
    weighted_loss,
)
from dbprofile.methods.diffusion_blocks.trainer import (
    DiffusionBlocksTrainer,
    OffloadDiffusionBlocksTrainer,
)

__all__ = [
    "BlockwiseModel",
    "DEFAULT_GAMMA",
    "DEFAULT_WEIGHTING",
    "DiffusionBlocksTrainer",
    "OffloadDiffusionBlocksTrainer",
    "WEIGHTINGS",
    "block_ranges",
    "equiprobable_boundaries",
    "inference_sigmas",
    "noise_ranges",
    "predict_classes",
    "sample",
    "uniform_log_boundaries",
    "weighted_loss",
]
