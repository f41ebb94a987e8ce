"""Batch pipelines.

``TensorLoader`` is the fast path: the whole uint8 set lives on the training device and crop-with-padding + flip
run on whole batches as tensor ops, so no per-sample Python runs in the hot loop. ``pil_loader`` is the paper
recipe's path (RandAugment needs PIL) and the streaming one (images decoded from disk): a DataLoader with workers
and per-sample timm/torchvision transforms.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from alternas.data.datasets import ImageData, ImageFiles
from alternas.errors import DataError


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one (a container's or ``taskset``'s
    share), else every CPU. PyTorch checks DataLoader workers against the same number."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def loader_workers(requested: int) -> int:
    """DataLoader workers to start: the recipe's count as the upper bound, capped by the usable CPUs (more workers
    than CPUs only compete for them, and PyTorch warns twice per loader). The augmentation stream of each batch
    follows the worker that drew it, so a run on fewer CPUs than ``recipe.workers`` draws other (equally random)
    augmentations than one on more."""
    return max(0, min(requested, usable_cpus()))


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 normalised."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def random_crop_flip(images: torch.Tensor, padding: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Per-sample ``RandomCrop(size, padding)`` (zero fill) and ``RandomHorizontalFlip(0.5)`` on a batch."""
    b, c, h, w = images.shape
    dev = images.device
    if padding > 0:
        padded = torch.nn.functional.pad(images, (padding,) * 4)
        off = torch.randint(0, 2 * padding + 1, (2, b), generator=gen, device=gen.device).to(dev)
        rows = (off[0].view(b, 1) + torch.arange(h, device=dev)).view(b, 1, h, 1)
        cols = (off[1].view(b, 1) + torch.arange(w, device=dev)).view(b, 1, 1, w)
        batch = torch.arange(b, device=dev).view(b, 1, 1, 1)
        chan = torch.arange(c, device=dev).view(1, c, 1, 1)
        images = padded[batch, chan, rows, cols]
    if flip:
        mask = (torch.rand(b, generator=gen, device=gen.device) < 0.5).to(dev).view(b, 1, 1, 1)
        images = torch.where(mask, images.flip(-1), images)
    return images


def augment_seed(seed: int, rank: int) -> int:
    """The seed of a rank's augmentation stream: distinct per rank and from the shuffle's ``seed``."""
    return seed * 1_000_003 + rank + 1


class TensorLoader:
    """Batches of an in-memory ``ImageData`` on ``device``, shuffled and augmented with seeded generators.

    Two generators: the shuffle's is seeded alike on every rank, so all ranks draw the same permutation; the
    augmentation's is seeded per rank, so ranks with different batches never knock the permutations apart.
    Under data parallelism (``world`` > 1) an epoch keeps the first ``world * (n // world)`` indices of the
    permutation and rank ``r`` takes every ``world``-th from ``r``: no sample twice, at most ``world - 1`` left
    out, and every rank the same number of batches (as ``DistributedSampler(drop_last=True)``). ``drop_last``
    also drops a rank's last incomplete batch (training does, as timm's loaders do). Both generators' states are
    part of the training checkpoint, so a resumed run sees the same batches.
    """

    def __init__(
        self,
        data: ImageData,
        batch_size: int,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        crop_padding: int = 0,
        flip: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.batch_size, self.mean, self.std = batch_size, mean, std
        self.shuffle, self.crop_padding, self.flip, self.drop_last = shuffle, crop_padding, flip, drop_last
        self.rank, self.world = rank, world
        # CPU generators: identical streams on every device
        self.generator = torch.Generator().manual_seed(seed)
        self.augment_generator = torch.Generator().manual_seed(augment_seed(seed, rank))

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        if self.world > 1:
            order = order[: self.world * (n // self.world)]
        return order[self.rank :: self.world]

    def __len__(self) -> int:
        n = len(self.labels)
        share = n // self.world if self.world > 1 else n
        return share // self.batch_size if self.drop_last else -(-share // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._indices()
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                break
            idx = idx.to(self.device)
            x = self.images[idx]
            if self.crop_padding or self.flip:
                x = random_crop_flip(x, self.crop_padding, self.flip, self.augment_generator)
            yield normalize(x, self.mean, self.std), self.labels[idx]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "augment_generator": self.augment_generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        if "augment_generator" in state:  # absent in checkpoints of versions with one generator
            self.augment_generator.set_state(state["augment_generator"])


# how PyTorch reports a batch that a worker could not put into (or this process could not map from) shared memory
_NO_SHARED_MEMORY = ("unable to mmap", "Cannot allocate memory", "No space left on device", "unable to open shared",
                     "shared memory")


class SeededDataLoader(DataLoader):
    """A ``DataLoader`` whose shuffle and worker seeds come from its own generator, saved in checkpoints: each
    epoch draws the permutation and the workers' base seed from it, so restoring it replays the next epoch's
    order and augmentations exactly (in the main process the transforms draw from the global RNGs, which the
    checkpoint restores too)."""

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from super().__iter__()
        except RuntimeError as err:
            if not any(sign in str(err) for sign in _NO_SHARED_MEMORY):
                raise
            cause = str(err).rstrip().splitlines()[-1]
            raise DataError(f"a DataLoader batch did not fit in shared memory ({cause}): every batch in flight is "
                            "mapped by its worker and by this process; lower recipe.batch_size or recipe.workers "
                            "(0 decodes in this process), or raise the limit (ulimit -v; /dev/shm in a container)"
                            ) from None

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:  # absent in checkpoints of versions that did not save it
            self.generator.set_state(state["generator"])


def pil_loader(
    data: ImageData | ImageFiles,
    transform: Any,
    batch_size: int,
    *,
    shuffle: bool,
    workers: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    drop_last: bool = False,
) -> SeededDataLoader:
    """A DataLoader with per-sample PIL transforms, of images in memory or on disk; sharded by
    ``DistributedSampler`` when world > 1 (the same rule as ``TensorLoader``: the tail that does not divide by
    ``world`` is left out, every rank the same batches).
    """
    dataset = data.samples(transform)
    sampler = None
    if world > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                     drop_last=True)
    gen = torch.Generator().manual_seed(augment_seed(seed, rank))  # per rank: workers augment differently
    return SeededDataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=loader_workers(workers),
        generator=gen, persistent_workers=False, pin_memory=torch.cuda.is_available(), drop_last=drop_last,
    )
