"""Colour built-in sources (xbar.sources): tiles of the photos that scikit-image, scikit-learn and matplotlib ship.

Each class is one photo; its images are the photo's non-overlapping square tiles, so a tile-level split
puts no pixel in both splits (as `textures`). Grey photos are repeated over the three channels.

* `photos`: 8 natural colour photos (a cat, a coffee cup, a rocket, a motorcycle, an astronaut, a Chinese
  temple, a flower, Grace Hopper), each scaled to a shorter side of PHOTO_SIDE pixels, PHOTO_TILE-pixel
  tiles: objects and scenes, the kind of image ImageNet holds (the RGB benchmark's source).
* `colour_textures`: 7 texture photos (stained tissue, a retina, a star field -- in colour -- and brick,
  grass, gravel, the lunar surface), TEXTURE_TILE-pixel tiles of each one's central TEXTURE_SIDE pixels at
  native resolution: frame-filling texture, far from ImageNet's objects.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from xbar.errors import UserError
from xbar.params import DatasetSpec

PHOTOS = ("chelsea", "coffee", "rocket", "stereo_motorcycle", "astronaut", "china", "flower", "grace_hopper")
PHOTO_SIDE, PHOTO_TILE = 384, 48  # 8 tiles across the shorter side: 64 to 96 tiles a photo
COLOUR_TEXTURES = ("immunohistochemistry", "retina", "hubble_deep_field", "brick", "grass", "gravel", "moon")
TEXTURE_SIDE, TEXTURE_TILE = 512, 32  # 16 x 16 tiles a photo


def photo(name: str) -> np.ndarray:
    """A bundled photo as uint8 [H, W, 3]: scikit-image's by name, scikit-learn's china / flower,
    matplotlib's grace_hopper."""
    try:
        if name in ("china", "flower"):
            from sklearn.datasets import load_sample_image

            image = load_sample_image(f"{name}.jpg")
        elif name == "grace_hopper":
            from matplotlib.cbook import get_sample_data
            from PIL import Image

            with get_sample_data("grace_hopper.jpg") as f:
                image = np.asarray(Image.open(f).convert("RGB"))
        else:
            import skimage.data

            image = getattr(skimage.data, name)()
            image = image[0] if name == "stereo_motorcycle" else image  # (left, right, disparity)
    except ImportError as err:
        raise UserError(f"dataset needs the package {err.name!r}, which is missing: pip install xbar's "
                        "dependencies (scikit-image, scikit-learn, matplotlib)") from None
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def tiles(image: np.ndarray, tile: int) -> np.ndarray:
    """Non-overlapping tile x tile tiles of [H, W, 3], row-major, as [N, 3, tile, tile] (the remainder dropped)."""
    rows, cols = image.shape[0] // tile, image.shape[1] // tile
    grid = image[: rows * tile, : cols * tile].reshape(rows, tile, cols, tile, 3)
    return np.ascontiguousarray(grid.transpose(0, 2, 4, 1, 3).reshape(-1, 3, tile, tile))


def _scaled(image: np.ndarray, side: int) -> np.ndarray:
    """The photo scaled (antialiased) so that its shorter side is `side` pixels."""
    h, w = image.shape[:2]
    size = (round(h * side / min(h, w)), round(w * side / min(h, w)))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _labelled(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.concatenate([np.full(len(p), label, dtype=np.int64) for label, p in enumerate(parts)])
    return np.concatenate(parts), labels


def photos(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """Which of 8 natural photos a tile comes from (module doc)."""
    return _labelled([tiles(_scaled(photo(n), PHOTO_SIDE), PHOTO_TILE) for n in PHOTOS])


def colour_textures(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """Which of 7 texture photos a tile comes from (module doc)."""
    parts = []
    for name in COLOUR_TEXTURES:
        image = photo(name)
        top, left = ((np.array(image.shape[:2]) - TEXTURE_SIDE) // 2).tolist()
        parts.append(tiles(image[top: top + TEXTURE_SIDE, left: left + TEXTURE_SIDE], TEXTURE_TILE))
    return _labelled(parts)
