"""What the network sees of a stored image: its centre crop, and the seeded train-time augmentation.

Kept apart from xbar.data, which holds the sources and splits: these wrap any split at read time.
xbar.runtime finds `Augmented.draw` (through `base` and `draw`) and runs it in the main process.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset


class CentreCrop(Dataset):
    """The centre `size` x `size` pixels of each image of `base`."""

    def __init__(self, base: Dataset, size: int) -> None:
        self.base, self.size = base, size

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.base[i]
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        return x[..., top: top + self.size, left: left + self.size], y


class Augmented(Dataset):
    """A random resized crop to `size` (area share in augment.scale, aspect ratio 3/4..4/3, as
    torchvision's RandomResizedCrop) and a horizontal flip, drawn from a generator seeded once: the
    same seed and order of reads give the same images."""

    def __init__(self, base: Dataset, size: int, augment, seed: int) -> None:  # noqa: ANN001 (params.Augment)
        self.base, self.size, self.augment = base, size, augment
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.base)

    def _box(self, h: int, w: int) -> tuple[int, int, int, int]:
        g, (lo, hi) = self.generator, self.augment.scale
        for _ in range(10):
            area = h * w * (lo + (hi - lo) * float(torch.rand((), generator=g)))
            ratio = float(torch.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand((), generator=g)))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (), generator=g))
                left = int(torch.randint(0, w - cw + 1, (), generator=g))
                return top, left, ch, cw
        side = min(h, w)
        return (h - side) // 2, (w - side) // 2, side, side

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.base[i]
        return self.draw(x), y

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        """The next seeded crop and flip of image `x` (DataLoader workers leave this to the main process,
        in read order: xbar.runtime)."""
        from torchvision.transforms.v2 import functional as TF

        top, left, h, w = self._box(*x.shape[-2:])
        x = TF.resized_crop(x, top, left, h, w, [self.size, self.size], antialias=True)
        if self.augment.flip and bool(torch.rand((), generator=self.generator) < 0.5):
            x = x.flip(-1)
        return x
