"""torchvision's datasets by timm's names (``torch/NAME``), read from small files written here in each released
format (SVHN's ``.mat``, STL-10's column-major binary, the JPEG sets' split lists), never mocked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from alternas.data.datasets import DataConfig, ImageFiles, load_data
from alternas.data.torchvision_sets import listed_files
from alternas.errors import DataError
from tests.helpers import run_cli


@pytest.fixture(autouse=True)
def _offline(monkeypatch) -> None:
    """No test here may reach the network (a miss would download)."""
    monkeypatch.setenv("ALTERNAS_OFFLINE", "1")
    listed_files.cache_clear()


def _label_images(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """(N, size, size, 3) uint8 row-major pictures that say their label and their orientation: the left half is
    bright in channel 0, the right half dark, and channel 1 holds 20 x label (a transposed or mislabelled reader
    fails the checks)."""
    images = rng.integers(0, 30, size=(len(labels), size, size, 3), dtype=np.uint8)
    images[:, :, : size // 2, 0] = 250
    images[:, :, :, 1] = (20 * labels).astype(np.uint8)[:, None, None]
    return images


def _check(images: torch.Tensor, labels: torch.Tensor) -> None:
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
    left, right = images[:, 0, :, :12].float().mean(), images[:, 0, :, 20:].float().mean()
    assert left > 200 > 60 > right, (left, right)  # not transposed
    assert torch.all((images[:, 1].float().mean((1, 2)) - 20 * labels.float()).abs() <= 3)  # each image's own label


def write_svhn(root: Path, n_train: int = 40, n_test: int = 20) -> None:
    rng = np.random.default_rng(0)
    for file, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        labels = np.arange(n) % 10
        images = _label_images(labels, 32, rng)
        savemat(root / file, {"X": np.transpose(images, (1, 2, 3, 0)),  # (H, W, C, N) as released
                              "y": np.where(labels == 0, 10, labels).reshape(-1, 1).astype(np.uint8)})


def write_stl10(root: Path, n_train: int = 30, n_test: int = 20) -> None:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        images = _label_images(labels, 96, rng)  # (N, H, W, C) -> released (N, C, W, H): column-major planes
        np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tofile(folder / f"{split}_X.bin")
        (labels + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse",
                                                      "monkey", "ship", "truck"]) + "\n")


def _jpeg(path: Path, label: int, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_label_images(np.array([label]), 48, rng)[0]).save(path, quality=95)


def write_dtd(root: Path, classes=("banded", "dotted", "zigzagged"), per_split: int = 2) -> None:
    folder, rng = root / "dtd" / "dtd", np.random.default_rng(2)
    for split in ("train", "val", "test"):
        entries = [f"{c}/{c}_{split}_{i}.jpg" for c in classes for i in range(per_split)]
        for entry in entries:
            _jpeg(folder / "images" / entry, classes.index(entry.split("/")[0]), rng)
        (folder / "labels").mkdir(parents=True, exist_ok=True)
        (folder / "labels" / f"{split}1.txt").write_text("\n".join(entries) + "\n")


def write_pets(root: Path, breeds=("Abyssinian", "american_bulldog", "Bengal"), per_split: int = 3) -> None:
    folder, rng = root / "oxford-iiit-pet", np.random.default_rng(3)
    (folder / "annotations").mkdir(parents=True)
    for split, offset in (("trainval", 0), ("test", 100)):
        rows = []
        for label, breed in enumerate(breeds):
            for i in range(per_split):
                image_id = f"{breed}_{offset + i}"
                _jpeg(folder / "images" / f"{image_id}.jpg", label, rng)
                rows.append(f"{image_id} {label + 1} {1 + (breed[0].isupper())} {i + 1}")
        (folder / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")


def write_food101(root: Path, classes=("apple_pie", "ramen", "sushi"), per_split: int = 3) -> None:
    folder, rng = root / "food-101", np.random.default_rng(4)
    (folder / "meta").mkdir(parents=True)
    for split, offset in (("train", 0), ("test", 100)):
        meta = {c: [f"{c}/{offset + i}" for i in range(per_split)] for c in classes}
        for c, entries in meta.items():
            for entry in entries:
                _jpeg(folder / "images" / f"{entry}.jpg", classes.index(c), rng)
        (folder / "meta" / f"{split}.json").write_text(json.dumps(meta))


def write_flowers102(root: Path, classes: int = 3, per_split: int = 2) -> None:
    folder, rng = root / "flowers-102", np.random.default_rng(5)
    folder.mkdir(parents=True)
    n = classes * per_split * 3
    labels = np.arange(n) % classes  # image i + 1 has label labels[i] (1-based in the release)
    for i, label in enumerate(labels):
        _jpeg(folder / "jpg" / f"image_{i + 1:05d}.jpg", int(label), rng)
    savemat(folder / "imagelabels.mat", {"labels": (labels + 1).reshape(1, -1)})
    ids = np.arange(1, n + 1)
    savemat(folder / "setid.mat", {"trnid": ids[0::3].reshape(1, -1), "valid": ids[1::3].reshape(1, -1),
                                   "tstid": ids[2::3].reshape(1, -1)})


def test_timm_names_are_accepted_and_the_short_names_stay_canonical() -> None:
    assert DataConfig("torch/cifar10").name == "cifar10" and DataConfig("torch/CIFAR100").name == "cifar100"
    assert DataConfig("torch/fashion_mnist").name == "fashion-mnist" == DataConfig("fashion-mnist").name
    assert DataConfig("torch/Oxford-IIIT-Pet").name == "torch/oxford_iiit_pet"
    with pytest.raises(DataError, match=r"unknown dataset 'torch/imagenet21k'.*torch/svhn"):
        DataConfig("torch/imagenet21k")


def test_svhn_reads_the_released_mat_layout(tmp_path) -> None:
    write_svhn(tmp_path)
    data = load_data(DataConfig("torch/svhn", root=str(tmp_path), val_fraction=0.25))
    assert data.num_classes == 10 and data.class_names == [str(d) for d in range(10)]
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 20)
    assert data.label_breaking == ("hflip",)  # a mirrored digit is no digit
    for split in (data.train, data.val, data.test):
        _check(split.images, split.labels)
    assert set(data.test.labels.tolist()) == set(range(10))  # the release's 10 for digit 0 read as 0


def test_stl10_reads_its_column_major_binary_and_meets_the_bases_at_32_px(tmp_path) -> None:
    write_stl10(tmp_path)
    data = load_data(DataConfig("torch/stl10", root=str(tmp_path), val_fraction=0))
    assert data.class_names[:3] == ["airplane", "bird", "car"] and data.image_size == 32
    _check(data.train.images, data.train.labels)
    big = load_data(DataConfig("torch/stl10", root=str(tmp_path), val_fraction=0, image_size=64))
    assert big.image_size == 64


@pytest.mark.parametrize("name, write, classes", [
    ("torch/dtd", write_dtd, ["banded", "dotted", "zigzagged"]),
    ("torch/oxford_iiit_pet", write_pets, ["Abyssinian", "American Bulldog", "Bengal"]),
    ("torch/food101", write_food101, ["apple_pie", "ramen", "sushi"]),
    ("torch/flowers102", write_flowers102, ["1", "2", "3"]),
])
def test_image_file_sets_read_their_split_lists(tmp_path, name, write, classes) -> None:
    write(tmp_path)
    data = load_data(DataConfig(name, root=str(tmp_path), val_fraction=0))
    assert data.class_names == classes and data.num_classes == len(classes)
    assert len(data.train) == 2 * len(data.test) if name in ("torch/dtd", "torch/flowers102") else \
        len(data.train) == len(data.test)  # DTD and Flowers-102: torchvision's train + val are training images
    for split in (data.train, data.test):  # decoded in memory at the default 32 px, each with its own label
        _check(split.images, split.labels)
    streamed = load_data(DataConfig(name, root=str(tmp_path), val_fraction=0, stream="always", image_size=40))
    assert isinstance(streamed.train, ImageFiles) and streamed.image_size == 40


@pytest.mark.parametrize("name, write, remove, says", [
    ("torch/svhn", write_svhn, "test_32x32.mat", "test_32x32.mat is missing"),
    ("torch/stl10", write_stl10, "stl10_binary/train_y.bin", "train_y.bin is missing"),
    ("torch/food101", write_food101, "food-101/images/ramen/101.jpg", "1 listed image(s) missing, e.g. "),
    ("torch/dtd", write_dtd, "dtd/dtd/labels/val1.txt", "val1.txt is missing"),
])
def test_a_partial_dataset_is_one_line_naming_the_missing_file(tmp_path, name, write, remove, says) -> None:
    write(tmp_path)
    (tmp_path / remove).unlink()
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name, root=str(tmp_path)))
    assert says in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert str(tmp_path) in str(err.value)


def test_an_absent_dataset_offline_names_the_file_and_where(tmp_path) -> None:
    with pytest.raises(DataError, match=r"torch/svhn: .*train_32x32.mat is missing and could not be downloaded"):
        load_data(DataConfig("torch/svhn", root=str(tmp_path)))


def test_an_interrupted_download_s_empty_mat_file_is_named(tmp_path) -> None:
    write_svhn(tmp_path)
    (tmp_path / "train_32x32.mat").write_bytes(b"")
    with pytest.raises(DataError, match=r"train_32x32.mat is not an SVHN .mat file"):
        load_data(DataConfig("torch/svhn", root=str(tmp_path)))


def test_a_corrupt_label_file_is_named(tmp_path) -> None:
    write_stl10(tmp_path)
    np.full(30, 11, dtype=np.uint8).tofile(tmp_path / "stl10_binary" / "train_y.bin")
    with pytest.raises(DataError, match=r"train_y.bin is not STL-10's labels"):
        load_data(DataConfig("torch/stl10", root=str(tmp_path)))


def test_the_command_line_trains_a_base_on_a_torch_dataset_by_its_timm_name(tmp_path) -> None:
    """STL-10's 96 px images, resized to 32, through the tiny base's MSA at the end of every stage."""
    write_stl10(tmp_path / "data", n_train=40, n_test=10)
    res = run_cli("train", "--placement", "CM,CM,CM,CM", "--base", "tiny", "--data", "torch/STL10", "--data-root",
                  str(tmp_path / "data"), "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "run"),
                  "--quiet", env={"ALTERNAS_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "torch/stl10" in config and (tmp_path / "run" / "model.safetensors").is_file()
    missing = run_cli("train", "--placement", "CC,CC,CC,CC", "--base", "tiny", "--data", "torch/dtd", "--data-root",
                      str(tmp_path / "data"), "--out", str(tmp_path / "run2"), env={"ALTERNAS_OFFLINE": "1"})
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert "dtd/dtd/labels/train1.txt is missing" in missing.stderr
