"""Dataset registry: every dataset becomes labelled images split into train / val / test.

Names: ``cifar10``, ``cifar100`` (torchvision's download, read from the python-pickle files), ``imagefolder:PATH``
(``PATH/train`` and ``PATH/val`` with one sub-folder per class, listed by torchvision's ``ImageFolder`` rules),
``fashion-mnist``, ``mnist``, ``kmnist`` (the original idx files from --data-root, Debian's ``dataset-fashion-mnist``
or torchvision's download; 28 px grey held as 32 px RGB, see ``_grey28_to_rgb32``), and the built-in ``shapes``,
``textures`` and ``cued-shapes`` (see ``synthetic.py``); ``torch/NAME``, timm's names for torchvision's datasets
(``torchvision_sets.py``). The validation split is carved from the training set
(seeded, class-balanced) so that searches never select on the test set.

A split is held one of two ways. ``ImageData``: uint8 tensors in memory (the fast path: the tensor loader augments
whole batches). ``ImageFiles``: paths left on disk and decoded per sample by DataLoader workers, for image folders
larger than ``DataConfig.max_in_memory_gb`` (``stream: auto``) or when asked (``stream: always``); the recipe's
transforms then run on the original images (RandomResizedCrop on the full picture, evaluation by resize to
``image_size / crop_pct`` and centre crop: the paper's resize-256 / crop-224).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import pickle
import shutil
import tempfile
import zlib
from collections.abc import Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset

from alternas.data import synthetic
from alternas.data.torchvision_sets import FILE_SETS, TORCH_SETS, Files, canonical_name, read_torch_set
from alternas.errors import DataError

# timm has ImageNet's statistics but no CIFAR ones
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
IMAGENET_STATS = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
_CIFAR_LAYOUT = {  # folder, train files, test file, label key, meta file, names key, tarball
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels",
                "batches.meta", "label_names", "cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", "meta", "fine_label_names",
                 "cifar-100-python.tar.gz"),
}
# The MNIST family: four idx files each, 28 px grey. Per name: torchvision's class (its download lands in
# ``<root>/<class>/raw``) and the class names.
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_LAYOUT = {
    "fashion-mnist": ("FashionMNIST", ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                       "Sneaker", "Bag", "Ankle boot")),
    "mnist": ("MNIST", tuple("0123456789")),
    "kmnist": ("KMNIST", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
}
# Folders a system package installs the idx files into (gzipped), searched after --data-root; and the package
IDX_SYSTEM_PATHS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
_IDX_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}
BUILTIN = synthetic.KINDS
BUILTIN_SIZES = {"train": 6000, "test": 1000}
# Geometric augmentations a recipe may apply; a dataset names those that change what its labels mean.
AUGMENTATIONS = ("hflip", "rotate", "shear")
# textures: a grating's orientation is its label, and a mirror maps θ to 180° − θ (36° <-> 144°, 72° <-> 108°);
# RandAugment's rotations (±30°) and shears blur 36° steps.
# mnist, kmnist: a mirrored digit or character is not the same class (or none at all); clothes mirror into clothes.
LABEL_BREAKING = {"textures": ("hflip", "rotate", "shear"), "mnist": ("hflip",), "kmnist": ("hflip",),
                  **{name: spec.label_breaking for name, spec in TORCH_SETS.items() if spec.label_breaking}}


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


@dataclass
class DataConfig:
    """Which data, and how much of it: the fidelity knobs of a search live here."""

    name: str = "shapes"
    root: str | None = None
    subset: float | None = None  # int > 1: images per training set; 0 < x <= 1: fraction (class-balanced)
    val_fraction: float = 0.1
    seed: int = 0
    # image folders and the torch/ sets (SVHN, STL-10 and the JPEG sets): the size images are resized to (None: 32,
    # CIFAR's, which every base and window fits); CIFAR, the MNIST family and the built-ins keep 32
    image_size: int | None = None
    label_breaking: tuple[str, ...] | None = None  # augmentations that change labels; None: the dataset's own
    # imagefolder only: evaluation resizes to image_size / crop_pct, then centre-crops (None: 0.875, the paper's)
    crop_pct: float | None = None
    # imagefolder only: stream from disk (always), decode into memory (never), or stream above max_in_memory_gb
    stream: Literal["auto", "always", "never"] = "auto"
    max_in_memory_gb: float = 4.0  # a fixed size, not the machine's free memory: every worker decides alike

    def __post_init__(self) -> None:
        self.name = canonical_name(self.name)  # torch/NAME, timm's spelling, as alternas keeps it
        if self.label_breaking is not None:
            self.label_breaking = tuple(self.label_breaking)
            unknown = sorted(set(self.label_breaking) - set(AUGMENTATIONS))
            if unknown:
                raise DataError(f"data.label_breaking: unknown augmentation {unknown[0]!r}; choose from "
                                f"{', '.join(AUGMENTATIONS)}")
        subset = self.subset
        if subset is not None and (not subset > 0 or (subset > 1 and subset != int(subset))):
            raise DataError(f"subset must be a fraction in (0, 1] or a whole number of images, got {subset}")
        if not 0 <= self.val_fraction < 1:
            raise DataError(f"val_fraction must be in [0, 1) (0: select on the test split), got {self.val_fraction}")
        if self.image_size is not None and not 8 <= self.image_size <= 4096:
            raise DataError(f"image_size must be in [8, 4096] pixels, got {self.image_size}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise DataError(f"data.crop_pct must be in (0, 1] (0.875: resize 256, crop 224), got {self.crop_pct}")
        if self.stream not in ("auto", "always", "never"):
            raise DataError(f"data.stream must be auto, always or never, got {self.stream!r}")
        if not self.max_in_memory_gb > 0:
            raise DataError(f"data.max_in_memory_gb must be > 0, got {self.max_in_memory_gb}")
        if self.stream == "always" and not self.reads_files:
            raise DataError(f"data.stream: always needs a dataset of image files (imagefolder:PATH, "
                            f"{', '.join(FILE_SETS)}); {self.name} is read into memory (use auto or never)")

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.label_breaking is not None:
            out["label_breaking"] = list(self.label_breaking)
        return out

    @property
    def is_imagefolder(self) -> bool:
        return self.name.startswith("imagefolder:")

    @property
    def files_root(self) -> Path | None:
        """Where this dataset's files live (``data_root``); None for the built-in sets, which have none."""
        return None if self.name in BUILTIN else data_root(self.root)

    @property
    def reads_files(self) -> bool:
        """Whether the images are files decoded at ``image_size`` (or streamed): an image folder or a torch/ set of
        image files."""
        return self.is_imagefolder or self.name in FILE_SETS

    @property
    def folder_image_size(self) -> int:
        """The size images of files (and in-memory sets of another size) are resized and cropped to."""
        return self.image_size or 32

    @property
    def eval_crop_pct(self) -> float:
        """The evaluation crop fraction of an image folder (CIFAR and the built-in sets are evaluated whole)."""
        return self.crop_pct if self.crop_pct is not None else 0.875 if self.reads_files else 1.0

    def streams(self) -> bool:
        """Whether the training data stays on disk: ``stream`` resolved, ``auto`` by the decoded size of what
        would be loaded (the training subset plus the test split) against ``max_in_memory_gb``."""
        if self.stream == "never" or not self.reads_files:
            return False
        if self.stream == "always":
            return True
        train, test = _file_splits(self)[:2]  # counted from the cached listing
        n_train = len(train) if self.subset is None else min(self._subset_count(len(train)), len(train))
        return decoded_bytes(n_train + len(test), self.folder_image_size) > self.max_in_memory_gb * 2**30

    def _subset_count(self, n: int) -> int:
        return int(self.subset) if self.subset > 1 else round(self.subset * n)

    @property
    def breaks_labels(self) -> tuple[str, ...]:
        """The augmentations recipes must skip on this dataset: the declared ones, else the dataset's own."""
        if self.label_breaking is not None:
            return tuple(sorted(self.label_breaking))
        return LABEL_BREAKING.get(self.name, ())


