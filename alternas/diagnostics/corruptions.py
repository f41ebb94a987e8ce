"""Robustness on corrupted images: the paper's headline y-axis (PAPER.md §4.1, CIFAR-100-C).

Robustness is the mean accuracy over the corruptions of Hendrycks & Dietterich (2019) at severities 1-5. Two
sources, never mixed in one comparison (each result says which it rests on):

* **released**: the real CIFAR-10-C / CIFAR-100-C files (``<root>/CIFAR-10-C/<corruption>.npy``, 50,000 images =
  5 severities x the 10,000 test images, and ``labels.npy``), the paper's protocol, read when present beside CIFAR.
* **generated**: the corruptions applied to a seeded, class-balanced pick of the validation images by albumentations,
  so every candidate sees the same corrupted images, for every dataset (image folders and the built-in probes
  included): 13 of the 15 corruptions (albumentations has no frost, and its fog does not grow with severity on small
  images); its knobs are set to approximate the CIFAR-C severities (the constants of Hendrycks' ``make_cifar_c.py``),
  and contrast, which albumentations scales around zero rather than the image mean, is the one corruption computed
  here. Generated scores approximate, never equal, the released ones.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alternas.data.datasets import ImageData, ImageFiles, balanced_indices
from alternas.data.loader import TensorLoader
from alternas.errors import DataError

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)
RELEASED_FOLDERS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}


def _contrast(factor: float) -> Callable[[np.ndarray], np.ndarray]:
    """CIFAR-C's contrast: deviations from the image's mean scaled by ``factor``."""
    def apply(image: np.ndarray) -> np.ndarray:
        mean = image.mean(axis=(0, 1), keepdims=True)
        return np.clip((image.astype(np.float32) - mean) * factor + mean, 0, 255).round().astype(np.uint8)
    return apply


def _albumentations():
    """albumentations, imported without its check for a newer release over the network at import."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations

    return albumentations


def _albumentation(severity: int, name: str) -> object:
    """The albumentations transform of ``name`` at CIFAR-C's ``severity`` (1-5), ``p=1``."""
    import cv2  # albumentations' own dependency (opencv-python-headless)

    A = _albumentations()

    i = severity - 1
    make: dict[str, Callable[[], object]] = {
        "gaussian_noise": lambda: A.GaussNoise(std_range=((c := (0.04, 0.06, 0.08, 0.09, 0.10)[i]), c),
                                               mean_range=(0, 0), p=1),
        # CIFAR-C: Poisson with 500 ... 50 photons; albumentations' scale ~ 2.1 / photons gives that noise SD
        "shot_noise": lambda: A.ShotNoise(scale_range=((s := 2.1 / (500, 250, 100, 75, 50)[i]), s), p=1),
        "impulse_noise": lambda: A.SaltAndPepper(amount=((a := (0.01, 0.02, 0.03, 0.05, 0.07)[i]), a),
                                                 salt_vs_pepper=(0.5, 0.5), p=1),
        # CIFAR-C's disks of radius 0.3-1.5 px are below albumentations' Defocus (whole pixels): a Gaussian instead
        "defocus_blur": lambda: A.GaussianBlur(sigma_limit=((s := (0.4, 0.5, 0.6, 0.8, 1.0)[i]), s), blur_limit=0,
                                               p=1),
        "glass_blur": lambda: A.GlassBlur(sigma=(0.05, 0.25, 0.4, 0.25, 0.4)[i], max_delta=1,
                                          iterations=(1, 1, 1, 2, 2)[i], mode="fast", p=1),
        "motion_blur": lambda: A.MotionBlur(blur_limit=((k := (3, 3, 5, 5, 7)[i]), k), allow_shifted=False, p=1),
        "zoom_blur": lambda: A.ZoomBlur(max_factor=((m := (1.06, 1.11, 1.16, 1.21, 1.26)[i]), m),
                                        step_factor=(0.01, 0.01), p=1),
        "snow": lambda: A.RandomSnow(snow_point_range=((s := (0.1, 0.2, 0.3, 0.4, 0.5)[i]), s), brightness_coeff=2.0,
                                     method="bleach", p=1),
        "brightness": lambda: A.RandomBrightnessContrast(brightness_limit=((b := (0.05, 0.1, 0.15, 0.2, 0.3)[i]), b),
                                                         contrast_limit=(0, 0), p=1),
        "elastic_transform": lambda: A.ElasticTransform(alpha=(1.0, 2.0, 3.0, 4.0, 5.0)[i], sigma=2.0, p=1),
        "pixelate": lambda: A.Downscale(scale_range=((s := (0.95, 0.9, 0.85, 0.75, 0.65)[i]), s), p=1,
                                        interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR}),
        "jpeg_compression": lambda: A.ImageCompression(quality_range=((q := (80, 65, 58, 50, 40)[i]), q), p=1),
    }
    return make[name]()


