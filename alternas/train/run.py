"""Glue between a placement and the training loop: the model a dataset and recipe call for."""

from __future__ import annotations

import torch

from alternas.data.datasets import DataSplits
from alternas.models import AlterNet, build_model
from alternas.placement import Placement
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