@dataclass
class DataSplits:
    """Train / val / test sets of one dataset plus what a model needs to know about it."""

    name: str
    train: ImageData | ImageFiles
    val: ImageData | ImageFiles
    test: ImageData | ImageFiles
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] = field(default_factory=list)
    selects_on: str = "val"  # "test" when val_fraction is 0: ``val`` is then the test split itself
    label_breaking: tuple[str, ...] = ()  # augmentations that change labels (see ``AUGMENTATIONS``)
    root: str | None = None  # the data root the files came from (where released corrupted sets sit beside them)

    def allows(self, augmentation: str) -> bool:
        """Whether ``augmentation`` keeps this dataset's labels (recipes skip the ones that do not)."""
        return augmentation not in self.label_breaking

    @property
    def image_size(self) -> int:
        return self.train.image_size

    @property
    def streamed(self) -> bool:
        """Whether the splits stay on disk (``ImageFiles``), decoded per sample by the loaders."""
        return isinstance(self.train, ImageFiles)

    def summary(self) -> str:
        held_out = (f"{len(self.val)} val" if self.selects_on == "val" else
                    "no val (selection on the test split)")
        where = ", streamed from disk" if self.streamed else ""
        return (f"{self.name}: {len(self.train)} train / {held_out} / {len(self.test)} test, "
                f"{self.num_classes} classes, {self.image_size}px{where}")


