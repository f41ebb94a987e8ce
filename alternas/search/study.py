"""Studies: the YAML file that defines a search, and the folder it writes.

A study file has sections ``data``, ``recipe``, ``diagnostics``, ``buildup`` and ``optuna`` plus top-level keys.
Every key is validated (an unknown one is named with its path); CLI flags override file values. The output folder
(default ``studies/<name>/``) holds one sub-folder per candidate, ``results.csv``, the trajectory and the report.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from alternas.data.datasets import BUILTIN, DataConfig
from alternas.data.torchvision_sets import canonical_name
from alternas.diagnostics.run import DiagnosticsConfig, get_diagnostics
from alternas.errors import AlternasError, ConfigError, check_types, reject_unknown_keys
from alternas.fileio import atomic_write_text
from alternas.models.bases import get_base
from alternas.placement import Placement
from alternas.train.recipe import MAX_EPOCHS, Recipe, get_recipe

Spending = Literal["power", "equal"]  # decision.SPENDINGS (a test keeps them equal)


@dataclass(frozen=True)
class BuildupConfig:
    """Settings of the build-up search (PAPER.md §3)."""

    start: str | None = None  # placement to start from; default: the base's all-Conv net
    min_gain: float = 0.1  # accept an MSA only if its paired val-accuracy gain is confidently above this (pp)
    confidence: float = 0.9  # accept when P(gain > min_gain) >= confidence, reject when <= 1 - confidence
    min_seeds: int | None = None  # seeds a comparison starts with; default min(2, len(seeds))
    max_seeds: int | None = None  # seeds it may grow to while undecided; default min(5, len(seeds))
    screen_at: float | None = None  # look at this fraction of the epochs first; stop confidently worse children
    pool_seed_variance: bool = False  # a comparison borrows the seed variance its study's earlier comparisons measured
    accept_spending: Spending = "power"  # how a race's looks share its false-accept rate (decision.accept_level)
    patience: int = 0  # after a reject, keep adding MSAs in the same stage on the rejected net this many times
    max_candidates: int = 50  # placements evaluated, the start included
    budget_hours: float | None = None  # stop once candidates have used this much wall time
    warm_start: bool = False  # children inherit their parent's weights and train warm_start_epochs
    warm_start_epochs: int | None = None  # default: half the recipe's epochs, no warmup


Sampler = Literal["tpe", "nsga2", "random", "grid"]
Pruner = Literal["hyperband", "median", "none"]


@dataclass(frozen=True)
class OptunaConfig:
    """Settings of the Optuna search over placements."""

    trials: int = 50
    space: str | None = None  # search space YAML; default search_spaces/<base>.yaml
    sampler: Sampler = "tpe"
    pruner: Pruner = "hyperband"
    objectives: tuple[str, ...] = ("acc",)
    storage: str | None = None  # default: a journal file in the study folder
    study_name: str | None = None
    seed: int = 0
    # RDB storages: a worker's heartbeat interval, and how long without one before its trial is failed and retried
    heartbeat_s: int = 30
    grace_period_s: int = 90

    def __post_init__(self) -> None:
        if not 1 <= self.trials <= 1_000_000:
            raise ConfigError(f"optuna.trials must be in [1, 1000000], got {self.trials}")
        if not self.objectives:
            raise ConfigError("optuna.objectives: give at least one objective")
        if not 0 < self.heartbeat_s < self.grace_period_s <= 86_400:
            raise ConfigError("optuna.heartbeat_s must be positive and below optuna.grace_period_s (at most a day) "
                              f"(got {self.heartbeat_s} and {self.grace_period_s})")


@dataclass(frozen=True)
class StudyConfig:
    name: str = "study"
    base: str = "resnet50"
    window_size: int | None = None
    seeds: tuple[int, ...] = (0, 1, 2)  # one seed cannot count seed noise: the build-up's pool starts with two
    device: str | None = None
    output: str | None = None  # default studies/<name>
    data: DataConfig = field(default_factory=DataConfig)
    recipe: Recipe = field(default_factory=Recipe)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    buildup: BuildupConfig = field(default_factory=BuildupConfig)
    optuna: OptunaConfig = field(default_factory=OptunaConfig)

    def __post_init__(self) -> None:
        get_base(self.base)  # unknown base -> ConfigError naming the choices
        if not self.seeds:
            raise ConfigError("seeds: give at least one seed")
        if self.buildup.start is not None:
            Placement.parse(self.buildup.start)
        if self.window_size is not None and not 1 <= self.window_size <= 1024:
            raise ConfigError(f"window_size must be in [1, 1024] (or null for the base's default), got "
                              f"{self.window_size}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ConfigError(f"device {self.device!r} is not a torch device; use cpu, cuda, cuda:1 or mps, "
                                  "or leave it out to pick one") from None
        b = self.buildup
        if not (0 <= b.min_gain <= 100 and 0 <= b.patience <= 1000 and 1 <= b.max_candidates <= 100_000):
            raise ConfigError(f"buildup: min_gain ({b.min_gain}) must be in [0, 100] pp, patience ({b.patience}) in "
                              f"[0, 1000] and max_candidates ({b.max_candidates}) in [1, 100000]")
        if b.warm_start_epochs is not None and not 1 <= b.warm_start_epochs <= MAX_EPOCHS:
            raise ConfigError(f"buildup.warm_start_epochs must be in [1, {MAX_EPOCHS}] (or null: half the epochs), "
                              f"got {b.warm_start_epochs}")
        if b.budget_hours is not None and not 0 < b.budget_hours <= 1e5:
            raise ConfigError(f"buildup.budget_hours must be in (0, 100000] (or null: no budget), got {b.budget_hours}")
        if not 0.5 < b.confidence < 1:
            raise ConfigError(f"buildup.confidence must be in (0.5, 1), got {b.confidence}")
        if b.screen_at is not None and not 0 < b.screen_at < 1:
            raise ConfigError(f"buildup.screen_at must be a fraction of the epochs in (0, 1), got {b.screen_at}")
        for key in ("min_seeds", "max_seeds"):
            value = getattr(b, key)
            if value is not None and not 1 <= value <= len(self.seeds):
                raise ConfigError(f"buildup.{key} must be between 1 and the number of seeds in the pool "
                                  f"({len(self.seeds)}: {list(self.seeds)}), got {value}; add seeds or lower it")
        low, high = self.seed_budget
        if low > high:
            raise ConfigError(f"buildup.min_seeds ({low}) must not exceed buildup.max_seeds ({high})")

    @property
    def seed_budget(self) -> tuple[int, int]:
        """(min_seeds, max_seeds) of a build-up comparison, the defaults bounded by the seed pool."""
        b, pool = self.buildup, len(self.seeds)
        high = b.max_seeds if b.max_seeds is not None else min(5, pool)
        return (b.min_seeds if b.min_seeds is not None else min(2, high)), high

    @property
    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path("studies") / self.name

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["recipe"] = self.recipe.to_dict()
        out["data"] = self.data.to_dict()
        out["diagnostics"] = self.diagnostics.to_dict()
        out["seeds"] = list(self.seeds)
        out["optuna"]["objectives"] = list(self.optuna.objectives)
        return out


_SECTIONS = {"data": DataConfig, "buildup": BuildupConfig, "optuna": OptunaConfig}


def _build_section(cls: type, values: Any, where: str) -> Any:
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: '{cls.__name__}' section must be a mapping, got {type(values).__name__}")
    reject_unknown_keys(values, {f.name for f in fields(cls)}, where=where)
    return cls(**check_types(cls, values, where))


def study_from_dict(raw: dict[str, Any], source: str = "study") -> StudyConfig:
    """Validate a study mapping (from YAML); errors name the file and the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a study file must be a YAML mapping")
    reject_unknown_keys(raw, {f.name for f in fields(StudyConfig)}, where=source)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{source}: {key}"
        try:
            if key in _SECTIONS:
                kwargs[key] = _build_section(_SECTIONS[key], value, where)
            elif key == "diagnostics":
                kwargs[key] = get_diagnostics(value, where)
            elif key == "recipe":
                if isinstance(value, str):
                    kwargs[key] = get_recipe(value)
                elif isinstance(value, dict):
                    spec = dict(value)
                    kwargs[key] = get_recipe(spec.pop("name", "fast"), spec)
                else:
                    raise ConfigError("give a preset name or a mapping with 'name' and overrides")
            elif key == "seeds":
                seeds = value if isinstance(value, list) else [value]
                if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**31 for s in seeds):
                    raise ConfigError(f"seeds must be whole numbers in [0, 2**31), got {value!r}")
                if len(set(seeds)) != len(seeds):
                    raise ConfigError(f"seeds must not repeat, got {value!r}")
                kwargs[key] = tuple(seeds)
            else:
                kwargs.update(check_types(StudyConfig, {key: value}, source))
        except AlternasError as err:
            message = str(err)
            raise ConfigError(message if message.startswith(source) else f"{where}: {message}") from None
    try:
        return StudyConfig(**kwargs)
    except AlternasError as err:
        raise ConfigError(f"{source}: {err}") from None


