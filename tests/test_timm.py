"""timm: models, where timm imports (it needs a torchvision built for the installed torch;
skipped otherwise). Tiny ViT built offline: every technique, fake bytes equal to real ones."""

from __future__ import annotations

import pytest

from dbprofile.loading import load_model
from dbprofile.measure.runner import run
from dbprofile.models.common import build_on_meta, count_parameters
from dbprofile.spec import SpecError

try:
    import timm  # noqa: F401
except Exception as err:  # noqa: BLE001 - a mismatched torchvision fails at import with RuntimeError
    pytest.skip(f"timm cannot be imported here ({type(err).__name__}: {err})", allow_module_level=True)

TINY = {"depth": "4", "embed_dim": "64", "num_heads": "4", "patch_size": "8", "num_classes": "10"}


def test_vit_b16_parameter_count_and_sequential_blocks():
    spec = load_model("timm:vit_base_patch16_224")
    assert spec.layers == "blocks"
    assert count_parameters(build_on_meta(spec.build)) == 86_567_656


def test_tiny_vit_measures_every_technique_and_fake_equals_real():
    spec = load_model("timm:vit_tiny_patch16_224", TINY, image_size=32)
    techniques = ["e2e", "ckpt", "db:2", "db:2+ckpt"]
    real = run(spec, techniques, [2], steps=1)
    fake = run(spec, techniques, [2], steps=1, fake=True)
    for r, f in zip(real.measurements, fake.measurements, strict=True):
        assert r.ok and f.ok, (r.technique, r.error, f.error)
        assert (r.peak_bytes, r.shares) == (f.peak_bytes, f.shares)


def test_unknown_timm_name_suggests_close_names():
    with pytest.raises(SpecError, match="Close names: vit_tiny_patch16_224"):
        load_model("timm:vit_tiny_patch16_22")