# What albumentations can make: no frost (it has none) and no fog (its RandomFog on small images does not grow with
# the fog coefficient: measured, the mean change at severity 5 equalled severity 1's)
GENERATED = tuple(c for c in CORRUPTIONS if c not in ("frost", "fog"))


@dataclass
class CorruptedImages:
    """The same corrupted images for every candidate: per (corruption, severity) uint8 (N, 3, H, W), one label set."""

    source: str  # "released CIFAR-100-C" | "generated (albumentations 2.0.8)"
    images: dict[tuple[str, int], torch.Tensor]
    labels: torch.Tensor

    @property
    def corruptions(self) -> list[str]:
        return list(dict.fromkeys(name for name, _ in self.images))

    @property
    def severities(self) -> list[int]:
        return sorted({s for _, s in self.images})


def _seeded_pick(total: int, count: int, seed: int) -> torch.Tensor:
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count].sort().values


def _released_folder(dataset: str, root: Path | None) -> Path | None:
    """The released CIFAR-C folder beside the data (one with ``labels.npy``), or None."""
    folder = root / RELEASED_FOLDERS[dataset] if dataset in RELEASED_FOLDERS and root is not None else None
    return folder if folder is not None and (folder / "labels.npy").is_file() else None


def _generated_source() -> str:
    from importlib.metadata import version

    return f"generated (albumentations {version('albumentations')})"


def released_corruptions(dataset: str, root: Path | None, count: int, severities: tuple[int, ...],
                         seed: int) -> CorruptedImages | None:
    """``count`` seeded test images per severity from the released CIFAR-C files (the same test images at every
    severity and for every candidate), or None where the dataset has no
    release or ``root`` lacks its folder. A folder without a corruption's file is one line naming it."""
    folder = _released_folder(dataset, root)
    if folder is None:
        return None
    try:
        labels = np.load(folder / "labels.npy", mmap_mode="r")
        if len(labels) % len(SEVERITIES):
            raise DataError(f"{folder / 'labels.npy'} holds {len(labels)} labels, not 5 severities of the test set")
        per_severity = len(labels) // len(SEVERITIES)  # the release: the 10,000 test images once per severity
        pick = _seeded_pick(per_severity, count, seed).numpy()
        images = {}
        for name in CORRUPTIONS:
            path = folder / f"{name}.npy"
            if not path.is_file():
                raise DataError(f"{folder} has labels.npy but no {name}.npy: give every corruption's file of the "
                                f"release (or remove the folder to generate corruptions instead)")
            stack = np.load(path, mmap_mode="r")
            if stack.shape[1:] != (32, 32, 3) or len(stack) != len(labels):
                raise DataError(f"{path} holds {stack.shape}, not the release's {len(labels)} 32x32 RGB images (5 "
                                "severities of the test set, as labels.npy)")
            for severity in severities:
                rows = (severity - 1) * per_severity + pick
                images[name, severity] = torch.from_numpy(np.ascontiguousarray(stack[rows].transpose(0, 3, 1, 2)))
        first = torch.from_numpy(np.asarray(labels[pick], dtype=np.int64))
    except (ValueError, OSError) as err:
        raise DataError(f"{folder}: a released file cannot be read ({type(err).__name__}: {err})") from None
    return CorruptedImages(f"released {folder.name}", images, first)