def data_root(root: str | os.PathLike | None) -> Path:
    """``--data-root``, else ``$ALTERNAS_DATA``, else the user cache folder."""
    if root:
        return Path(root).expanduser()
    if os.environ.get("ALTERNAS_DATA"):
        return Path(os.environ["ALTERNAS_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "alternas" / "data"


# -- readers -------------------------------------------------------------------------------------------------------
# Not torchvision's CIFAR10/CIFAR100 readers: they refuse any file whose MD5 is not the official archive's (a
# re-packed subset in the same format, as the tests write, is "corrupted") and name no missing file; the format is
# three numpy lines. Their download, which checks those MD5s, is the one used.
def _read_pickle(path: Path) -> dict:
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="latin1")  # the CIFAR distribution format is a python pickle


def _ensure_cifar(name: str, root: Path) -> Path:
    """The extracted CIFAR folder under ``root``; downloads and extracts it (torchvision) when missing."""
    folder, *_, tarball = _CIFAR_LAYOUT[name]
    target = root / folder
    if target.is_dir():
        return target
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        if os.environ.get("ALTERNAS_OFFLINE") and not (root / tarball).is_file():
            raise ConnectionError("ALTERNAS_OFFLINE is set")
        if (root / tarball).is_file():
            from torchvision.datasets.utils import extract_archive

            extract_archive(str(root / tarball), str(root))
        else:
            root.mkdir(parents=True, exist_ok=True)
            cls(str(root), train=True, download=True)
    except Exception as err:  # no network, a proxy, a full disk...: all end in the same instruction
        raise DataError(
            f"{name} is not in {root} and could not be downloaded ({type(err).__name__}: {err}); put the extracted "
            f"'{folder}/' folder or '{tarball}' in {root} (or pass --data-root / set ALTERNAS_DATA)"
        ) from None
    if not target.is_dir():
        raise DataError(f"{name}: expected the folder {target} after extracting; check the archive")
    return target


def _load_cifar(name: str, root: Path) -> tuple[ImageData, ImageData, list[str]]:
    folder = _ensure_cifar(name, root)
    _, train_files, test_file, label_key, meta_file, names_key, _ = _CIFAR_LAYOUT[name]

    def read(files: list[str]) -> ImageData:
        images, labels = [], []
        for fname in files:
            path = folder / fname
            if not path.is_file():
                raise DataError(f"{name}: missing file {path}; the '{folder.name}/' folder is incomplete")
            try:
                entry = _read_pickle(path)
                images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(entry[label_key], dtype=np.int64))
            except (KeyError, ValueError, pickle.UnpicklingError, EOFError) as err:
                raise DataError(f"{name}: {path} is not a CIFAR python batch ({err}); re-extract the archive") from None
        return ImageData(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))

    meta_path = folder / meta_file
    names = list(_read_pickle(meta_path)[names_key]) if meta_path.is_file() else []
    return read(train_files), read([test_file]), names


# Not torchvision's MNIST / FashionMNIST / KMNIST classes: their ``_check_exists`` wants their own folder layout and
# the official MD5s, and names no missing file. Their idx reader is used, and their download where no folder holds
# the files.
def _idx_folders(name: str, root: Path) -> list[Path]:
    """Where ``name``'s idx files are looked for, in order: --data-root, torchvision's download folder under it, then
    the system package's folder."""
    folders = [root, root / _IDX_LAYOUT[name][0] / "raw"]
    if name in IDX_SYSTEM_PATHS:
        folders.append(Path(IDX_SYSTEM_PATHS[name]))
    return folders


