"""A ViT at your own sizes, from dbprofile's built-in ViT family.

    dbprofile run examples/vit_custom.py            # the `spec` below
    dbprofile run examples/vit_custom.py:deeper     # the same width, twice the depth

Change the numbers in ``ViTConfig`` to match your model; every field is documented in
``dbprofile/models/vit.py``.
"""

from dbprofile.models import vit

# CIFAR-sized images in 8x8 = 64 patches of 4x4 pixels (+1 CLS token), 8 layers of width 192.
spec = vit.make_spec(
    vit.ViTConfig(
        image_size=32,
        patch_size=4,
        channels=3,
        num_classes=10,
        num_layers=8,
        hidden_size=192,
        num_heads=3,
    ),
    name="vit-custom",
)

# Twice as deep: activations grow with depth, so DiffusionBlocks' per-block saving grows too.
deeper = vit.make_spec(
    vit.ViTConfig(
        image_size=32,
        patch_size=4,
        channels=3,
        num_classes=10,
        num_layers=16,
        hidden_size=192,
        num_heads=3,
    ),
    name="vit-custom-deeper",
)
