"""Dataset registry: every dataset becomes labelled images split into train / val / test.

Names: ``cifar10``, ``cifar100`` (torchvision's download, read from the python-pickle files), ``imagefolder:PATH``
(``PATH/train`` and ``PATH/val`` with one sub-folder per class, listed by torchvision's ``ImageFolder`` rules),
``fashion-mnist``, ``mnist``, ``kmnist`` (the original idx files from --data-root, Debian's ``dataset-fashion-mnist``
or torchvision's download; 28 px grey held as 32 px RGB, see ``readers._grey28_to_rgb32``), and the built-in
``shapes``, ``textures``, ``cued-shapes`` and ``brightest`` (see ``synthetic.py``); ``torch/NAME``, timm's names
for torchvision's datasets (``torchvision_sets.py``). The original file formats are read in ``readers.py``. The
validation split is carved from the training set (seeded, class-balanced) so that searches never select on the test
set.

A split is held one of two ways (``images.py``). ``ImageData``: uint8 tensors in memory (the fast path: the tensor
loader augments whole batches). ``ImageFiles``: paths left on disk and decoded per sample by DataLoader workers, for
image folders larger than ``DataConfig.max_in_memory_gb`` (``stream: auto``) or when asked (``stream: always``); the
recipe's transforms then run on the original images (RandomResizedCrop on the full picture, evaluation by resize to
``image_size / crop_pct`` and centre crop: the paper's resize-256 / crop-224).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from alternas.data import synthetic
from alternas.data.images import ImageData, ImageFiles, decoded_bytes
from alternas.data.readers import IDX_LAYOUT, channel_stats, load_cifar, load_idx
from alternas.data.torchvision_sets import FILE_SETS, TORCH_SETS, Files, canonical_name, read_torch_set
from alternas.errors import DataError

# timm has ImageNet's statistics but no CIFAR ones
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
IMAGENET_STATS = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
BUILTIN = synthetic.KINDS
BUILTIN_SIZES = {"train": 6000, "test": 1000}
BUILTIN_SEEDS = {"train": 1000, "test": 2000}
# Augmentations a recipe may apply (``Recipe.applies``); a dataset names those that change what its labels mean.
# rotate, shear, translate: RandAugment's geometric ops; photometric: its ops on pixel values (colour, contrast,
# brightness, posterize, solarize, equalize, ...); erasing: random erasing; mixing: mixup and cutmix.
AUGMENTATIONS = ("hflip", "rotate", "shear", "translate", "photometric", "erasing", "mixing")
# textures: a grating's orientation is its label, and a mirror maps θ to 180° − θ (36° <-> 144°, 72° <-> 108°);
# RandAugment's rotations (±30°) and shears blur 36° steps.
# mnist, kmnist: a mirrored digit or character is not the same class (or none at all); clothes mirror into clothes.
# brightest: the label is the hue of the brightest square, 3-14 % of full scale brighter than the others:
# per-channel and hue-dependent ops reorder them; RandAugment's translations (up to 14 px), shears (a cell at the
# bottom) and rotations (the corners) and erasing can take it out of the image; a mix of two images has another.
LABEL_BREAKING = {"textures": ("hflip", "rotate", "shear"), "mnist": ("hflip",), "kmnist": ("hflip",),
                  "brightest": ("rotate", "shear", "translate", "photometric", "erasing", "mixing"),
                  **{name: spec.label_breaking for name, spec in TORCH_SETS.items() if spec.label_breaking}}


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


@functools.lru_cache(maxsize=6)
def _generated(name: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return synthetic.generate(name, n, seed=seed)


def _builtin_split(name: str, split: str) -> ImageData:
    """A built-in split, generated once per process: generating takes 1-2 s, and a search loads its data for every
    run and again for its diagnostics. A copy, so that nothing a caller does reaches the cached tensors."""
    images, labels = _generated(name, BUILTIN_SIZES[split], BUILTIN_SEEDS[split])
    return ImageData(images.clone(), labels.clone())


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
        train, test = _builtin_split(name, "train"), _builtin_split(name, "test")
        names = list(synthetic.class_names(name))
        num_classes = len(names)
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    elif name in CIFAR_STATS:
        train, test, names = load_cifar(name, data_root(cfg.root))
        num_classes = 10 if name == "cifar10" else 100
        mean, std = CIFAR_STATS[name]
    elif name in IDX_LAYOUT:
        train, test, names = load_idx(name, data_root(cfg.root))
        num_classes = len(names)
        mean, std = channel_stats(train.images)  # of the whole training set: the same for every subset and seed
    elif cfg.reads_files:
        train, test, names = _image_files(cfg)
        num_classes = len(names)
        mean, std = IMAGENET_STATS
    elif name in TORCH_SETS:
        train, test, names = _arrays(cfg)
        num_classes = len(names)
        mean, std = channel_stats(train.images)  # of the whole training set: the same for every subset and seed
    else:
        raise DataError(f"unknown dataset {name!r}; choose cifar10, cifar100, fashion-mnist, mnist, kmnist, "
                        f"{', '.join(TORCH_SETS)}, shapes, textures, cued-shapes, "
                        "brightest or imagefolder:PATH")
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

