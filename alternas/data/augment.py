"""The training-time input pipeline of a recipe: batches with the recipe's augmentations (the in-memory tensor
path or the reference's per-sample PIL path), minus those that change a dataset's labels.

Shared by training and by the diagnostics that measure the augmented training loss (the paper's Hessian).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from alternas.data.datasets import DataSplits, ImageData, ImageFiles
from alternas.data.loader import TensorLoader, pil_loader
from alternas.errors import ConfigError

if TYPE_CHECKING:  # alternas.train imports this module
    from alternas.train.recipe import Recipe


def check_full_batch(data: DataSplits, recipe: Recipe, world: int = 1) -> None:
    """One line when the training set gives no full batch: loaders drop the last incomplete one (a one-image batch
    would be empty after Mixup's even trim, and BatchNorm statistics of a handful of images are noise)."""
    if len(data.train) // world < recipe.batch_size:
        per_rank = f" per process ({world} processes)" if world > 1 else ""
        raise ConfigError(f"the training set has {len(data.train) // world} images{per_rank}, fewer than "
                          f"recipe.batch_size {recipe.batch_size}; lower the batch size or use more data")


def make_train_batches(data: DataSplits, recipe: Recipe, device: torch.device, seed: int, rank: int, world: int):
    """The recipe's training batches: full batches only (``check_full_batch``), as many on every rank."""
    check_full_batch(data, recipe, world)
    if recipe.uses_pil_pipeline or data.streamed:
        batches = pil_loader(data.train, build_train_transform(recipe, data), recipe.batch_size, shuffle=True,
                             workers=recipe.workers, seed=seed, rank=rank, world=world, drop_last=True)
    else:
        batches = TensorLoader(data.train, recipe.batch_size, mean=data.mean, std=data.std, device=device,
                               shuffle=True, crop_padding=recipe.crop_padding if recipe.crop == "pad" else 0,
                               flip=recipe.flip and data.allows("hflip"), drop_last=True, seed=seed, rank=rank,
                               world=world)
    return batches


def randaugment_kind(op_name: str) -> str:
    """Which of ``AUGMENTATIONS`` a timm RandAugment op is: every op that is not a rotation, shear or translation
    works on pixel values (``Posterize``, ``ColorIncreasing``, ``GaussianBlurRand``, ...)."""
    for prefix, kind in (("Rotate", "rotate"), ("Shear", "shear"), ("Translate", "translate")):
        if op_name.startswith(prefix):
            return kind
    return "photometric"


def mixes(recipe: Recipe, data: DataSplits) -> bool:
    """Whether training (and a Hessian on augmented batches) mixes images: the recipe asks and the labels allow."""
    return recipe.uses_mixup and data.allows("mixing")


def mixup_for(recipe: Recipe, data: DataSplits) -> Any | None:
    """timm's Mixup/CutMix as the recipe sets it (soft targets, label smoothing), or ``None`` where it does not mix:
    one construction for training and for the Hessian's augmented loss."""
    if not mixes(recipe, data):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=1.0,
                 label_smoothing=recipe.label_smoothing, num_classes=data.num_classes)


def _without_label_breaking_ops(randaugment: Any, data: DataSplits) -> Any | None:
    """timm's RandAugment with the ops ``data`` forbids taken out of its op list (and of its weights, if any);
    ``None`` when none is left."""
    keep = [i for i, op in enumerate(randaugment.ops) if data.allows(randaugment_kind(op.name))]
    if not keep:
        return None
    if randaugment.choice_weights is not None:
        weights = [randaugment.choice_weights[i] for i in keep]
        randaugment.choice_weights = [w / sum(weights) for w in weights]
        randaugment.num_layers = min(randaugment.num_layers, len(keep))  # weighted ops are drawn without replacement
    randaugment.ops = [randaugment.ops[i] for i in keep]
    return randaugment


def build_train_transform(recipe: Recipe, data: DataSplits):
    """The reference's per-sample pipeline: crop (+pad) and flip, RandAugment, ToTensor, Normalize, erasing;
    without the flips, RandAugment ops and erasing that change ``data``'s labels (``DataSplits.label_breaking``).

    On streamed data the input is the original image: RandomResizedCrop cuts from all of it (as the paper's
    ImageNet recipe does), a padded crop from its centre square (what in-memory training images hold)."""
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.random_erasing import RandomErasing
    from torchvision import transforms as T

    size = data.image_size
    steps: list[Any] = []
    if data.streamed and recipe.crop != "resized":
        steps += data.train.eval_crop(crop_pct=1.0)
    if recipe.crop == "resized":
        steps.append(T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC))
    elif recipe.crop_padding:
        steps.append(T.RandomCrop(size, padding=recipe.crop_padding))
    if recipe.flip and data.allows("hflip"):
        steps.append(T.RandomHorizontalFlip(0.5))
    if recipe.randaugment:
        # no "interpolation" key: timm then picks bilinear or bicubic at random per op, as the reference did
        hparams = {"translate_const": int(size * 0.45), "img_mean": tuple(round(255 * m) for m in data.mean)}
        if (randaugment := _without_label_breaking_ops(rand_augment_transform(recipe.randaugment, hparams), data)):
            steps.append(randaugment)
    steps += [T.ToTensor(), T.Normalize(data.mean, data.std)]
    if recipe.random_erasing > 0 and data.allows("erasing"):
        steps.append(RandomErasing(recipe.random_erasing, mode="const", max_count=1, device="cpu"))
    return T.Compose(steps)


def eval_batches(data: DataSplits, split: ImageData | ImageFiles, batch_size: int, device: torch.device | str, *,
                 workers: int = 0, shuffle: bool = False, drop_last: bool = False, seed: int = 0):
    """Normalised batches of ``split`` without augmentation: the in-memory tensor loader, or for images on disk a
    DataLoader (``workers`` processes) that decodes each one through the evaluation crop."""
    if isinstance(split, ImageFiles):
        from torchvision import transforms as T

        transform = T.Compose([*split.eval_crop(), T.ToTensor(), T.Normalize(data.mean, data.std)])
        return pil_loader(split, transform, batch_size, shuffle=shuffle, workers=workers, seed=seed,
                          drop_last=drop_last)
    return TensorLoader(split, batch_size, mean=data.mean, std=data.std, device=device, shuffle=shuffle,
                        drop_last=drop_last, seed=seed)