_GENERATED: dict[tuple, CorruptedImages] = {}  # per process: every candidate of a worker reuses one set


def generated_corruptions(images: ImageData, severities: tuple[int, ...], seed: int) -> CorruptedImages:
    """The 13 corruptions albumentations makes, at ``severities``, on ``images``: seeded, so every candidate of a
    study sees the same corrupted set (kept per process by the images' digest)."""
    A = _albumentations()

    key = (images.digest(), tuple(severities), seed)
    if key in _GENERATED:
        return _GENERATED[key]
    pictures = images.images.permute(0, 2, 3, 1).numpy()  # HWC, as albumentations takes them
    out = {}
    for name in GENERATED:
        for severity in severities:
            if name == "contrast":
                apply = _contrast((0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1])
            else:
                compose = A.Compose([_albumentation(severity, name)],
                                    seed=seed + 1000 * severity + CORRUPTIONS.index(name))
                apply = functools.partial(lambda c, image: c(image=image)["image"], compose)
            done = np.stack([apply(np.ascontiguousarray(p)) for p in pictures])
            out[name, severity] = torch.from_numpy(done).permute(0, 3, 1, 2).contiguous()
    _GENERATED.clear()
    _GENERATED[key] = CorruptedImages(_generated_source(), out, images.labels)
    return _GENERATED[key]


@torch.no_grad()
def corruption_robustness(model: torch.nn.Module, corrupted: CorruptedImages, mean: tuple[float, ...],
                          std: tuple[float, ...], device: torch.device, batch_size: int = 256) -> dict:
    """Accuracy (%) per corruption and severity, per corruption (mean over severities) and ``robustness`` (mean over
    both), with the source they rest on."""
    model.eval()
    accuracy: dict[str, dict[int, float]] = {}
    for (name, severity), images in corrupted.images.items():
        correct = 0
        for x, y in TensorLoader(ImageData(images, corrupted.labels), batch_size, mean=mean, std=std, device=device):
            correct += int((model(x).argmax(1) == y).sum())
        accuracy.setdefault(name, {})[severity] = 100.0 * correct / max(len(corrupted.labels), 1)
    per_corruption = {name: float(np.mean(list(by_severity.values()))) for name, by_severity in accuracy.items()}
    return {"source": corrupted.source, "images": len(corrupted.labels), "severities": corrupted.severities,
            "accuracy": {name: {str(s): a for s, a in v.items()} for name, v in accuracy.items()},
            "per_corruption": per_corruption,
            "robustness": float(np.mean(list(per_corruption.values()))) if per_corruption else math.nan}


def corruption_source(dataset: str, root: Path | None) -> str:
    """Which corrupted images ``corrupted_for`` uses for this dataset and data root: what a run's score rests on, so
    that a run scored on another source (the release downloaded since, another albumentations) is scored again."""
    folder = _released_folder(dataset, root)
    return f"released {folder.name}" if folder is not None else _generated_source()


def corrupted_for(dataset: str, root: Path | None, validation: ImageData | ImageFiles, count: int,
                  severities: tuple[int, ...], seed: int) -> CorruptedImages:
    """The released files when the data root holds them for this dataset, else corruptions generated on a seeded,
    class-balanced pick of ``count`` validation images (listings sorted by class would give the first ``count``
    images of a few classes only)."""
    released = released_corruptions(dataset, root, count, severities, seed)
    if released is not None:
        return released
    pick = balanced_indices(validation.labels, min(count, len(validation)), seed)
    return generated_corruptions(validation.take(pick).load(), severities, seed)
