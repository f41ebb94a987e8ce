"""Dataset registry: every dataset becomes uint8 image tensors in memory, split into train / val / test.

Names: ``cifar10``, ``cifar100`` (torchvision's download, read from the python-pickle files), ``imagefolder:PATH``
(``PATH/train`` and ``PATH/val`` with one sub-folder per class, resized to ``image_size``), and the built-in
``shapes`` / ``textures`` (see ``synthetic.py``). The validation split is carved from the training set (seeded,
class-balanced) so that searches never select on the test set.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from alternas.data import synthetic
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
BUILTIN = ("shapes", "textures")
BUILTIN_SIZES = {"train": 6000, "test": 1000}
# Geometric augmentations a recipe may apply; a dataset names those that change what its labels mean.
AUGMENTATIONS = ("hflip", "rotate", "shear")
# textures: a grating's orientation is its label, and a mirror maps θ to 180° − θ (36° <-> 144°, 72° <-> 108°);
# RandAugment's rotations (±30°) and shears blur 36° steps.
LABEL_BREAKING = {"textures": ("hflip", "rotate", "shear")}


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


@dataclass
class DataConfig:
    """Which data, and how much of it: the fidelity knobs of a search live here."""

    name: str = "shapes"
    root: str | None = None
    subset: float | None = None  # int > 1: images per training set; 0 < x <= 1: fraction (class-balanced)
    val_fraction: float = 0.1
    seed: int = 0
    image_size: int | None = None  # only for imagefolder (resize); fixed for the others
    label_breaking: tuple[str, ...] | None = None  # augmentations that change labels; None: the dataset's own

    def __post_init__(self) -> None:
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
        if self.image_size is not None and self.image_size < 8:
            raise DataError(f"image_size must be >= 8 pixels, got {self.image_size}")

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.label_breaking is not None:
            out["label_breaking"] = list(self.label_breaking)
        return out

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
    train: ImageData
    val: ImageData
    test: ImageData
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] = field(default_factory=list)
    selects_on: str = "val"  # "test" when val_fraction is 0: ``val`` is then the test split itself
    label_breaking: tuple[str, ...] = ()  # augmentations that change labels (see ``AUGMENTATIONS``)

    def allows(self, augmentation: str) -> bool:
        """Whether ``augmentation`` keeps this dataset's labels (recipes skip the ones that do not)."""
        return augmentation not in self.label_breaking

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])

    def summary(self) -> str:
        held_out = (f"{len(self.val)} val" if self.selects_on == "val" else
                    "no val (selection on the test split)")
        return (f"{self.name}: {len(self.train)} train / {held_out} / {len(self.test)} test, "
                f"{self.num_classes} classes, {self.image_size}px")


def data_root(root: str | os.PathLike | None) -> Path:
    """``--data-root``, else ``$ALTERNAS_DATA``, else the user cache folder."""
    if root:
        return Path(root).expanduser()
    if os.environ.get("ALTERNAS_DATA"):
        return Path(os.environ["ALTERNAS_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "alternas" / "data"


# -- readers -------------------------------------------------------------------------------------------------------
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


def _load_imagefolder(path: Path, image_size: int) -> tuple[ImageData, ImageData, list[str]]:
    from PIL import Image

    for split in ("train", "val"):
        if not (path / split).is_dir():
            raise DataError(f"imagefolder:{path} needs '{split}/' with one sub-folder per class; {path / split} "
                            "is missing")
    classes = sorted(d.name for d in (path / "train").iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"imagefolder:{path}: no class folders in {path / 'train'}")
    index = {c: i for i, c in enumerate(classes)}
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".gif", ".tif", ".tiff"}

    def read(split: str) -> ImageData:
        images, labels = [], []
        for cls_dir in sorted(d for d in (path / split).iterdir() if d.is_dir()):
            if cls_dir.name not in index:
                raise DataError(f"imagefolder:{path}: class '{cls_dir.name}' is in {split}/ but not in train/")
            for file in sorted(cls_dir.iterdir()):
                if file.suffix.lower() not in exts:
                    continue
                with Image.open(file) as img:
                    img = img.convert("RGB")
                    scale = image_size / min(img.size)
                    img = img.resize((max(image_size, round(img.width * scale)),
                                      max(image_size, round(img.height * scale))), Image.BICUBIC)
                    left, top = (img.width - image_size) // 2, (img.height - image_size) // 2
                    img = img.crop((left, top, left + image_size, top + image_size))
                    images.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
                labels.append(index[cls_dir.name])
        if not images:
            raise DataError(f"imagefolder:{path}: no images found under {path / split}")
        return ImageData(torch.stack(images), torch.tensor(labels, dtype=torch.int64))

    return read("train"), read("val"), classes


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


def load_data(config: DataConfig | str) -> DataSplits:
    """Load, subset and split a dataset as ``config`` says. Raises ``DataError`` with what to do on failure."""
    cfg = DataConfig(name=config) if isinstance(config, str) else config
    name = cfg.name
    if name in BUILTIN:
        train = ImageData(*synthetic.generate(name, BUILTIN_SIZES["train"], seed=1000))
        test = ImageData(*synthetic.generate(name, BUILTIN_SIZES["test"], seed=2000))
        names = list(synthetic.SHAPE_NAMES if name == "shapes" else synthetic.TEXTURE_NAMES)
        num_classes = synthetic.NUM_CLASSES
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    elif name in CIFAR_STATS:
        train, test, names = _load_cifar(name, data_root(cfg.root))
        num_classes = 10 if name == "cifar10" else 100
        mean, std = CIFAR_STATS[name]
    elif name.startswith("imagefolder:"):
        path = Path(name.split(":", 1)[1]).expanduser()
        if not path.is_dir():
            raise DataError(f"imagefolder path {path} does not exist; give --data imagefolder:PATH with PATH/train "
                            "and PATH/val")
        train, test, names = _load_imagefolder(path, cfg.image_size or 32)
        num_classes = len(names)
        mean, std = IMAGENET_STATS
    else:
        raise DataError(f"unknown dataset {name!r}; choose cifar10, cifar100, shapes, textures or imagefolder:PATH")

    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.subset is not None:
        count = int(cfg.subset) if cfg.subset > 1 else round(cfg.subset * len(train))
        keep, _ = _balanced_pick(train.labels, min(count, len(train)), gen)
        train = train.take(keep)
    val_idx, train_idx = _balanced_pick(train.labels, round(cfg.val_fraction * len(train)), gen)
    if len(val_idx) == 0:  # the paper's protocol: train on every training image, select on the test split
        return DataSplits(name, train, test, test, num_classes, mean, std, names, selects_on="test",
                          label_breaking=cfg.breaks_labels)
    return DataSplits(name, train.take(train_idx), train.take(val_idx), test, num_classes, mean, std, names,
                      label_breaking=cfg.breaks_labels)

