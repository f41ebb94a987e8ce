"""torchvision's classification datasets by timm's ``torch/`` prefix (``torch/NAME``), read from their released files.

timm names torchvision's datasets ``torch/NAME`` (``timm.data.create_dataset("torch/cifar10")``); alternas takes
that prefix for the sets timm names (cifar10, cifar100, mnist, kmnist, fashion_mnist) and extends it to more of
torchvision's classification sets whose files a machine can hold locally. They are read here from the layout
torchvision's own download leaves under the data root,
so a folder torchvision filled works as it is, and torchvision downloads them where none is present (and a network
is). torchvision's classes themselves are not used to read: they refuse any file whose MD5 is not the official
release's (a re-packed subset in the same format, as the tests write, is "corrupted") and name no missing file.

Two kinds of set come back: arrays decoded whole into memory (SVHN's ``.mat``, STL-10's binary) and lists of image
files with labels (Flowers-102, DTD, Oxford-IIIT Pet, Food-101), which ``datasets.py`` decodes at ``image_size`` or
streams from disk like an image folder. The CIFAR and MNIST families keep their own readers in ``datasets.py``;
their ``torch/`` names are aliases of the short names, which stay canonical (they are in cache keys and tables).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alternas.errors import DataError

# timm's spelling (lower case, underscores) -> the name alternas keeps in configs and cache keys
TORCH_NAMES = {
    "cifar10": "cifar10", "cifar100": "cifar100", "mnist": "mnist", "kmnist": "kmnist",
    "fashion_mnist": "fashion-mnist", "svhn": "torch/svhn", "stl10": "torch/stl10", "flowers102": "torch/flowers102",
    "dtd": "torch/dtd", "oxford_iiit_pet": "torch/oxford_iiit_pet", "food101": "torch/food101",
}


def canonical_name(name: str) -> str:
    """``torch/NAME`` (any case, ``-`` or ``_``) as alternas names it; any other name unchanged."""
    if not name.lower().startswith("torch/"):
        return name
    key = name[len("torch/"):].lower().replace("-", "_")
    if key not in TORCH_NAMES:
        raise DataError(f"unknown dataset {name!r}: alternas reads torch/{', torch/'.join(TORCH_NAMES)} from local "
                        "files (or imagefolder:PATH for any other image set)")
    return TORCH_NAMES[key]


@dataclass
class Arrays:
    """A split decoded whole: uint8 images (N, 3, H, W) and int64 labels."""

    images: np.ndarray
    labels: np.ndarray


@dataclass
class Files:
    """A split left as image files: absolute paths and int64 labels."""

    folder: Path
    paths: list[str]
    labels: np.ndarray


@dataclass(frozen=True)
class TorchSet:
    """One torchvision dataset: the files its reader needs (relative to the data root, the layout of torchvision's
    download), how to read them, and how torchvision downloads it."""

    torchvision_class: str
    needs: tuple[str, ...]
    read: Callable[[Path], tuple[Arrays | Files, Arrays | Files, list[str]]]
    downloads: tuple[dict, ...] = ({},)  # keyword arguments of each torchvision download call
    label_breaking: tuple[str, ...] = ()


def _bad(name: str, path: Path, what: str) -> DataError:
    return DataError(f"{name}: {path} is not {what}; replace it with the released file")


# -- arrays ----------------------------------------------------------------------------------------------------------
def _read_svhn(root: Path) -> tuple[Arrays, Arrays, list[str]]:
    from scipy.io import loadmat  # what torchvision's SVHN reads with
    from scipy.io.matlab import MatReadError

    def read(file: str) -> Arrays:
        path = root / file
        try:
            mat = loadmat(path)
            images = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1)), dtype=np.uint8)  # HWCN -> NCHW
            labels = mat["y"].astype(np.int64).reshape(-1) % 10  # the release labels digit 0 as 10
        except (KeyError, ValueError, TypeError, OSError, NotImplementedError, MatReadError) as err:
            raise _bad("torch/svhn", path, f"an SVHN .mat file ({type(err).__name__}: {err})") from None
        if images.shape[1:] != (3, 32, 32) or len(images) != len(labels):
            raise _bad("torch/svhn", path, f"an SVHN .mat file (X of {mat['X'].shape}, y of {mat['y'].shape})")
        return Arrays(images, labels)

    return read("train_32x32.mat"), read("test_32x32.mat"), [str(d) for d in range(10)]


_STL10_FOLDER = "stl10_binary"


def _read_stl10(root: Path) -> tuple[Arrays, Arrays, list[str]]:
    folder = root / _STL10_FOLDER

    def read(split: str) -> Arrays:
        images_path, labels_path = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
        raw = np.fromfile(images_path, dtype=np.uint8)
        if raw.size % (3 * 96 * 96):
            raise _bad("torch/stl10", images_path, f"STL-10's binary ({raw.size} bytes, not a multiple of 3x96x96)")
        images = np.ascontiguousarray(raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2))  # stored column-major
        labels = np.fromfile(labels_path, dtype=np.uint8).astype(np.int64) - 1  # 1-10 in the release
        if len(labels) != len(images) or (len(labels) and not 0 <= labels.min() <= labels.max() <= 9):
            raise _bad("torch/stl10", labels_path, f"STL-10's labels for {len(images)} images (1-10, one byte each)")
        return Arrays(images, labels)

    names_path = folder / "class_names.txt"
    names = names_path.read_text().split() if names_path.is_file() else [str(c) for c in range(10)]
    return read("train"), read("test"), names


# -- image files ---------------------------------------------------------------------------------------------------
def _listed(name: str, folder: Path, pairs: list[tuple[str, int]]) -> Files:
    """A split of (image path under ``folder``, label) pairs, when every listed image exists; else one line naming the
    first missing one."""
    paths = [str(folder / relative) for relative, _ in pairs]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{name}: {len(missing)} listed image(s) missing, e.g. {missing[0]}; the dataset in "
                        f"{folder} is incomplete (extract the whole archive)")
    return Files(folder, paths, np.array([label for _, label in pairs], dtype=np.int64))


def _read_flowers102(root: Path) -> tuple[Files, Files, list[str]]:
    from scipy.io import loadmat  # what torchvision's Flowers102 reads its labels with
    from scipy.io.matlab import MatReadError

    folder = root / "flowers-102"
    try:
        labels = np.asarray(loadmat(folder / "imagelabels.mat", squeeze_me=True)["labels"], dtype=np.int64) - 1
        sets = loadmat(folder / "setid.mat", squeeze_me=True)
        ids = {split: np.atleast_1d(sets[key]).astype(np.int64) for split, key in
               (("train", "trnid"), ("val", "valid"), ("test", "tstid"))}
    except (KeyError, ValueError, TypeError, OSError, MatReadError) as err:
        raise DataError(f"torch/flowers102: {folder} holds no valid imagelabels.mat / setid.mat ({err}); replace "
                        "them with the released files") from None

    def files(image_ids: np.ndarray) -> Files:
        if len(image_ids) and not 1 <= image_ids.min() <= image_ids.max() <= len(labels):
            raise _bad("torch/flowers102", folder / "setid.mat", f"Flowers-102's split ids (1-{len(labels)})")
        return _listed("torch/flowers102", folder, [(f"jpg/image_{i:05d}.jpg", int(labels[i - 1])) for i in image_ids])

    # torchvision's train and val splits are both training images here: alternas carves its own validation split
    classes = [str(c + 1) for c in range(int(labels.max()) + 1 if len(labels) else 0)]
    return files(np.concatenate([ids["train"], ids["val"]])), files(ids["test"]), classes


def _text(name: str, path: Path) -> str:
    """A split list's text; an unreadable one (not text, a folder) is one line naming it."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise _bad(name, path, f"a readable split list ({type(err).__name__})") from None


