"""Dataset sources by name, offline first, with seeded stratified splits and digests.

Every source yields images as uint8 tensors [C, H, W] and integer labels. The
built-in sources (xbar.sources) come from packages (no network): they are loaded
whole, exact duplicates are dropped (and near-duplicates for Animal-MNIST) before a
stratified, seeded train/test split, so no image is in both splits. Real-scale
sources (`torchvision` by class name, `imagefolder`) stay lazy on disk.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from xbar.augment import Augmented, CentreCrop
from xbar.errors import UserError
from xbar.params import DatasetSpec
from xbar.sources import BUILTIN


@dataclass(frozen=True)
class TaskData:
    """A task's splits as the network sees them (deterministic), and `fit_train`, what training loops draw
    from: the training split with its train-time augmentation, if the dataset has one."""

    train: Dataset
    test: Dataset
    num_classes: int
    channels: int
    train_digest: str
    test_digest: str
    augmented: Dataset | None = None
    train_labels: np.ndarray | None = None  # the training split's labels, in its order

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.train_digest}:{self.test_digest}".encode()).hexdigest()[:16]

    @property
    def fit_train(self) -> Dataset:
        return self.train if self.augmented is None else self.augmented


def load_task_data(spec: DatasetSpec, seed: int) -> TaskData:
    """The train/test splits of `spec`; the same spec and seed give the same splits.

    Images are stored at `image_size`; with `crop`, the network sees the centre crop of that size
    (evaluation, and training without augmentation). `augment` draws a seeded random resized crop
    (and flip) of the whole stored image for the training loops only (`TaskData.fit_train`).
    """
    data = _stored_task_data(spec, seed)
    size = spec.crop or spec.image_size
    crop = (lambda d: CentreCrop(d, size)) if size < spec.image_size else (lambda d: d)
    augmented = Augmented(data.train, size, spec.augment, seed) if spec.augment else None
    return TaskData(crop(data.train), crop(data.test), data.num_classes, data.channels, data.train_digest,
                    data.test_digest, augmented, data.train_labels)


def _stored_task_data(spec: DatasetSpec, seed: int) -> TaskData:
    """The splits at the stored size (image_size)."""
    if spec.source in ("torchvision", "imagefolder"):
        return _lazy_task_data(spec, seed)
    images, labels = BUILTIN[spec.source](spec)
    images = _resize(images, spec.image_size, spec.channels)
    keep = _unique(images, near=spec.source == "animal_mnist")
    images, labels = images[keep], labels[keep]
    if len(np.unique(labels)) < 2:
        raise UserError(f"dataset {spec.source}: needs at least 2 classes, found {len(np.unique(labels))}")
    train_idx, test_idx = stratified_split(labels, spec.test_fraction, seed, spec.max_train)
    x, y = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    return TaskData(
        train=TensorDataset(x[train_idx], y[train_idx]),
        test=TensorDataset(x[test_idx], y[test_idx]),
        num_classes=int(labels.max()) + 1,
        channels=spec.channels,
        train_digest=content_digest(images[train_idx], labels[train_idx]),
        test_digest=content_digest(images[test_idx], labels[test_idx]),
        train_labels=labels[train_idx],
    )


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int,
                     max_train: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded permutation; the first `test_fraction` go to test.

    `max_train` caps the training split, keeping the class proportions.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    keep_share = 1.0 if max_train is None else min(1.0, max_train / (len(labels) * (1 - test_fraction)))
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        rest = idx[n_test:]
        train.append(rest[: max(1, round(len(rest) * keep_share))])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def channel_stats(data: Dataset, max_images: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of images in [0, 1], over up to `max_images` evenly spread images."""
    step = max(1, len(data) // max_images)
    x = torch.stack([data[i][0] for i in range(0, len(data), step)][:max_images]).double().div_(255.0)
    x = x.transpose(0, 1).flatten(1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).clamp_min(1e-3).tolist())


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of about n, keeping the class proportions (each class at least 1)."""
    rng = np.random.default_rng(seed)
    share = min(1.0, n / len(labels))
    keep = [rng.permutation(idx)[: max(1, round(len(idx) * share))]
            for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    return np.sort(np.concatenate(keep))


def content_digest(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels.astype(np.int64)).tobytes())
    return h.hexdigest()[:16]


def _unique(images: np.ndarray, near: bool) -> np.ndarray:
    """Indices of the first occurrence of each image (near: of each 7x7 average hash)."""
    flat = images.reshape(len(images), -1)
    if near:  # average hash: 7x7 blocks (4x4 pixels of a 28x28 image, any size), thresholded at the image mean
        n, c, h, w = images.shape
        rows, cols = (np.linspace(0, side, 8).astype(int) for side in (h, w))
        sums = np.add.reduceat(np.add.reduceat(images, rows[:-1], axis=2, dtype=np.int64), cols[:-1], axis=3)
        blocks = sums.sum(1) / (c * np.diff(rows)[:, None] * np.diff(cols)[None, :])
        flat = (blocks > blocks.mean((1, 2), keepdims=True)).reshape(n, -1)
    first: dict[bytes, int] = {}
    for i, row in enumerate(np.ascontiguousarray(flat)):
        first.setdefault(row.tobytes(), i)
    return np.fromiter(sorted(first.values()), dtype=np.int64)


def _resize(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """[N, H, W] or [N, C, H, W] uint8 -> [N, channels, size, size] uint8."""
    if images.ndim == 3:
        images = images[:, None]
    x = torch.from_numpy(images)
    if x.shape[1] != channels:
        x = x.float().mean(1, keepdim=True).round().to(torch.uint8) if channels == 1 else x.repeat(1, channels, 1, 1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x.numpy()


# --- real-scale sources (lazy) -------------------------------------------------


class _Uint8(Dataset):
    """A torchvision-style dataset as (uint8 [C, size, size], label)."""

    def __init__(self, base: Dataset, size: int, channels: int) -> None:
        from torchvision import transforms as T

        steps = [T.Resize(size), T.CenterCrop(size)]
        steps.append(T.Grayscale(1) if channels == 1 else T.Lambda(lambda im: im.convert("RGB")))
        steps.append(T.PILToTensor())
        self.base, self.transform = base, T.Compose(steps)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):  # noqa: ANN204
        try:
            image, label = self.base[i]
        except OSError as err:  # PIL: truncated or not an image (UnidentifiedImageError is an OSError)
            where = self.base.samples[i][0] if hasattr(self.base, "samples") else f"image {i}"
            raise UserError(f"{where}: unreadable image ({type(err).__name__}); remove or replace it") from None
        if isinstance(image, torch.Tensor | np.ndarray):
            from torchvision.transforms.functional import to_pil_image

            image = to_pil_image(image)
        return self.transform(image), int(label)


def _first_line(err: Exception) -> str:
    """An exception's message cut to its first line (or its type's name): fits a one-line error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _open_torchvision(cls: type, root: Path, name: str) -> Dataset:
    """`cls(root)`, or `cls(root, train=True)` for classes that need it; a failure is one line."""
    for kwargs in ({}, {"train": True}):
        try:
            return cls(str(root), **kwargs)
        except TypeError:  # the class needs (other) arguments
            continue
        except Exception as err:  # not downloaded, corrupt, ...
            raise UserError(f"dataset {name}: cannot open under {root} ({_first_line(err)})") from None
    raise UserError(f"dataset {name}: torchvision.datasets.{name} needs arguments besides root and train; "
                    "export it to an image folder and use source: imagefolder")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's
