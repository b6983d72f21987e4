"""The colour built-in sources (xbar.photos): one class per bundled photo, its non-overlapping tiles."""

from __future__ import annotations

import numpy as np

from xbar.data import _unique, load_task_data
from xbar.params import DatasetSpec
from xbar.photos import COLOUR_TEXTURES, PHOTOS, colour_textures, photos, tiles


def test_tiles_are_the_photo_cut_without_overlap():
    image = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    cut = tiles(image, 2)  # 2 x 3 tiles, the last row and column dropped
    assert cut.shape == (6, 3, 2, 2)
    assert np.array_equal(cut[4].transpose(1, 2, 0), image[2:4, 2:4])  # row-major: tile (1, 1)
    assert len({t.tobytes() for t in cut}) == len(cut)


def test_photos_and_colour_textures_are_rgb_with_one_class_per_photo():
    for source, names in ((photos, PHOTOS), (colour_textures, COLOUR_TEXTURES)):
        images, labels = source(DatasetSpec(source=source.__name__))
        assert images.dtype == np.uint8 and images.shape[1] == 3 and set(labels) == set(range(len(names)))
        assert min(np.bincount(labels)) >= 64
    textures, labels = colour_textures(DatasetSpec(source="colour_textures"))
    colour = textures[labels == COLOUR_TEXTURES.index("immunohistochemistry")]
    grey = textures[labels == COLOUR_TEXTURES.index("brick")]
    assert (colour[:, 0] != colour[:, 2]).any() and (grey[:, 0] == grey[:, 2]).all()  # grey photos repeated


def test_a_colour_source_splits_and_resizes_like_every_built_in():
    data = load_task_data(DatasetSpec(source="photos", channels=3, image_size=32, max_train=80), seed=0)
    assert data.num_classes == len(PHOTOS) and data.train[0][0].shape == (3, 32, 32)
    assert len(data.train) <= 80 and len(data.test) > 0


def test_the_near_duplicate_hash_takes_any_image_size():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 3, 64, 64), dtype=np.uint8)
    images[3] = images[1] // 2 * 2  # the same picture, slightly darker: a near duplicate
    assert _unique(images, near=True).tolist() == [0, 1, 2, 4, 5]