def _lines(name: str, path: Path) -> list[str]:
    """The non-empty, non-comment lines of a split list."""
    return [line.strip() for line in _text(name, path).splitlines() if line.strip() and not line.startswith("#")]


def _read_dtd(root: Path) -> tuple[Files, Files, list[str]]:
    folder = root / "dtd" / "dtd"
    splits = {split: _lines("torch/dtd", folder / "labels" / f"{split}1.txt") for split in ("train", "val", "test")}
    classes = sorted({entry.split("/", 1)[0] for entries in splits.values() for entry in entries})
    index = {c: i for i, c in enumerate(classes)}

    def files(entries: list[str]) -> Files:
        return _listed("torch/dtd", folder, [(f"images/{e}", index[e.split("/", 1)[0]]) for e in entries])

    return files(splits["train"] + splits["val"]), files(splits["test"]), classes  # partition 1, as torchvision


def _read_pets(root: Path) -> tuple[Files, Files, list[str]]:
    folder = root / "oxford-iiit-pet"
    rows = {}
    for split in ("trainval", "test"):
        path = folder / "annotations" / f"{split}.txt"
        try:
            rows[split] = [(fields[0], int(fields[1]) - 1)
                           for fields in map(str.split, _lines("torch/oxford_iiit_pet", path))]
        except (IndexError, ValueError):
            raise _bad("torch/oxford_iiit_pet", path, "an Oxford-IIIT Pet list ('IMAGE CLASS-ID SPECIES BREED')") \
                from None
    names = {}
    for image_id, label in rows["trainval"] + rows["test"]:  # "Abyssinian_100" -> "Abyssinian", as torchvision
        names.setdefault(label, " ".join(part.title() for part in image_id.rsplit("_", 1)[0].split("_")))
    classes = [names.get(i, str(i)) for i in range(max(names, default=-1) + 1)]

    def files(split: str) -> Files:
        return _listed("torch/oxford_iiit_pet", folder, [(f"images/{i}.jpg", label) for i, label in rows[split]])

    return files("trainval"), files("test"), classes


