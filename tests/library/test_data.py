"""Offline dataset sources: shapes, disjoint deterministic stratified splits, stable digests."""

import numpy as np
import pytest
import torch

from xbar.data import content_digest, load_task_data, stratified_split
from xbar.errors import UserError
from xbar.params import DatasetSpec
from xbar.sources import TEXTURE_IMAGES, TEXTURE_SIDE, TEXTURE_TILE, _NumpyOnly, _textures

SOURCES = ["mnist5k", "optdigits", "lfw_faces", "textures", "animal_mnist", "fashion_mnist"]


def _images(ds) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in range(len(ds))])


@pytest.fixture(scope="module", params=SOURCES)
def source(request):
    spec = DatasetSpec(source=request.param, max_train=3000)
    return spec, load_task_data(spec, seed=0)


def test_shapes_and_classes(source):
    spec, data = source
    x, y = data.train[0]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (1, 28, 28)
    labels = torch.stack([data.test[i][1] for i in range(len(data.test))])
    assert data.num_classes >= 2 and set(labels.tolist()) == set(range(data.num_classes))
    assert len(data.train) <= 3000


def test_no_image_in_both_splits(source):
    _, data = source
    train = {bytes(row) for row in _images(data.train).reshape(len(data.train), -1).numpy()}
    test = {bytes(row) for row in _images(data.test).reshape(len(data.test), -1).numpy()}
    assert not train & test


def test_splits_and_digests_are_deterministic(source):
    spec, data = source
    again = load_task_data(spec, seed=0)
    assert (data.train_digest, data.test_digest) == (again.train_digest, again.test_digest)
    assert torch.equal(_images(data.test), _images(again.test))
    other = load_task_data(spec, seed=1)
    assert other.test_digest != data.test_digest


def test_texture_tiles_tile_each_photo_without_overlap():
    """The tiles of one photo put back side by side are its central crop: no pixel is in two tiles,
    so no pixel can be in both splits."""
    import skimage.data

    tiles, labels = _textures(DatasetSpec(source="textures"))
    k = TEXTURE_SIDE // TEXTURE_TILE
    assert np.bincount(labels).tolist() == [k * k] * len(TEXTURE_IMAGES)
    brick = skimage.data.brick()
    top, left = (brick.shape[0] - TEXTURE_SIDE) // 2, (brick.shape[1] - TEXTURE_SIDE) // 2
    mosaic = tiles[labels == TEXTURE_IMAGES.index("brick")].reshape(k, k, TEXTURE_TILE, TEXTURE_TILE)
    mosaic = mosaic.swapaxes(1, 2).reshape(TEXTURE_SIDE, TEXTURE_SIDE)
    assert np.array_equal(mosaic, brick[top: top + TEXTURE_SIDE, left: left + TEXTURE_SIDE])


def test_stratified_split_keeps_class_shares():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    train, test = stratified_split(labels, 0.2, seed=3)
    assert not set(train) & set(test) and len(train) + len(test) == len(labels)
    assert np.bincount(labels[test]).tolist() == [20, 10, 6, 4]
    capped, _ = stratified_split(labels, 0.2, seed=3, max_train=80)
    assert abs(len(capped) - 80) <= 4 and np.bincount(labels[capped])[0] == 2 * np.bincount(labels[capped])[1]


def test_digest_sees_content_and_labels():
    images = np.zeros((3, 1, 4, 4), np.uint8)
    labels = np.array([0, 1, 0])
    base = content_digest(images, labels)
    flipped = images.copy()
    flipped[1, 0, 2, 2] = 1
    assert content_digest(flipped, labels) != base
    assert content_digest(images, np.array([0, 1, 1])) != base
    assert content_digest(images.copy(), labels.copy()) == base


def test_animal_mnist_near_duplicates_are_dropped():
    data = load_task_data(DatasetSpec(source="animal_mnist"), seed=0)
    assert len(data.train) + len(data.test) < 9716  # 9716 exact-unique images in the package


def test_restricted_unpickler_refuses_code(tmp_path):
    import io
    import pickle

    payload = pickle.dumps(print)  # a global that is not a numpy array
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _NumpyOnly(io.BytesIO(payload)).load()


def test_imagefolder_by_configuration(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    spec = DatasetSpec(source="imagefolder", root=str(tmp_path), image_size=32, channels=3, test_fraction=0.3)
    data = load_task_data(spec, seed=0)
    assert len(data.train) == 14 and len(data.test) == 6 and data.num_classes == 2
    x, y = data.train[0]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 32, 32)
    assert load_task_data(spec, seed=0).digest == data.digest


