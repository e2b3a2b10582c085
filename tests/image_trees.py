"""Tiny image-folder trees of generated JPEGs for the imagefolder/imagenet tests."""

from pathlib import Path

import torch
from torchvision.io import encode_jpeg


def write_jpeg_tree(
    root: Path, classes=("cat", "dog"), per_class: int = 3, val_per_class: int = 2, size: tuple[int, int] = (40, 48)
) -> Path:
    """``root/{train,val}/<class>/<i>.JPEG``: per class a flat colour plus noise, ``size`` (H, W), seeded."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            colour = torch.tensor([60 + 120 * (k % 2), 60 + 60 * (k % 3), 200 - 100 * (k % 2)]).view(3, 1, 1)
            for i in range(count):
                noise = torch.randint(-30, 31, (3, *size), generator=generator)
                image = (colour + noise).clamp(0, 255).to(torch.uint8)
                (folder / f"{i}.JPEG").write_bytes(encode_jpeg(image, quality=90).numpy().tobytes())
    return root
