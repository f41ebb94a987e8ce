"""The MNIST family read from the original idx files (written here in the real format, read by torchvision's reader)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from alternas.data import readers
from alternas.data.datasets import DataConfig, load_data
from alternas.data.readers import IDX_FILES
from alternas.errors import DataError
from tests.helpers import run_cli, write_idx

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _offline(monkeypatch) -> None:
    """No test here may reach the network (a miss would download)."""
    monkeypatch.setenv("ALTERNAS_OFFLINE", "1")


def _padded(images: np.ndarray) -> np.ndarray:
    """What the loader should hold for 28 px grey ``images``: (N, 3, 32, 32), a 2 px black frame."""
    return np.repeat(np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, None], 3, axis=1)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_idx_loads_from_data_root(tmp_path, gz: bool) -> None:
    written = write_idx(tmp_path, n_train=50, n_test=20, seed=1, gz=gz)
    data = load_data(DataConfig("mnist", root=str(tmp_path), val_fraction=0))  # no val: the splits keep file order
    assert data.num_classes == 10 and data.class_names == list("0123456789")
    assert data.label_breaking == ("hflip",) and not data.allows("hflip")
    for split, (images, labels) in (("train", written["train"]), ("test", written["test"])):
        held = getattr(data, split)
        assert held.images.dtype == torch.uint8 and held.images.shape == (len(labels), 3, 32, 32)
        assert np.array_equal(held.images.numpy(), _padded(images))  # centre as written, on 3 channels
        frame = torch.ones(32, 32, dtype=torch.bool)
        frame[2:30, 2:30] = False
        assert held.images[:, :, frame].eq(0).all()
        assert held.labels.dtype == torch.int64 and held.labels.tolist() == labels.tolist()
    pixels = _padded(written["train"][0]) / 255
    assert data.mean == pytest.approx((pixels.mean(),) * 3, abs=1e-4)
    assert data.std == pytest.approx((pixels.std(),) * 3, abs=1e-4)
    assert data.image_size == 32 and data.selects_on == "test"


def test_idx_torchvision_layout_before_system_package(tmp_path) -> None:
    written = write_idx(tmp_path / "FashionMNIST" / "raw", n_train=30, n_test=10, gz=True)
    data = load_data(DataConfig("fashion-mnist", root=str(tmp_path), val_fraction=0))
    assert len(data.train) == 30 and data.train.labels.tolist() == written["train"][1].tolist()  # not the package's
    assert data.class_names[0] == "T-shirt/top" and data.class_names[-1] == "Ankle boot"
    assert data.label_breaking == ()


def test_idx_subset_and_val_split(tmp_path) -> None:
    write_idx(tmp_path, n_train=100, n_test=20)
    cfg = DataConfig("kmnist", root=str(tmp_path), subset=40, val_fraction=0.25, seed=3)
    data = load_data(cfg)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 20)
    assert sorted(data.val.labels.tolist()) == list(range(10))  # class-balanced
    assert torch.bincount(data.train.labels, minlength=10).tolist() == [3] * 10
    assert data.class_names == ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]
    again = load_data(cfg)
    assert again.train.digest() == data.train.digest() and again.val.digest() == data.val.digest()


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_idx_missing_file_is_named(tmp_path, gz: bool) -> None:
    write_idx(tmp_path, gz=gz)
    (tmp_path / ("t10k-labels-idx1-ubyte" + (".gz" if gz else ""))).unlink()
    with pytest.raises(DataError) as err:
        load_data(DataConfig("mnist", root=str(tmp_path)))
    message = str(err.value)
    assert "t10k-labels-idx1-ubyte" in message and str(tmp_path) in message and "\n" not in message


@pytest.mark.parametrize(("gz", "damage"), [(False, "magic"), (True, "magic"), (False, "truncated")])
def test_idx_malformed_file_is_named(tmp_path, gz: bool, damage: str) -> None:
    write_idx(tmp_path, gz=gz)
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    raw = b"\x12\x34\x56\x78" + raw[4:] if damage == "magic" else raw[: len(raw) // 2]
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DataError) as err:
        load_data(DataConfig("mnist", root=str(tmp_path)))
    message = str(err.value)
    assert str(path) in message and "not a valid idx file" in message and "\n" not in message
    assert ("bad magic number" in message) == (damage == "magic")


def test_idx_labels_out_of_range(tmp_path) -> None:
    write_idx(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    raw = bytearray(path.read_bytes())
    raw[8] = 10
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="label 10, outside 0-9"):
        load_data(DataConfig("mnist", root=str(tmp_path)))


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist", "kmnist"])
def test_idx_offline_and_nowhere_is_one_line(tmp_path, monkeypatch, name: str) -> None:
    monkeypatch.setattr(readers, "IDX_SYSTEM_PATHS", {"fashion-mnist": tmp_path / "no-package"})
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name, root=str(tmp_path / "data")))
    message = str(err.value)
    assert "\n" not in message and IDX_FILES[0] in message and "ALTERNAS_OFFLINE" in message
    assert str(tmp_path / "data") in message
    assert (str(tmp_path / "no-package") in message) == (name == "fashion-mnist")  # the folders searched
    assert ("apt-get install dataset-fashion-mnist" in message) == (name == "fashion-mnist")
    assert not (tmp_path / "data").exists()  # offline: nothing created


def test_fashion_mnist_from_debian_package(tmp_path) -> None:
    if not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file():
        missing = "Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)"
        pytest.fail(f"CI must provide it: {missing}") if os.environ.get("CI") else pytest.skip(missing)
    data = load_data(DataConfig("fashion-mnist", root=str(tmp_path), subset=1000, val_fraction=0.2))  # root: empty
    assert (len(data.train), len(data.val), len(data.test)) == (800, 200, 10000)
    assert data.train.images.shape == (800, 3, 32, 32) and data.test.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(data.train.labels, minlength=10).tolist() == [80] * 10
    assert torch.bincount(data.val.labels, minlength=10).tolist() == [20] * 10
    assert torch.bincount(data.test.labels, minlength=10).tolist() == [1000] * 10
    assert data.test.images[:, :, :2].eq(0).all() and data.test.images[:, :, :, -2:].eq(0).all()
    # the published 28 px statistics (0.2860, 0.3530) seen through the 2 px black frame
    assert data.mean[0] == pytest.approx(0.2860 * 784 / 1024, abs=2e-3)
    assert data.std[0] == pytest.approx(np.sqrt((0.3530**2 + 0.2860**2) * 784 / 1024 - (0.2860 * 784 / 1024) ** 2),
                                        abs=2e-3)


def test_cli_missing_dataset_is_one_line(tmp_path) -> None:
    res = run_cli("train", "--placement", "CC,CC,CC,CC", "--base", "tiny", "--data", "mnist", "--data-root",
                  str(tmp_path), "--epochs", "1", "--out", str(tmp_path / "run"), env={"ALTERNAS_OFFLINE": "1"})
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "train-images-idx3-ubyte" in res.stderr and str(tmp_path) in res.stderr
