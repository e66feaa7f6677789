"""Built-in residual model families (ViT classifier, DiT denoiser, GPT/Llama decoder LM) and
the named presets of ``dbprofile models``. Each family is one readable module with a config
dataclass, the model and ``make_spec(config, name=...)``; ``registry`` names the presets."""

from dbprofile.models.dit import DiT, DiTConfig
from dbprofile.models.gpt import GPT, GPTConfig
from dbprofile.models.registry import (
    DEFAULT_PRESET,
    PRESETS,
    get_preset,
    preset_shape,
    preset_table,
)
from dbprofile.models.vit import ViT, ViTConfig

__all__ = [
    "DEFAULT_PRESET",
    "DiT",
    "DiTConfig",
    "GPT",
    "GPTConfig",
    "PRESETS",
    "ViT",
    "ViTConfig",
    "get_preset",
    "preset_shape",
    "preset_table",
]