CHANNEL_SAMPLE = 20  # images per class whose channels check_dataset reads (their headers only)
COLOUR_MODES = ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV")  # PIL modes read as 3 channels; others grey


def check_links(root: Path, allowed: list[Path] | tuple[Path, ...]) -> None:
    """Every class folder and image under `root` resolves (symbolic links followed) inside one of `allowed`
    (resolved directories): a link inside a readable folder must not lead the reader elsewhere."""
    allowed = [Path(a).resolve() for a in allowed]
    for path in sorted(root.rglob("*")):
        if path.is_symlink() and not any(path.resolve().is_relative_to(a) for a in allowed):
            kind = "class folder" if path.parent == root else "image" if path.is_file() else "entry"
            raise UserError(f"dataset.root: the {kind} {path} links to {path.resolve()}, outside the directories "
                            "the server may read (the project and XBAR_DATA_DIRS)")


def check_dataset(spec: DatasetSpec, allowed: list[Path] | tuple[Path, ...] | None = None) -> None:
    """Cheap checks of a real-scale source before a run starts (the loader re-checks what it reads).

    imagefolder: the root is a directory with at least 2 class sub-directories holding images, and the
    first CHANNEL_SAMPLE images of each class have `spec.channels` channels; with `allowed`, no class folder
    or image links outside those directories (`check_links`). torchvision: the class
    exists and the root is a directory. Built-in sources need no files. A mistake raises UserError.
    """
    if spec.source == "torchvision":
        import torchvision

        if not isinstance(getattr(torchvision.datasets, spec.name or "", None), type):
            raise UserError(f"dataset.name: {spec.name!r} is not a torchvision.datasets class (e.g. CIFAR10)")
    if spec.source not in ("torchvision", "imagefolder"):
        return
    root = Path(spec.root or "data")
    if not root.is_dir():
        raise UserError(f"dataset.root: {root} is not a directory")
    if spec.source == "torchvision":
        return
    if allowed is not None:  # the server's policy: links may not lead outside the readable directories
        check_links(root, allowed)
    classes = {d: sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
               for d in sorted(root.iterdir()) if d.is_dir()}
    classes = {d: files for d, files in classes.items() if files}
    if len(classes) < 2:
        raise UserError(f"dataset.root: {root} has {len(classes)} class folder(s) with images; an image folder "
                        "needs at least 2 (one sub-directory of images per class)")
    from PIL import Image

    for files in classes.values():
        for path in files[:CHANNEL_SAMPLE]:
            try:
                with Image.open(path) as image:
                    channels = 3 if image.mode in COLOUR_MODES else 1
            except OSError as err:
                raise UserError(f"{path}: unreadable image ({_first_line(err)})") from None
            if channels != spec.channels:
                raise UserError(f"dataset.channels: {path} has {channels} channel(s) ({image.mode}), "
                                f"but the dataset declares {spec.channels}")


