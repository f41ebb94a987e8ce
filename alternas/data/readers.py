"""Readers of the original on-disk formats: CIFAR's python pickles and the MNIST family's idx files, each from
``--data-root`` (or a system package's folder), else through torchvision's download."""

from __future__ import annotations

import gzip
import math
import os
import pickle
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alternas.data.images import ImageData
from alternas.errors import DataError

_CIFAR_LAYOUT = {  # folder, train files, test file, label key, meta file, names key, tarball
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels",
                "batches.meta", "label_names", "cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", "meta", "fine_label_names",
                 "cifar-100-python.tar.gz"),
}
# The MNIST family: four idx files each, 28 px grey. Per name: torchvision's class (its download lands in
# ``<root>/<class>/raw``) and the class names.
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IDX_LAYOUT = {
    "fashion-mnist": ("FashionMNIST", ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                       "Sneaker", "Bag", "Ankle boot")),
    "mnist": ("MNIST", tuple("0123456789")),
    "kmnist": ("KMNIST", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
}
# Folders a system package installs the idx files into (gzipped), searched after --data-root; and the package
IDX_SYSTEM_PATHS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
_IDX_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}


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


def load_cifar(name: str, root: Path) -> tuple[ImageData, ImageData, list[str]]:
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
    folders = [root, root / IDX_LAYOUT[name][0] / "raw"]
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
            getattr(datasets, IDX_LAYOUT[name][0])(str(root), train=True, download=True)
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


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


def load_idx(name: str, root: Path) -> tuple[ImageData, ImageData, list[str]]:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    train_images, train_labels, test_images, test_labels = _ensure_idx(name, root)
    num_classes = len(IDX_LAYOUT[name][1])

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

    return read(train_images, train_labels), read(test_images, test_labels), list(IDX_LAYOUT[name][1])
