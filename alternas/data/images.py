"""The two ways a split holds its labelled images: ``ImageData`` (uint8 tensors in memory, the fast path) and
``ImageFiles`` (paths left on disk, decoded per sample by DataLoader workers)."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from alternas.errors import DataError


@dataclass
class ImageData:
    """A labelled image set held in memory: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor) -> ImageData:
        return ImageData(self.images[index], self.labels[index])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def load(self) -> ImageData:
        """Already in memory (``ImageFiles.load`` decodes; diagnostics call either)."""
        return self

    def samples(self, transform: Any) -> Dataset:
        """A map-style dataset of (``transform(PIL image)``, label): the reference's per-sample pipeline."""
        return _Samples(self.pil_image, self.labels, transform)

    def pil_image(self, i: int) -> Any:
        from PIL import Image

        return Image.fromarray(self.images[i].permute(1, 2, 0).numpy())

    def digest(self) -> str:
        """A short content hash of the images and labels, in order (evidence files name their split by it)."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.labels.cpu().numpy()).tobytes())
        h.update(np.ascontiguousarray(self.images.cpu().numpy()).tobytes())
        return h.hexdigest()[:16]


def decoded_bytes(count: int, image_size: int) -> int:
    """Bytes of ``count`` RGB images of ``image_size`` as uint8 tensors (the in-memory path's cost)."""
    return count * 3 * image_size**2


@dataclass
class ImageFiles:
    """A labelled image set left on disk: decoded per sample when a loader asks, so its size is bounded by the disk,
    not by memory. ``image_size`` and ``crop_pct`` say how an image is evaluated (``eval_crop``)."""

    root: str
    paths: list[str]
    labels: torch.Tensor
    image_size: int
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise DataError(f"{len(self.paths)} image files but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor) -> ImageFiles:
        return ImageFiles(self.root, [self.paths[i] for i in index.tolist()], self.labels[index], self.image_size,
                          self.crop_pct)

    def decoded_bytes(self) -> int:
        """What this set takes as in-memory uint8 tensors."""
        return decoded_bytes(len(self), self.image_size)

    def eval_crop(self, crop_pct: float | None = None) -> list[Any]:
        """Resize the shorter side to ``image_size / crop_pct`` (bicubic) and centre-crop ``image_size``: timm's and
        the paper's evaluation transform (224 px at 0.875: resize 256, crop 224); ``crop_pct`` 1 keeps the whole
        centre square, which is what the in-memory training images hold."""
        from torchvision import transforms as T

        scale = math.floor(self.image_size / (crop_pct or self.crop_pct))
        return [T.Resize(scale, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(self.image_size)]

    def samples(self, transform: Any) -> Dataset:
        return _Samples(self.pil_image, self.labels, transform)

    def pil_image(self, i: int) -> Any:
        """Image ``i`` as an RGB PIL image (torchvision's ``default_loader``)."""
        from torchvision.datasets.folder import default_loader

        path = self.paths[i]
        try:
            return default_loader(path)
        except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise DataError(f"cannot read image {path} ({type(err).__name__}); replace or remove the file") from None

    def load(self, crop_pct: float | None = None) -> ImageData:
        """Decode every image through ``eval_crop(crop_pct)`` into one uint8 tensor (DataLoader workers decode; the
        tensor is allocated first, so a set that does not fit fails at once, not after decoding)."""
        from torchvision import transforms as T

        size = self.image_size
        transform = T.Compose([*self.eval_crop(crop_pct), T.PILToTensor()])
        from alternas.data.loader import loader_workers

        workers = loader_workers(8) if len(self) >= 512 else 0  # below that, starting workers costs more
        try:
            images = torch.empty((len(self), 3, size, size), dtype=torch.uint8)
            start = 0
            for x, _ in DataLoader(self.samples(transform), batch_size=64, num_workers=workers):
                images[start : start + len(x)] = x
                start += len(x)
        except (RuntimeError, MemoryError) as err:
            if not isinstance(err, MemoryError) and "allocate" not in str(err):
                raise
            raise DataError(f"{self.root}: {len(self)} images at {size}px need "
                            f"{self.decoded_bytes() / 2**30:.2f} GiB in memory, more than this process can "
                            "allocate; stream them from disk instead (data.stream: auto or always)") from None
        return ImageData(images, self.labels.clone())

    def digest(self) -> str:
        """A short hash of what the split holds: file names (relative to the dataset root), sizes, labels and the
        evaluation crop; decoding every image only to hash it would cost an epoch."""
        h = hashlib.sha256(f"{self.image_size}:{self.crop_pct}".encode())
        h.update(np.ascontiguousarray(self.labels.cpu().numpy()).tobytes())
        for path in self.paths:
            h.update(f"{os.path.relpath(path, self.root)}:{os.path.getsize(path)}\n".encode())
        return h.hexdigest()[:16]


class _Samples(Dataset):
    """(``transform(PIL image)``, label) per index, whichever way a split holds its images (``read``)."""

    def __init__(self, read: Any, labels: torch.Tensor, transform: Any) -> None:
        self.read, self.labels, self.transform = read, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.transform(self.read(i)), int(self.labels[i])
