"""Training recipes: named presets (dataclasses) with overrides, round-tripping to YAML-ready dicts.

``paper`` is PAPER.md §2.1 (CIFAR) exactly; ``paper-imagenet`` is §2.2; ``paper-sgd`` the weak-augmentation
``cifar100_general`` variant; ``fast`` is a cheap proxy for searches: crop+flip on in-memory tensors, label
smoothing, AdamW with a short warmup and cosine decay, no mixup or RandAugment (both slow down what a few epochs
can learn), no stochastic depth, residual branches that start at zero (so a few epochs leave chance level on
every seed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from alternas.errors import ConfigError, check_types, reject_unknown_keys

MAX_EPOCHS = 100_000  # a finite range for every number: a typo like 1e9 is refused, not trained for years
MAX_BATCH = 1 << 20


@dataclass(frozen=True)
class Recipe:
    name: str = "fast"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd only
    nesterov: bool = False
    batch_size: int = 128
    eval_batch_size: int = 512
    epochs: int = 10  # after warmup
    warmup_epochs: int = 1  # extra epochs with a linear per-iteration ramp from 0
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    clip_grad: float | None = 5.0
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    randaugment: str | None = None  # timm config string, e.g. "rand-m9-n2-mstd1.0"
    random_erasing: float = 0.0
    crop: Literal["pad", "resized"] = "pad"  # RandomCrop(size, padding) | RandomResizedCrop(size)
    crop_padding: int = 4
    flip: bool = True
    drop_path: float = 0.0
    zero_init_last: bool = False  # start every residual branch at zero (timm's zero_init_last): steadier short runs
    workers: int = 4  # DataLoader workers of the PIL pipeline

    def __post_init__(self) -> None:
        checks = [
            (self.optimizer in ("adamw", "sgd"), "optimizer must be 'adamw' or 'sgd'"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.weight_decay <= 10, "weight_decay must be in [0, 10]"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (2 <= self.batch_size <= MAX_BATCH and 1 <= self.eval_batch_size <= MAX_BATCH,
             f"batch_size must be in [2, {MAX_BATCH}] and eval_batch_size in [1, {MAX_BATCH}]"),
            (1 <= self.epochs <= MAX_EPOCHS and 0 <= self.warmup_epochs <= MAX_EPOCHS,
             f"epochs must be in [1, {MAX_EPOCHS}] and warmup_epochs in [0, {MAX_EPOCHS}]"),
            (0 < self.gamma <= 1, "gamma must be in (0, 1]"),
            (self.schedule in ("cosine", "multistep", "constant"), "schedule must be cosine, multistep or constant"),
            (self.clip_grad is None or self.clip_grad > 0, "clip_grad must be > 0 or null"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (0 <= self.mixup <= 100 and 0 <= self.cutmix <= 100, "mixup and cutmix must be in [0, 100]"),
            (0 <= self.crop_padding <= 1024, "crop_padding must be in [0, 1024]"),
            (0 <= self.random_erasing <= 1, "random_erasing must be in [0, 1]"),
            (self.crop in ("pad", "resized"), "crop must be 'pad' or 'resized'"),
            (0 <= self.drop_path < 1, "drop_path must be in [0, 1)"),
            (0 <= self.workers <= 1024, "workers must be in [0, 1024]"),
            (isinstance(self.flip, bool) and isinstance(self.zero_init_last, bool),
             "flip and zero_init_last must be true or false"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"recipe {self.name!r}: {message}")

    @property
    def total_epochs(self) -> int:
        return self.warmup_epochs + self.epochs

    @property
    def uses_pil_pipeline(self) -> bool:
        """RandAugment, random erasing and resized crops need per-sample PIL transforms."""
        return bool(self.randaugment) or self.random_erasing > 0 or self.crop == "resized"

    @property
    def uses_mixup(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def applies(self, augmentation: str) -> bool:
        """Whether this recipe would apply ``augmentation`` (one of ``alternas.data.datasets.AUGMENTATIONS``) to
        data that allows it."""
        if augmentation in ("rotate", "shear", "translate", "photometric"):
            return bool(self.randaugment)
        return {"hflip": self.flip, "erasing": self.random_erasing > 0, "mixing": self.uses_mixup}[augmentation]

    def lr_at(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        """Learning rate at iteration ``step`` of ``epoch`` (both 0-based).

        Warmup epochs ramp per iteration as ``lr * t / (warmup * steps)``, t from 0; then the schedule steps per
        epoch (the reference's WarmupScheduler + CosineAnnealingLR(T_max=epochs, eta_min=0)).

        Not timm's schedulers: they count warmup and decay in one unit (epochs, or updates with the cosine then
        decaying per update too), while the reference ramps per iteration and decays per epoch. A pure function of
        (epoch, step) also needs no scheduler state in checkpoints: a resumed run recomputes the same rate.
        """
        if epoch < self.warmup_epochs:
            return self.lr * (epoch * steps_per_epoch + step) / (self.warmup_epochs * steps_per_epoch)
        e = epoch - self.warmup_epochs
        if self.schedule == "cosine":
            import math

            return self.lr * 0.5 * (1 + math.cos(math.pi * e / self.epochs))
        if self.schedule == "multistep":
            return self.lr * self.gamma ** sum(1 for m in self.milestones if e >= m)
        return self.lr

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["milestones"] = list(self.milestones)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        reject_unknown_keys(data, {f.name for f in fields(cls)}, "recipe key")
        data = dict(data)
        if data.get("milestones") is None:
            data.pop("milestones", None)
        return cls(**check_types(cls, data, "recipe"))


PRESETS: dict[str, Recipe] = {
    "fast": Recipe(zero_init_last=True),
    "paper": Recipe(
        name="paper", optimizer="adamw", lr=1.25e-4, weight_decay=0.05, batch_size=96, eval_batch_size=256,
        epochs=300, warmup_epochs=5, schedule="cosine", clip_grad=5.0, label_smoothing=0.1, mixup=1.0, cutmix=0.8,
        randaugment="rand-m9-n2-mstd1.0", crop="pad", crop_padding=4, flip=True, drop_path=0.1,
    ),
    "paper-imagenet": Recipe(
        name="paper-imagenet", optimizer="adamw", lr=1.25e-4, weight_decay=0.05, batch_size=128,
        eval_batch_size=256, epochs=300, warmup_epochs=5, schedule="cosine", clip_grad=None, label_smoothing=0.1,
        mixup=1.0, cutmix=0.8, randaugment="rand-m9-n2-mstd0.5", random_erasing=0.25, crop="resized",
        drop_path=0.1,
    ),
    "paper-sgd": Recipe(
        name="paper-sgd", optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=128,
        eval_batch_size=256, epochs=200, warmup_epochs=1, schedule="multistep", milestones=(60, 120, 160),
        gamma=0.2, clip_grad=None, label_smoothing=0.0, drop_path=0.1,
    ),
}


def _from_command_line(key: str, value: Any) -> Any:
    """What a ``--set`` string means before type checking: ``none``/``null`` is None, ``60,120`` a tuple."""
    if not isinstance(value, str):
        return value
    if value.strip().lower() in ("none", "null", ""):
        return None
    if key == "milestones":
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def get_recipe(name: str | Recipe = "fast", overrides: dict[str, Any] | None = None) -> Recipe:
    """A preset by name (or a given recipe) with ``overrides`` applied; unknown names/keys raise ``ConfigError``."""
    if isinstance(name, Recipe):
        recipe = name
    elif isinstance(name, str) and name in PRESETS:
        recipe = PRESETS[name]
    else:
        raise ConfigError(f"unknown recipe {name!r}; choose one of: {', '.join(PRESETS)}")
    if not overrides:
        return recipe
    reject_unknown_keys(overrides, {f.name for f in fields(Recipe)} - {"name"}, "recipe key")
    values = check_types(Recipe, {k: _from_command_line(k, v) for k, v in overrides.items()}, f"recipe {recipe.name!r}")
    return replace(recipe, **values)