def test_missing_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        load_task_data(DatasetSpec(source="imagefolder", root=str(tmp_path / "missing")), 0)
    with pytest.raises(UserError, match="not a torchvision.datasets class"):
        load_task_data(DatasetSpec(source="torchvision", name="NoSuchSet", root=str(tmp_path)), 0)


def test_corrupt_fashion_file_is_named(tmp_path):
    from xbar.sources import FASHION_FILES

    for name in FASHION_FILES:
        (tmp_path / name).write_bytes(b"not gzip")
    with pytest.raises(UserError, match="corrupt idx file"):
        load_task_data(DatasetSpec(source="fashion_mnist", root=str(tmp_path)), 0)


def test_crop_is_the_centre_and_augmentation_is_seeded_and_train_only():
    spec = DatasetSpec(source="textures", image_size=32, crop=24, channels=3, max_train=40,
                       augment={"scale": [0.3, 1.0], "flip": True})
    data = load_task_data(spec, seed=0)
    full = load_task_data(DatasetSpec(source="textures", image_size=32, channels=3, max_train=40), seed=0)
    x, _ = data.test[0]
    assert tuple(x.shape) == (3, 24, 24) and torch.equal(x, full.test[0][0][:, 4:28, 4:28])
    assert tuple(data.train[0][0].shape) == (3, 24, 24) and data.fit_train is data.augmented
    a = _images(data.augmented)
    assert a.shape == (len(data.train), 3, 24, 24)
    assert not torch.equal(a, _images(data.train))  # random crops, not the centre
    assert torch.equal(a, _images(load_task_data(spec, seed=0).augmented))  # same seed, same crops
    assert not torch.equal(a, _images(load_task_data(spec, seed=1).augmented))
    plain = load_task_data(DatasetSpec(source="textures", image_size=32, crop=24, channels=3, max_train=40), 0)
    assert plain.augmented is None and plain.fit_train is plain.train


def test_bad_crop_and_augment_are_refused():
    with pytest.raises(ValueError, match="crop 40 is larger than the image"):
        DatasetSpec(source="optdigits", crop=40)
    with pytest.raises(ValueError, match="smallest area share comes first"):
        DatasetSpec(source="optdigits", augment={"scale": [0.9, 0.2]})


def test_channel_stats_and_the_normalization_rule():
    from xbar.data import channel_stats
    from xbar.models import imagenet_stats, input_statistics
    from xbar.params import ModelParams

    data = load_task_data(DatasetSpec(source="optdigits"), seed=0)
    x = _images(data.train).double() / 255
    mean, std = channel_stats(data.train)
    assert mean[0] == pytest.approx(float(x.mean()), rel=1e-6) and std[0] == pytest.approx(float(x.std()), rel=1e-6)
    assert input_statistics(ModelParams(), data.train, 1) == (mean, std)  # auto without weights: the source's
    assert input_statistics(ModelParams(normalize="none"), data.train, 1) == ((0.0,), (1.0,))
    assert input_statistics(ModelParams(name="resnet18", weights="w.pt"), data.train, 3) == imagenet_stats("resnet18")
    assert input_statistics(ModelParams(normalize={"mean": [0.1], "std": [0.3]}), data.train, 1) == ((0.1,), (0.3,))


def test_class_folders_and_images_linked_outside_the_allowed_directories_are_refused(tmp_path):
    """The server's policy reaches inside the folder: a class folder or an image that is a symbolic link
    leading outside the readable directories is refused, one line naming it; inside them, links are read."""
    from project import image_folder
    from xbar.data import check_dataset

    project, outside = tmp_path / "project", tmp_path / "outside"
    root = image_folder(project / "data" / "faces", ["a", "b"])
    secret = image_folder(outside / "secret", ["c"])
    spec = DatasetSpec(source="imagefolder", root=str(root))
    check_dataset(spec, [project])  # no link: read

    (root / "c").symlink_to(secret / "c", target_is_directory=True)
    with pytest.raises(UserError, match=r"^dataset\.root: the class folder .*/c links to .*outside.*XBAR_DATA_DIRS"):
        check_dataset(spec, [project])
    check_dataset(spec, [project, outside])  # outside listed (XBAR_DATA_DIRS): read
    check_dataset(spec)  # no policy (a stage run by the project's owner): read

    (root / "c").unlink()
    (root / "a" / "leak.png").symlink_to(secret / "c" / "0.png")
    with pytest.raises(UserError, match=r"^dataset\.root: the image .*leak\.png links to"):
        check_dataset(spec, [project])