def study_templates() -> dict[str, Path]:
    """The study files shipped with the package (``quickstart``, ``cifar100-resnet50``), by name."""
    root = Path(str(resources.files("alternas.studies")))
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def find_study_file(path: str | os.PathLike) -> Path:
    """``path`` if it is a file, else the shipped template it names (``quickstart``, ``studies/quickstart.yaml``):
    the README's commands work from any folder once the package is installed."""
    path = Path(path)
    if path.is_file():
        return path
    templates = study_templates()
    name = path.name.removesuffix(".yaml")
    if path.parent in (Path("."), Path("studies")) and name in templates:
        return templates[name]
    raise ConfigError(f"study file {path} does not exist; give a study YAML or a shipped template: "
                      f"{', '.join(templates)}")


def load_study(path: str | os.PathLike) -> StudyConfig:
    path = find_study_file(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return study_from_dict(raw or {}, str(path))


def study_for_command(study_file: str | os.PathLike | None, overrides: dict[str, Any],
                      recipe: str | None = None) -> StudyConfig:
    """A study as a search command means it: the file's (or, without one, a default named after the data and base:
    ``tiny`` and the ``fast`` recipe on the built-in datasets, ``resnet50`` and ``paper`` elsewhere), with dotted
    ``overrides`` on top (``None`` values ignored). A ``recipe`` preset replaces the whole recipe, keeping only an
    overridden ``recipe.epochs``."""
    if study_file:
        config = load_study(study_file)
    else:
        data = canonical_name(overrides.get("data.name") or "shapes")  # torch/cifar10 is cifar10's study
        base = overrides.get("base")
        builtin = data in BUILTIN
        default_name = f"{data.replace(':', '-').replace('/', '-')}-{base or 'resnet50'}"
        config = study_from_dict({"name": overrides.get("name") or default_name,
                                  "base": base or ("tiny" if builtin else "resnet50"),
                                  "recipe": "fast" if builtin else "paper", "data": {"name": data}}, "command line")
    if recipe is None:
        return with_overrides(config, overrides)
    epochs = overrides.get("recipe.epochs")
    config = with_overrides(config, {k: v for k, v in overrides.items() if not k.startswith("recipe.")})
    return replace(config, recipe=get_recipe(recipe, {"epochs": epochs} if epochs else None))


def with_overrides(config: StudyConfig, overrides: dict[str, Any]) -> StudyConfig:
    """Apply dotted overrides (``"buildup.patience": 1``, ``"recipe.epochs": 3``) on top of a study."""
    data = config.to_dict()
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"unknown study key {dotted!r}: {p!r} is not a section of a study")
            node = node[p]
        node[leaf] = list(value) if isinstance(value, tuple) else value
    recipe = dict(data["recipe"])
    data["recipe"] = {"name": recipe.pop("name"), **recipe}
    return study_from_dict(data, "command line")


def dataclass_dict(obj: Any) -> Any:
    return asdict(obj) if is_dataclass(obj) else obj


class StudyFolder:
    """The on-disk state of a study: per-candidate folders and results, derived tables (many workers may share it:
    every file is written atomically, shared tables under a lock)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.candidates = self.root / "candidates"

    # -- files ---------------------------------------------------------------------------------------------------
    def write_json(self, name: str, payload: Any) -> Path:
        return atomic_write_text(self.root / name, json.dumps(payload, indent=1, default=dataclass_dict))

    def read_json(self, name: str) -> Any | None:
        path = self.root / name
        return json.loads(path.read_text()) if path.is_file() else None

    def save_config(self, config: StudyConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / "study.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))

    def load_config(self) -> StudyConfig:
        path = self.root / "study.yaml"
        if not path.is_file():
            raise ConfigError(f"{self.root} is not a study folder (no study.yaml); run `alternas buildup` first")
        return load_study(path)