def _idx_set(folders: list[Path]) -> tuple[Path, list[Path | None]] | None:
    """The first folder holding any of the idx files, with each file's path there (plain before ``.gz``: torchvision's
    download leaves both) or None where it lacks one; one set is never mixed from two folders."""
    for folder in folders:
        paths = [next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None) for stem in IDX_FILES]
        if any(paths):
            return folder, paths
    return None


def _idx_fix(name: str, root: Path) -> str:
    put = f"put the four idx files (plain or .gz) in {root} (or pass --data-root / set ALTERNAS_DATA)"
    return f"apt-get install {_IDX_PACKAGES[name]}, or {put}" if name in _IDX_PACKAGES else put


def _ensure_idx(name: str, root: Path) -> list[Path]:
    """The four idx files of ``name`` (``IDX_FILES`` order); downloads them into ``root`` (torchvision) when no folder
    holds any."""
    folders = _idx_folders(name, root)
    searched = ", ".join(map(str, folders))
    found = _idx_set(folders)
    if found is None:
        from torchvision import datasets

        try:
            if os.environ.get("ALTERNAS_OFFLINE"):
                raise ConnectionError("ALTERNAS_OFFLINE is set")
            root.mkdir(parents=True, exist_ok=True)
            getattr(datasets, _IDX_LAYOUT[name][0])(str(root), train=True, download=True)
        except Exception as err:  # no network, a proxy, a full disk...: all end in the same instruction
            reason = " ".join(f"{type(err).__name__}: {err}".split())  # torchvision's download error spans lines
            raise DataError(f"{name}: {IDX_FILES[0]}[.gz] is in none of {searched} and could not be downloaded "
                            f"({reason}); {_idx_fix(name, root)}") from None
        found = _idx_set(folders) or (folders[1], [None] * len(IDX_FILES))
    folder, paths = found
    if None in paths:
        raise DataError(f"{name}: {IDX_FILES[paths.index(None)]}[.gz] is missing from {folder} (searched {searched}); "
                        f"{_idx_fix(name, root)}")
    return paths


def _read_idx(name: str, path: Path, reader: Any) -> torch.Tensor:
    """One idx file through torchvision's ``reader``, which opens a path: a ``.gz`` is decompressed into a temporary
    file first. Its checks are asserts (on the magic number) and numpy/torch errors; any of them is this file's."""
    try:
        if path.suffix != ".gz":
            return reader(str(path))
        with gzip.open(path, "rb") as src, tempfile.NamedTemporaryFile() as tmp:
            shutil.copyfileobj(src, tmp)
            tmp.flush()
            return reader(tmp.name)
    except (AssertionError, KeyError, ValueError, TypeError, RuntimeError, OSError, EOFError, zlib.error) as err:
        reason = "bad magic number" if isinstance(err, AssertionError) else f"{type(err).__name__}: {err}"
        raise DataError(f"{name}: {path} is not a valid idx file ({reason}); replace it with the original") from None


def _grey28_to_rgb32(images: torch.Tensor) -> torch.Tensor:
    """(N, 28, 28) grey to (N, 3, 32, 32): every base, diagnostic and the timm export take RGB at CIFAR's 32 px, so the
    grey channel is repeated and a 2 px frame of black (the background) is added; the stages then see 32/16/8/4 px
    as on CIFAR, where the window sizes fit."""
    out = torch.zeros((len(images), 3, 32, 32), dtype=torch.uint8)
    out[:, :, 2:30, 2:30] = images[:, None]
    return out


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std (0-1 scale) of uint8 images per channel, from each channel's histogram: exact, with no float copy
    of the set. Computed on the images as the model sees them (grey ones padded and held as RGB)."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].flatten(), minlength=256).double()
        n = counts.sum()
        mean = float((counts * values).sum() / n) if n else 0.5
        std = math.sqrt(max(float((counts * values**2).sum() / n) - mean**2, 0.0)) if n else 0.0
        means.append(round(mean, 4))
        stds.append(round(std, 4) or 1.0)  # 1: a blank set stays finite
    return tuple(means), tuple(stds)


