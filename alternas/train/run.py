"""Glue between a placement and the training loop: the model a dataset and recipe call for."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from alternas.data.datasets import DataConfig, DataSplits, load_data
from alternas.errors import ConfigError
from alternas.models import AlterNet, build_model
from alternas.placement import Placement
from alternas.train.fit import RunResult, fit
from alternas.train.recipe import Recipe


def model_for(
    placement: str | Placement,
    base: str,
    data: DataSplits,
    recipe: Recipe,
    window_size: int | None = None,
    seed: int = 0,
) -> AlterNet:
    """An AlterNet sized for ``data`` (classes, image size, normalisation) with the recipe's drop-path rate.

    The initial weights depend on ``seed`` only, not on whatever drew random numbers before.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(
            placement, base, num_classes=data.num_classes, image_size=data.image_size, window_size=window_size,
            drop_path=recipe.drop_path, mean=data.mean, std=data.std, zero_init_last=recipe.zero_init_last,
        )


def run_config(model: AlterNet, data_config: dict) -> dict:
    """What ``config.yaml`` records besides the recipe: the model's rebuild arguments and the data settings."""
    return {"model": {**model.model_args, "drop_path_rate": model.drop_path_rate}, "data_config": data_config}


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """A run folder's ``config.yaml`` (model arguments, recipe, data settings), with a one-line error when it is
    missing or damaged."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.yaml); train one with `alternas train`")
    try:
        saved = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is damaged ({type(err).__name__}); re-run the candidate's search to rewrite it") \
            from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} is damaged (not a mapping); re-run the candidate's search to rewrite it")
    return saved


def run_weights(run_dir: str | Path) -> Path:
    """The weights a run folder holds: the final ``model.safetensors``, else its last checkpoint's."""
    from alternas.train.checkpoint import load_state

    final = Path(run_dir) / "model.safetensors"
    state = None if final.is_file() else load_state(Path(run_dir) / "checkpoint")
    return Path(run_dir) / "checkpoint" / state["weights"] if state else final


def recipe_file_overrides(path: str | Path) -> dict[str, Any]:
    """The recipe keys a YAML file sets (``alternas train --recipe-file``), checked to be a mapping."""
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the recipe file ({type(err).__name__})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of recipe keys")
    return loaded


def train_run(placement: str | Placement, base: str, data: DataConfig, recipe: Recipe, out_dir: str | Path, *,
              window_size: int | None = None, seed: int = 0, log: Callable[[str], None] = print,
              **fit_options: Any) -> RunResult:
    """Train one AlterNet into a run folder as ``alternas train`` does: the data loaded, the model sized for it and
    seeded, its rebuild arguments and data settings recorded in ``config.yaml``; ``fit_options`` go to ``fit``
    (device, resume, quiet, compile_model, deterministic). ``log`` gets the one-line header (main process only)."""
    splits = load_data(data)
    model = model_for(placement, base, splits, recipe, window_size, seed=seed)
    if not fit_options.get("quiet") and int(os.environ.get("RANK", "0")) == 0:
        log(f"{model.placement} on {base} | {splits.summary()} | recipe {recipe.name}, {recipe.total_epochs} epochs")
    return fit(model, splits, recipe, out_dir, seed=seed, run_config=run_config(model, data.to_dict()),
               **fit_options)