def _lazy_task_data(spec: DatasetSpec, seed: int) -> TaskData:
    import torchvision

    root = Path(spec.root) if spec.root else Path("data")
    if spec.source == "imagefolder":
        if not root.is_dir():
            raise UserError(f"dataset.root: {root} is not a directory (expected one sub-directory per class)")
        try:
            base = torchvision.datasets.ImageFolder(str(root))
        except (FileNotFoundError, OSError) as err:  # no class folder, or one without an image file
            raise UserError(f"dataset.root: {root}: not an image folder ({_first_line(err)})") from None
        labels = np.asarray(base.targets)
        ident = [f"{Path(p).relative_to(root)}:{Path(p).stat().st_size}:{t}" for p, t in base.samples]
    else:
        cls = getattr(torchvision.datasets, spec.name or "", None)
        if not isinstance(cls, type):
            raise UserError(f"dataset.name: {spec.name!r} is not a torchvision.datasets class")
        base = _open_torchvision(cls, root, spec.name)
        labels = next((getattr(base, a) for a in ("targets", "labels") if getattr(base, a, None) is not None), None)
        labels = np.asarray([base[i][1] for i in range(len(base))] if labels is None else labels)
        ident = [f"{spec.name}:{len(base)}", hashlib.sha256(labels.astype(np.int64).tobytes()).hexdigest()]
    if len(np.unique(labels)) < 2:
        raise UserError(f"dataset {spec.name or spec.source} at {root}: needs at least 2 classes, "
                        f"found {len(np.unique(labels))}")
    train_idx, test_idx = stratified_split(labels, spec.test_fraction, seed, spec.max_train)
    data = _Uint8(base, spec.image_size, spec.channels)

    def digest(idx: np.ndarray) -> str:
        return hashlib.sha256("\n".join(ident).encode() + idx.tobytes()).hexdigest()[:16]

    return TaskData(Subset(data, train_idx.tolist()), Subset(data, test_idx.tolist()),
                    int(labels.max()) + 1, spec.channels, digest(train_idx), digest(test_idx),
                    train_labels=labels[train_idx])