def _load_idx(name: str, root: Path) -> tuple[ImageData, ImageData, list[str]]:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    train_images, train_labels, test_images, test_labels = _ensure_idx(name, root)
    num_classes = len(_IDX_LAYOUT[name][1])

    def read(images_path: Path, labels_path: Path) -> ImageData:
        images = _read_idx(name, images_path, read_image_file)
        labels = _read_idx(name, labels_path, read_label_file)
        if tuple(images.shape[1:]) != (28, 28):
            raise DataError(f"{name}: {images_path} holds {tuple(images.shape[1:])} images, not the 28x28 of the "
                            "MNIST family; replace it with the original")
        if len(images) != len(labels):
            raise DataError(f"{name}: {images_path} holds {len(images)} images but {labels_path} {len(labels)} "
                            "labels; replace them with the originals")
        if len(labels) and int(labels.max()) >= num_classes:
            raise DataError(f"{name}: {labels_path} holds label {int(labels.max())}, outside 0-{num_classes - 1}; "
                            "replace it with the original")
        return ImageData(_grey28_to_rgb32(images), labels)

    return read(train_images, train_labels), read(test_images, test_labels), list(_IDX_LAYOUT[name][1])


def _folder_path(name: str) -> Path:
    path = Path(name.split(":", 1)[1]).expanduser()
    if not path.is_dir():
        raise DataError(f"imagefolder path {path} does not exist; give --data imagefolder:PATH with PATH/train "
                        "and PATH/val")
    return path


def _list_imagefolder(path: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """(train samples, val samples, class names) of an image folder, by torchvision's ``ImageFolder`` rules (a
    class per sub-folder of ``train/``, sorted; images found recursively by extension). Listings are cached per
    folder state, so resolving ``stream: auto`` for every candidate does not walk a large folder again."""
    for split in ("train", "val"):
        if not (path / split).is_dir():
            raise DataError(f"imagefolder:{path} needs '{split}/' with one sub-folder per class; {path / split} "
                            "is missing")
    state = tuple((str(d), d.stat().st_mtime_ns) for split in ("train", "val") for d in sorted((path / split).iterdir())
                  if d.is_dir())
    return _cached_listing(path, state)


@functools.lru_cache(maxsize=8)
def _cached_listing(path: Path, state: tuple) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, index = find_classes(str(path / "train"))
    except FileNotFoundError:
        raise DataError(f"imagefolder:{path}: no class folders in {path / 'train'}") from None
    extra = sorted(d.name for d in (path / "val").iterdir() if d.is_dir() and d.name not in index)
    if extra:
        raise DataError(f"imagefolder:{path}: class '{extra[0]}' is in val/ but not in train/")
    listed = []
    for split in ("train", "val"):
        samples = make_dataset(str(path / split), index, IMG_EXTENSIONS, allow_empty=True)
        if not samples:
            raise DataError(f"imagefolder:{path}: no images found under {path / split} (extensions: "
                            f"{', '.join(IMG_EXTENSIONS)})")
        listed.append(samples)
    return listed[0], listed[1], classes


def _file_splits(cfg: DataConfig) -> tuple[Sized, Sized, list[str]]:
    """(train listing, test listing, class names) of a dataset of image files: what ``stream: auto`` counts."""
    if cfg.is_imagefolder:
        return _list_imagefolder(_folder_path(cfg.name))
    train, test, classes = read_torch_set(cfg.name, data_root(cfg.root))
    return train.paths, test.paths, classes


def _image_files(cfg: DataConfig) -> tuple[ImageFiles, ImageFiles, list[str]]:
    """An image folder's or a torch/ file set's splits as files, evaluated at ``image_size`` and ``crop_pct``."""

    def files(listed: Files) -> ImageFiles:
        return ImageFiles(str(listed.folder), listed.paths, torch.as_tensor(listed.labels, dtype=torch.int64),
                          cfg.folder_image_size, cfg.eval_crop_pct)

    if cfg.is_imagefolder:
        path = _folder_path(cfg.name)
        train, test, classes = _list_imagefolder(path)
        train, test = (Files(path, [p for p, _ in samples], np.array([c for _, c in samples], dtype=np.int64))
                       for samples in (train, test))
    else:
        train, test, classes = read_torch_set(cfg.name, data_root(cfg.root))
    return files(train), files(test), classes


def _at_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) images resized to ``size`` x ``size`` (antialiased bilinear), in chunks of bounded memory;
    unchanged when they already are that size."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = torch.empty((len(images), images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, len(images), 1024):
        chunk = images[start : start + 1024].float()
        out[start : start + 1024] = torch.nn.functional.interpolate(
            chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False).round().clamp(0, 255)
    return out