def _read_food101(root: Path) -> tuple[Files, Files, list[str]]:
    folder = root / "food-101"
    meta = {}
    for split in ("train", "test"):
        path = folder / "meta" / f"{split}.json"
        try:
            meta[split] = json.loads(_text("torch/food101", path))
        except ValueError:
            meta[split] = None
        if not isinstance(meta[split], dict):
            raise _bad("torch/food101", path, "Food-101's split list (JSON: class -> [class/image, ...])")
    classes = sorted(meta["train"])
    index = {c: i for i, c in enumerate(classes)}

    def files(split: str) -> Files:
        return _listed("torch/food101", folder, [(f"images/{entry}.jpg", index[c]) for c, listed in
                                                 sorted(meta[split].items()) if c in index for entry in listed])

    return files("train"), files("test"), classes


TORCH_SETS: dict[str, TorchSet] = {
    "torch/svhn": TorchSet("SVHN", ("train_32x32.mat", "test_32x32.mat"), _read_svhn,
                           ({"split": "train"}, {"split": "test"}), label_breaking=("hflip",)),
    "torch/stl10": TorchSet("STL10", tuple(f"{_STL10_FOLDER}/{s}_{x}.bin" for s in ("train", "test") for x in "Xy"),
                            _read_stl10, ({"split": "train"},)),
    "torch/flowers102": TorchSet("Flowers102", ("flowers-102/imagelabels.mat", "flowers-102/setid.mat",
                                                "flowers-102/jpg"), _read_flowers102),
    "torch/dtd": TorchSet("DTD", tuple(f"dtd/dtd/labels/{s}1.txt" for s in ("train", "val", "test"))
                          + ("dtd/dtd/images",), _read_dtd),
    "torch/oxford_iiit_pet": TorchSet("OxfordIIITPet", ("oxford-iiit-pet/annotations/trainval.txt",
                                                        "oxford-iiit-pet/annotations/test.txt",
                                                        "oxford-iiit-pet/images"), _read_pets),
    "torch/food101": TorchSet("Food101", ("food-101/meta/train.json", "food-101/meta/test.json", "food-101/images"),
                              _read_food101),
}
FILE_SETS = ("torch/flowers102", "torch/dtd", "torch/oxford_iiit_pet", "torch/food101")  # read as image files


def _ensure(name: str, root: Path) -> None:
    """Every file ``name`` needs under ``root``; torchvision downloads the set when none is there, and a partial set
    is one line naming what is missing where."""
    spec = TORCH_SETS[name]
    present = [(root / need).exists() for need in spec.needs]
    if all(present):
        return
    if not any(present):
        try:
            if os.environ.get("ALTERNAS_OFFLINE"):
                raise ConnectionError("ALTERNAS_OFFLINE is set")
            from torchvision import datasets

            root.mkdir(parents=True, exist_ok=True)
            for kwargs in spec.downloads:
                getattr(datasets, spec.torchvision_class)(str(root), download=True, **kwargs)
        except Exception as err:  # no network, a proxy, a full disk...: all end in the same instruction
            reason = " ".join(f"{type(err).__name__}: {err}".split())
            raise DataError(f"{name}: {root / spec.needs[0]} is missing and could not be downloaded ({reason}); put "
                            f"torchvision's {spec.torchvision_class} files in {root} (or pass --data-root / set "
                            "ALTERNAS_DATA)") from None
        present = [(root / need).exists() for need in spec.needs]
    if not all(present):
        missing = spec.needs[present.index(False)]
        raise DataError(f"{name}: {root / missing} is missing; the dataset in {root} is incomplete (put every file "
                        f"of torchvision's {spec.torchvision_class} layout there)")


def read_torch_set(name: str, root: Path) -> tuple[Arrays | Files, Arrays | Files, list[str]]:
    """(train, test, class names) of the canonical ``torch/`` dataset ``name`` under ``root``."""
    if name in FILE_SETS:
        return listed_files(name, root)
    _ensure(name, root)
    return TORCH_SETS[name].read(root)


@functools.lru_cache(maxsize=4)
def listed_files(name: str, root: Path) -> tuple[Files, Files, list[str]]:
    """A set of image files' listing, cached per process: resolving ``stream: auto`` and loading read it once (only
    listings are kept: decoded arrays would hold hundreds of MB for the life of the process)."""
    _ensure(name, root)
    return TORCH_SETS[name].read(root)