def _arrays(cfg: DataConfig) -> tuple[ImageData, ImageData, list[str]]:
    """A torch/ set decoded whole (SVHN, STL-10), at ``image_size`` (default 32)."""
    train, test, names = read_torch_set(cfg.name, data_root(cfg.root))
    return (*(ImageData(_at_size(torch.from_numpy(a.images), cfg.folder_image_size), torch.from_numpy(a.labels))
              for a in (train, test)), names)


# -- splits --------------------------------------------------------------------------------------------------------
def _balanced_pick(labels: torch.Tensor, count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (picked, rest) with ``count`` picked spread evenly over classes (seeded)."""
    classes = labels.unique()
    order = torch.randperm(len(labels), generator=gen)
    per_class = {int(c): order[labels[order] == c] for c in classes}
    picked: list[torch.Tensor] = []
    base, extra = divmod(count, len(classes))
    for i, c in enumerate(sorted(per_class)):
        want = min(base + (1 if i < extra else 0), len(per_class[c]))
        picked.append(per_class[c][:want])
    chosen = torch.cat(picked) if picked else torch.empty(0, dtype=torch.long)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[chosen] = True
    return chosen.sort().values, torch.nonzero(~mask).flatten()


def balanced_indices(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` indices spread evenly over the classes of ``labels``, seeded and sorted: a pick that a listing sorted
    by class cannot skew (the first ``count`` of an image folder's validation split may be one or two classes)."""
    return _balanced_pick(labels, count, torch.Generator().manual_seed(seed))[0]


def load_data(config: DataConfig | str) -> DataSplits:
    """Load, subset and split a dataset as ``config`` says. Raises ``DataError`` with what to do on failure."""
    cfg = DataConfig(name=config) if isinstance(config, str) else config
    name = cfg.name
    if name in BUILTIN:
        train = ImageData(*synthetic.generate(name, BUILTIN_SIZES["train"], seed=1000))
        test = ImageData(*synthetic.generate(name, BUILTIN_SIZES["test"], seed=2000))
        names = list(synthetic.TEXTURE_NAMES if name == "textures" else synthetic.SHAPE_NAMES)
        num_classes = synthetic.NUM_CLASSES
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    elif name in CIFAR_STATS:
        train, test, names = _load_cifar(name, data_root(cfg.root))
        num_classes = 10 if name == "cifar10" else 100
        mean, std = CIFAR_STATS[name]
    elif name in _IDX_LAYOUT:
        train, test, names = _load_idx(name, data_root(cfg.root))
        num_classes = len(names)
        mean, std = _channel_stats(train.images)  # of the whole training set: the same for every subset and seed
    elif cfg.reads_files:
        train, test, names = _image_files(cfg)
        num_classes = len(names)
        mean, std = IMAGENET_STATS
    elif name in TORCH_SETS:
        train, test, names = _arrays(cfg)
        num_classes = len(names)
        mean, std = _channel_stats(train.images)  # of the whole training set: the same for every subset and seed
    else:
        raise DataError(f"unknown dataset {name!r}; choose cifar10, cifar100, fashion-mnist, mnist, kmnist, "
                        f"{', '.join(TORCH_SETS)}, shapes, textures, cued-shapes "
                        "or imagefolder:PATH")
    for split, held in (("training", train), ("test", test)):
        outside = held.labels[(held.labels < 0) | (held.labels >= num_classes)]
        if len(outside):
            raise DataError(f"{name}: the {split} split has label {int(outside[0])} outside 0-{num_classes - 1} "
                            f"({num_classes} classes); replace the dataset's files with the released ones")

    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.subset is not None:
        keep, _ = _balanced_pick(train.labels, min(cfg._subset_count(len(train)), len(train)), gen)
        train = train.take(keep)
    val_idx, train_idx = _balanced_pick(train.labels, round(cfg.val_fraction * len(train)), gen)
    selects_on = "val" if len(val_idx) else "test"  # no val: the paper's protocol, select on the test split
    train, val = (train.take(train_idx), train.take(val_idx)) if len(val_idx) else (train, test)
    if isinstance(train, ImageFiles) and not cfg.streams():
        # training images keep their whole centre square (the recipe's crops cut from it); evaluation crops
        train, test = train.load(crop_pct=1.0), test.load()
        val = val.load() if selects_on == "val" else test
    return DataSplits(name, train, val, test, num_classes, mean, std, names, selects_on=selects_on,
                      label_breaking=cfg.breaks_labels, root=None if cfg.files_root is None else str(cfg.files_root))

